"""HTTP handlers for the text generator API. They parse, authorise and delegate; no SQL here."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from textgen import idempotency, limits
from textgen.errors import BadRequest, TextgenError
from textgen.http.responses import JSONResponse
from textgen.presentation import credits_json, encode_json, task_json, task_page
from textgen.protocol import ModelInfo, ModelList, TextGenRequest
from textgen.ratelimit import Quota
from textgen.readiness import readiness
from textgen.services import Services
from textgen.states import TaskStatus
from textgen.storage.rows import AccountRow, TaskRow


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def authorize(request: Request) -> tuple[AccountRow, Quota]:
    """Authenticate the caller and count the request against their rate limit."""
    svc = services(request)
    account = await svc.auth.authenticate(
        request.headers.get("x-api-id"),
        request.headers.get("x-api-key"),
        request.client.host if request.client else None,
    )
    quota = await svc.limiter.hit(account.api_id, account.rate_limit)
    return account, quota


def json_response(body: Any, status: int, quota: Quota) -> Response:
    return JSONResponse(body, status_code=status, headers=quota.headers())


async def read_body(request: Request) -> bytes:
    body = await request.body()
    if not body.strip():
        raise BadRequest("request body is empty; send a JSON object")
    return body


async def create_task(request: Request) -> Response:
    account, quota = await authorize(request)
    key = idempotency.check_key(request.headers.get(idempotency.HEADER))
    body = await read_body(request)
    payload = TextGenRequest.model_validate_json(body)
    svc = services(request)
    if key is None:
        task = await svc.tasks.create(account, payload)
        return json_response(task_json(task), 201, quota)
    claim = await svc.idempotency.begin(account, key, "create", body)
    if isinstance(claim, idempotency.Replay):
        return await replay(request, account, quota, claim)
    try:
        task = await svc.tasks.create(account, payload, idempotency_key=key)
    except TextgenError:
        await svc.idempotency.release(claim)  # refused before any task existed: a retry may succeed
        raise
    answer = task_json(task)
    await svc.idempotency.complete(claim, 201, encode_json(answer).decode())
    return json_response(answer, 201, quota)


async def replay(request: Request, account: AccountRow, quota: Quota, claim: idempotency.Replay) -> Response:
    """The answer the first request with this Idempotency-Key got."""
    headers = {**quota.headers(), idempotency.REPLAYED_HEADER: "true"}
    if claim.body is not None:
        return Response(
            claim.body, status_code=claim.status_code, headers=headers, media_type="application/json"
        )
    assert claim.task_id is not None
    task = await services(request).tasks.get(account, claim.task_id)
    return JSONResponse(task_json(task), status_code=claim.status_code, headers=headers)


async def get_task(request: Request) -> Response:
    account, quota = await authorize(request)
    task = await services(request).tasks.get(account, str(request.path_params["task_id"]))
    return json_response(task_json(task), 200, quota)


async def cancel_task(request: Request) -> Response:
    account, quota = await authorize(request)
    task = await services(request).tasks.cancel(account, str(request.path_params["task_id"]))
    return json_response(task_json(task), 200, quota)


def _page_url(request: Request, params: dict[str, str]) -> str:
    base = str(request.url.replace(query=""))
    return f"{base}?{urlencode(params)}"


async def list_tasks(request: Request) -> Response:
    account, quota = await authorize(request)
    svc = services(request)
    query = request.query_params
    unknown = set(query) - {"limit", "status", "cursor"}
    if unknown:
        raise BadRequest(f"unknown query parameter: {sorted(unknown)[0]}")
    max_limit = svc.settings.list_max_limit
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise BadRequest("limit: must be an integer") from None
    if not 1 <= limit <= max_limit:
        raise BadRequest(f"limit: must be between 1 and {max_limit}")
    status_value = query.get("status")
    try:
        status = TaskStatus(status_value) if status_value is not None else None
    except ValueError:
        raise BadRequest("status: must be one of pending, running, done, failed") from None
    encoded: dict[str, bytes] = {}

    def size(row: TaskRow) -> int:  # each task is encoded once, to be measured and then sent
        encoded[row.id] = encode_json(task_json(row))
        return len(encoded[row.id])

    rows, next_cursor, prev_cursor = await svc.tasks.page(
        account,
        limit=limit,
        status=status,
        cursor=query.get("cursor"),
        size=size,
        max_bytes=limits.MAX_LIST_PAGE_BYTES,
    )
    common = {"limit": str(limit), **({"status": status.value} if status else {})}
    body = task_page(
        [encoded[row.id] for row in rows],
        _page_url(request, {**common, "cursor": next_cursor}) if next_cursor else None,
        _page_url(request, {**common, "cursor": prev_cursor}) if prev_cursor else None,
    )
    return Response(body, status_code=200, headers=quota.headers(), media_type="application/json")


async def remaining_credits(request: Request) -> Response:
    account, quota = await authorize(request)
    balance = await services(request).accounts.balance(account)
    return json_response(credits_json(balance), 200, quota)


async def list_models(request: Request) -> Response:
    _, quota = await authorize(request)
    registry = services(request).registry
    results = []
    for spec in registry.catalog.values():
        provider = registry.providers.get(spec.provider)
        results.append(
            ModelInfo(
                name=spec.name,
                provider=spec.provider,
                available=bool(provider and provider.available()),
                capabilities=sorted(spec.capabilities),
                input_price_per_million_usd=spec.input_price,
                output_price_per_million_usd=spec.output_price,
                max_output_tokens=spec.max_output_tokens,
                default_output_tokens=spec.default_output_tokens,
            )
        )
    return json_response(ModelList(results=results).model_dump(), 200, quota)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    ready, checks = await readiness(services(request))
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return JSONResponse(
        body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"}
    )


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def docs(request: Request) -> Response:
    from textgen.http.openapi import docs_html

    return HTMLResponse(docs_html(request.app.state.openapi))
