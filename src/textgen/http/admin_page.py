"""The operator's usage page at ``/admin/``: server-rendered HTML, no scripts, nothing fetched from elsewhere.

Signing in posts the admin token in a form; the page then keeps a session cookie derived from it (HttpOnly,
SameSite=Strict, path /admin/), never the token in the URL. The page's own buttons are plain form posts that
need that cookie and a same-origin ``Origin`` header.
"""

from __future__ import annotations

import hmac
from html import escape
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from textgen.admin import STATUSES
from textgen.catalog import from_micro
from textgen.errors import BadRequest, Forbidden, Unauthorized
from textgen.http.admin import SESSION_COOKIE, _token, admin_service, has_session, session_value

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.3rem}h2{font-size:1.05rem;margin-top:1.6rem}
table{border-collapse:collapse;margin:.4rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.off{color:#a00;font-weight:bold}.muted{color:#777}
.bar{display:inline-block;height:.7rem;background:#4a7}.bar.failed{background:#c44}
form.inline{display:inline;margin:0}.error{color:#a00}
"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    html = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )
    return HTMLResponse(
        html,
        status_code=status,
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
            "X-Frame-Options": "DENY",
        },
    )


def _login(error: str = "", status: int = 200) -> HTMLResponse:
    shown = f"<p class=error id=login-error>{escape(error)}</p>" if error else ""
    return _page(
        "textgen admin: sign in",
        "<h1>textgen admin</h1>"
        f"{shown}<form method=post action=/admin/login>"
        "<label>Admin token <input type=password name=token id=token autocomplete=current-password></label> "
        "<button type=submit id=sign-in>Sign in</button></form>",
        status,
    )


async def _form(request: Request) -> dict[str, str]:
    raw = (await request.body()).decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(raw, max_num_fields=20).items()}


def _same_origin(request: Request) -> None:
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise Forbidden("admin page: cross-origin form post refused")


def _require_session(request: Request) -> None:
    if not has_session(request):
        raise Unauthorized("admin page: sign in first")
    _same_origin(request)


async def login(request: Request) -> Response:
    _same_origin(request)
    token = (await _form(request)).get("token", "")
    if not hmac.compare_digest(token.encode(), _token(request).encode()):
        return _login("Wrong admin token.", 401)
    response = RedirectResponse("/admin/", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session_value(_token(request)),
        path="/admin/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def logout(request: Request) -> Response:
    response = RedirectResponse("/admin/", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/admin/")
    return response


async def revoke(request: Request) -> Response:
    _require_session(request)
    form = await _form(request)
    if not form.get("api_id") or not form.get("key_id"):
        raise BadRequest("api_id and key_id: fields required")
    await admin_service(request).revoke_key(form["api_id"], form["key_id"])
    return RedirectResponse("/admin/", status_code=303)


async def set_state(request: Request) -> Response:
    _require_session(request)
    form = await _form(request)
    if not form.get("api_id") or form.get("disabled") not in ("0", "1"):
        raise BadRequest("api_id and disabled (0 or 1): fields required")
    await admin_service(request).update(form["api_id"], disabled=form["disabled"] == "1")
    return RedirectResponse("/admin/", status_code=303)


def _ts(value: Any) -> str:
    return (
        escape(value.strftime("%Y-%m-%d %H:%M:%S")) if value is not None else "<span class=muted>never</span>"
    )


def _credits(micro: int) -> str:
    return f"{from_micro(micro):g}"


def _accounts(data: dict[str, Any]) -> str:
    rows = []
    for account, keys in data["accounts"]:
        key_rows = []
        for key in keys:
            if key.revoked_at is None:
                action = (
                    "<form class=inline method=post action=/admin/page/revoke>"
                    f"<input type=hidden name=api_id value='{escape(account.api_id)}'>"
                    f"<input type=hidden name=key_id value='{escape(key.id)}'>"
                    f"<button type=submit id='revoke-{escape(key.id)}'>Revoke</button></form>"
                )
            else:
                action = f"<span class=muted>revoked {_ts(key.revoked_at)}</span>"
            key_rows.append(
                f"<li data-key-id='{escape(key.id)}' data-revoked='{int(key.revoked_at is not None)}'>"
                f"<code>{escape(key.prefix)}…</code> created {_ts(key.created_at)}, "
                f"last used {_ts(key.last_used_at)} {action}</li>"
            )
        state = "<span class=off>disabled</span>" if account.disabled else "active"
        toggle = (
            "<form class=inline method=post action=/admin/page/state>"
            f"<input type=hidden name=api_id value='{escape(account.api_id)}'>"
            f"<input type=hidden name=disabled value='{0 if account.disabled else 1}'>"
            f"<button type=submit>{'Enable' if account.disabled else 'Disable'}</button></form>"
        )
        rows.append(
            f"<tr data-api-id='{escape(account.api_id)}'><td><code>{escape(account.api_id)}</code></td>"
            f"<td>{escape(account.name)}</td><td class='n balance'>{_credits(account.balance)}</td>"
            f"<td class=n>{account.rate_limit}/min</td><td class=state>{state} {toggle}</td>"
            f"<td><ul>{''.join(key_rows)}</ul></td></tr>"
        )
    more = "<p class=muted>Only the first 200 accounts are shown; use the API to page.</p>"
    return (
        "<h2>Accounts</h2><table id=accounts><tr><th>api_id</th><th>name</th><th>credits</th>"
        f"<th>rate limit</th><th>state</th><th>keys</th></tr>{''.join(rows)}</table>"
        f"{more if data['more_accounts'] else ''}"
    )


def _status_days(data: dict[str, Any]) -> str:
    days = data["status_by_day"]
    peak = max([sum(c.values()) for c in days.values()] + [1])
    rows = []
    for day in sorted(days, reverse=True):
        counts = days[day]
        cells = "".join(f"<td class=n data-status='{s}'>{counts.get(s, 0)}</td>" for s in STATUSES)
        bars = "".join(
            f"<span class='bar {s}' style='width:{round(120 * counts.get(s, 0) / peak)}px'></span>"
            for s in ("done", "failed")
        )
        rows.append(f"<tr data-day='{escape(day)}'><td>{escape(day)}</td>{cells}<td>{bars}</td></tr>")
    head = "".join(f"<th>{s}</th>" for s in STATUSES)
    return (
        f"<h2>Tasks per status, last {data['days']} days (UTC, by creation)</h2>"
        f"<table id=tasks-by-day><tr><th>day</th>{head}<th></th></tr>{''.join(rows)}</table>"
    )


def _model_days(data: dict[str, Any]) -> str:
    rows = [
        f"<tr data-day='{escape(r['day'])}' data-model='{escape(r['model_name'])}'><td>{escape(r['day'])}</td>"
        f"<td>{escape(r['model_name'])}</td><td class='n tasks'>{r['tasks']}</td>"
        f"<td class='n input'>{r['input_tokens']}</td><td class='n output'>{r['output_tokens']}</td>"
        f"<td class='n credits'>{_credits(r['credits_used'])}</td></tr>"
        for r in data["model_days"]
    ]
    return (
        "<h2>Tokens and credits per model per day</h2><table id=model-days><tr><th>day</th><th>model</th>"
        "<th>tasks</th><th>input tokens</th><th>output tokens</th><th>credits used</th></tr>"
        f"{''.join(rows)}</table>"
    )


def _failures(data: dict[str, Any]) -> str:
    rows = [
        f"<tr data-task-id='{escape(f['id'])}'><td>{_ts(f['updated_at'])}</td><td><code>{escape(f['api_id'])}"
        f"</code></td><td>{escape(f['model_name'])}</td><td class=reason>{escape(f['failed_reason'])}</td></tr>"
        for f in data["failures"]
    ]
    return (
        "<h2>Recent failures</h2><table id=failures><tr><th>when</th><th>account</th><th>model</th>"
        f"<th>reason</th></tr>{''.join(rows)}</table>"
    )


def _webhooks(data: dict[str, Any]) -> str:
    health = data["webhooks"]
    counts = "".join(
        f"<td class=n data-delivery-status='{s}'>{health['deliveries'].get(s, 0)}</td>"
        for s in ("pending", "delivered", "failed")
    )
    latest = "".join(
        f"<li>{_ts(f['attempted_at'])} {escape(f['url'])}: "
        f"{escape(str(f['status_code'] or ''))} {escape(f['error'] or '')}</li>"
        for f in health["latest_failures"]
    )
    return (
        "<h2>Webhook deliveries</h2><table id=webhooks><tr><th>pending</th><th>delivered</th><th>failed</th>"
        f"<th>attempts (24 h)</th><th>succeeded</th></tr><tr>{counts}<td class=n id=attempts>"
        f"{health['attempts']}</td><td class=n id=attempts-ok>{health['attempts_ok']}</td></tr></table>"
        f"<ul id=webhook-failures>{latest}</ul>"
    )


async def page(request: Request) -> Response:
    if not has_session(request):
        return _login()
    data = await admin_service(request).dashboard()
    body = (
        "<h1>textgen admin <form class=inline method=post action=/admin/logout>"
        "<button type=submit id=sign-out>Sign out</button></form></h1>"
        + _accounts(data)
        + _status_days(data)
        + _model_days(data)
        + _failures(data)
        + _webhooks(data)
    )
    return _page("textgen admin", body)


def page_routes() -> list[BaseRoute]:
    return [
        Route("/admin/", page, methods=["GET"]),
        Route("/admin/login", login, methods=["POST"]),
        Route("/admin/logout", logout, methods=["POST"]),
        Route("/admin/page/revoke", revoke, methods=["POST"]),
        Route("/admin/page/state", set_state, methods=["POST"]),
    ]
