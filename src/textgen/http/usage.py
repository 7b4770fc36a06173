"""``GET /api/usage/``: an account's own usage, from its tasks and ledger."""

from __future__ import annotations

import datetime as dt

from starlette.requests import Request
from starlette.responses import Response

from textgen.errors import BadRequest
from textgen.http.admin import admin_service
from textgen.http.routes import authorize, json_response

GROUPS = ("day", "model")


def parse_instant(value: str, field: str, *, end: bool) -> dt.datetime:
    """An ISO 8601 date (``to`` includes that whole day) or date-time (without an offset: UTC)."""
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
            return start + dt.timedelta(days=1) if end else start
        moment = dt.datetime.fromisoformat(value)
        moment = moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        raise BadRequest(f"{field}: must be an ISO 8601 date (2025-01-31) or date-time") from None
    return moment


async def usage(request: Request) -> Response:
    account, quota = await authorize(request)
    query = request.query_params
    unknown = set(query) - {"from", "to", "group_by"}
    if unknown:
        raise BadRequest(f"unknown query parameter: {sorted(unknown)[0]}")
    group_by = query.get("group_by", "day")
    if group_by not in GROUPS:
        raise BadRequest("group_by: must be day or model")
    start = parse_instant(query["from"], "from", end=False) if "from" in query else None
    end = parse_instant(query["to"], "to", end=True) if "to" in query else None
    if start is not None and end is not None and start >= end:
        raise BadRequest("from: must be before to")
    report = await admin_service(request).usage(account.id, start, end, group_by)
    return json_response(report, 200, quota)
