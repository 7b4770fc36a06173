"""The one error shape, ``{"error": "..."}``, for every failure the API can answer with."""

from __future__ import annotations

import logging
import math
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from textgen import limits, metrics
from textgen.errors import TextgenError
from textgen.http.responses import JSONResponse

log = logging.getLogger("textgen.http")

_TYPE_LOCS = {"str", "int", "float", "bool", "list", "dict", "none"}
_PART_TAGS = {"text", "image", "video"}  # the "type" of a content part, which pydantic puts in the location
_TAG_ERRORS = {"union_tag_invalid", "union_tag_not_found"}


def _loc(parts: tuple[Any, ...], enclosing: set[str] | None = None) -> str:
    """The location as the client wrote it; adds each enclosing location to ``enclosing``."""
    out = ""
    shown: list[Any] = []
    for part in parts:
        if isinstance(part, int):
            piece = f"[{part}]"
        else:
            text = str(part)
            if "[" in text or text in _TYPE_LOCS or text.startswith("function-"):
                continue
            if (
                text in _PART_TAGS
                and len(shown) >= 2
                and isinstance(shown[-1], int)
                and shown[-2] == "content"
            ):
                shown.append(None)  # the union member pydantic tried (the part's "type"), not a field
                continue
            piece = f".{text}" if out else text
        shown.append(part)
        if out and enclosing is not None:
            enclosing.add(out)
        out += piece
    return out


def _field_of(error: Any) -> tuple[Any, ...]:
    loc: tuple[Any, ...] = error["loc"]
    # A content part without a known "type": the field at fault is its "type".
    return (*loc, "type") if error["type"] in _TAG_ERRORS else loc


def _message(error: Any) -> str:
    if error["type"] == "union_tag_not_found":
        return "Field required"
    return str(error["msg"]).removeprefix("Value error, ")


def describe_validation(exc: ValidationError) -> str:
    """A readable message naming each offending field (``messages[0].role: ...``)."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        detail = next(e for e in errors if e["type"] == "json_invalid")["msg"]
        return f"invalid JSON body: {detail}"
    # For a str-or-list field pydantic reports every branch of the union; an error about the whole
    # field is noise when another error points inside it (the branch the client actually used).
    # Every location's enclosing locations go in one set, so the filter is linear in the errors; only the
    # first errors are examined (pydantic reports a field's branches together), the rest are counted.
    examined = errors[: limits.MAX_EXAMINED_ERRORS]
    enclosing: set[str] = set()
    located = [(_loc(_field_of(e), enclosing), _message(e)) for e in examined]
    kept = [(where, msg) for where, msg in located if where not in enclosing]
    messages = list(dict.fromkeys(f"{where or 'request body'}: {msg}" for where, msg in kept))
    shown = limits.MAX_DESCRIBED_ERRORS
    rest = len(messages) - shown + len(errors) - len(examined)
    more = f" (and {rest} more)" if rest > 0 else ""
    return "; ".join(messages[:shown]) + more


def error_response(exc: Exception, request_id: str | None = None) -> Response:
    if isinstance(exc, TextgenError):
        metrics.refused(exc)
        status = exc.status_code
        headers = dict(exc.headers)
        if status in (429, 503) and "Retry-After" not in headers:
            retry_after = getattr(exc, "retry_after", None)
            headers["Retry-After"] = str(max(1, math.ceil(retry_after or 1)))
        if status >= 500:
            log.warning("request %s: %s %s", request_id, type(exc).__name__, exc.message)
        return JSONResponse({"error": exc.message}, status_code=status, headers=headers)
    if isinstance(exc, ValidationError):
        return JSONResponse({"error": describe_validation(exc)}, status_code=400)
    if isinstance(exc, HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            detail = "not found"
        elif exc.status_code == 405:
            detail = "method not allowed"
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)
    log.error("request %s: unhandled %s", request_id, type(exc).__name__, exc_info=exc)
    return JSONResponse({"error": f"internal error (request id {request_id})"}, status_code=500)


async def handle(request: Request, exc: Exception) -> Response:
    return error_response(exc, request.scope.get("state", {}).get("request_id"))
