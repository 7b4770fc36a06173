"""The admin API under ``/admin/``: served only when TEXTGEN_ADMIN_TOKEN is set (else every path is 404).

JSON requests authenticate with ``Authorization: Bearer <token>``; the usage page (``textgen.http.admin_page``)
with a session cookie derived from the token. Handlers parse, call one ``AccountAdmin`` method and render.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from textgen.admin import AccountAdmin
from textgen.errors import BadRequest, Unauthorized
from textgen.http.responses import JSONResponse
from textgen.presentation import account_view, key_view
from textgen.settings import Settings

SESSION_COOKIE = "textgen_admin"


def admin_service(request: Request) -> AccountAdmin:
    admin: AccountAdmin = request.app.state.services.admin
    return admin


def session_value(token: str) -> str:
    """The page's cookie: derived from the token, so a leaked cookie does not reveal the bearer token."""
    return hmac.new(token.encode(), b"textgen-admin-page-session", hashlib.sha256).hexdigest()


def _token(request: Request) -> str:
    token: str = request.app.state.services.settings.admin_token
    return token


def require_token(request: Request) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("admin API: send Authorization: Bearer <TEXTGEN_ADMIN_TOKEN>")
    if not hmac.compare_digest(given.strip().encode(), _token(request).encode()):
        raise Unauthorized("admin API: wrong admin token")


def has_session(request: Request) -> bool:
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return hmac.compare_digest(cookie.encode(), session_value(_token(request)).encode())


async def read_object(
    request: Request, allowed: set[str], required: frozenset[str] | set[str] = frozenset()
) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if required:
            raise BadRequest(f"request body is empty; send a JSON object with {', '.join(sorted(required))}")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body: must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise BadRequest(f"{sorted(unknown)[0]}: unknown field (allowed: {', '.join(sorted(allowed))})")
    missing = required - set(body)
    if missing:
        raise BadRequest(f"{sorted(missing)[0]}: field required")
    return body


def _limit(request: Request) -> int:
    max_limit: int = request.app.state.services.settings.list_max_limit
    try:
        limit = int(request.query_params.get("limit", "20"))
    except ValueError:
        raise BadRequest("limit: must be an integer") from None
    if not 1 <= limit <= max_limit:
        raise BadRequest(f"limit: must be between 1 and {max_limit}")
    return limit


def _encode_cursor(account_id: int) -> str:
    return base64.urlsafe_b64encode(f"a{account_id}".encode()).decode().rstrip("=")


def _decode_cursor(value: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        if not raw.startswith("a"):
            raise ValueError
        return int(raw[1:])
    except ValueError:
        raise BadRequest("cursor: invalid pagination cursor") from None


async def create_account(request: Request) -> Response:
    require_token(request)
    body = await read_object(request, {"name", "credits", "rate_limit"}, {"name"})
    created = await admin_service(request).create(
        body["name"], body.get("credits", 0.0), body.get("rate_limit")
    )
    keys = await admin_service(request).keys(created.account.api_id)
    out = {**account_view(created.account, keys), "api_key": created.api_key, "key_id": keys[0].id}
    return JSONResponse(out, status_code=201)


async def list_accounts(request: Request) -> Response:
    require_token(request)
    unknown = set(request.query_params) - {"limit", "cursor"}
    if unknown:
        raise BadRequest(f"unknown query parameter: {sorted(unknown)[0]}")
    limit = _limit(request)
    cursor = request.query_params.get("cursor")
    rows, more = await admin_service(request).list_accounts(limit, _decode_cursor(cursor) if cursor else None)
    next_url = None
    if more and rows:
        next_url = str(request.url.include_query_params(limit=limit, cursor=_encode_cursor(rows[-1].id)))
    return JSONResponse({"next": next_url, "results": [account_view(a) for a in rows]})


async def show_account(request: Request) -> Response:
    require_token(request)
    account, keys = await admin_service(request).show(request.path_params["api_id"])
    return JSONResponse(account_view(account, keys))


async def update_account(request: Request) -> Response:
    require_token(request)
    body = await read_object(request, {"rate_limit", "disabled"})
    if not body:
        raise BadRequest("request body: send rate_limit and/or disabled")
    account = await admin_service(request).update(
        request.path_params["api_id"], rate_limit=body.get("rate_limit"), disabled=body.get("disabled")
    )
    return JSONResponse(account_view(account))


async def credit_account(request: Request) -> Response:
    require_token(request)
    body = await read_object(request, {"amount", "reason"}, {"amount", "reason"})
    account = await admin_service(request).credit(
        request.path_params["api_id"], body["amount"], body["reason"]
    )
    return JSONResponse(account_view(account))


async def create_key(request: Request) -> Response:
    require_token(request)
    await read_object(request, set())
    created = await admin_service(request).create_key(request.path_params["api_id"])
    return JSONResponse({**key_view(created.key), "api_key": created.api_key}, status_code=201)


async def list_keys(request: Request) -> Response:
    require_token(request)
    keys = await admin_service(request).keys(request.path_params["api_id"])
    return JSONResponse({"results": [key_view(k) for k in keys]})


async def revoke_key(request: Request) -> Response:
    require_token(request)
    key = await admin_service(request).revoke_key(
        request.path_params["api_id"], request.path_params["key_id"]
    )
    return JSONResponse(key_view(key))


async def rotate_webhook_secret(request: Request) -> Response:
    require_token(request)
    account = await admin_service(request).rotate_webhook_secret(request.path_params["api_id"])
    return JSONResponse(account_view(account))


def admin_routes(settings: Settings) -> list[BaseRoute]:
    """The /admin/ routes, or none at all (so every /admin/ path is 404) without an admin token."""
    if not settings.admin_token:
        return []
    from textgen.http import admin_page

    account = "/admin/accounts/{api_id:str}/"
    return [
        Route("/admin/accounts/", create_account, methods=["POST"]),
        Route("/admin/accounts/", list_accounts, methods=["GET"]),
        Route(account, show_account, methods=["GET"]),
        Route(account, update_account, methods=["PATCH"]),
        Route(account + "credits/", credit_account, methods=["POST"]),
        Route(account + "keys/", create_key, methods=["POST"]),
        Route(account + "keys/", list_keys, methods=["GET"]),
        Route(account + "keys/{key_id:str}/", revoke_key, methods=["DELETE"]),
        Route(account + "webhook-secret/", rotate_webhook_secret, methods=["POST"]),
        *admin_page.page_routes(),
    ]
