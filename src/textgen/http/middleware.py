"""Pure ASGI middleware: request ids, the body size limit and the overhead header."""

from __future__ import annotations

import logging
import time

from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textgen import ids, metrics
from textgen.errors import PayloadTooLarge, ServiceUnavailable
from textgen.http.errors import error_response
from textgen.timing import RequestTiming, current_timing

log = logging.getLogger("textgen.http")


class RequestContextMiddleware:
    """Tags each request with an id, enforces the body limit and reports textgen's own time.

    ``x-textgen-overhead-ms`` is the time from receiving the request to sending the response head,
    minus the time spent waiting on the model provider.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, bodies_budget_bytes: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Request bodies this process holds at once (each from its first byte, or its Content-Length, until
        # its answer is sent): a request that would take the sum past the budget is answered 503.
        self.bodies_budget_bytes = bodies_budget_bytes
        self.bodies_bytes = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = ids.random_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        timing = RequestTiming()
        token = current_timing.set(timing)
        limit = self.max_body_bytes
        answered = False

        async def send_with_headers(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                overhead = max(time.perf_counter() - started - timing.upstream_seconds, 0.0)
                headers["x-textgen-overhead-ms"] = f"{overhead * 1000:.3f}"
                answered = True
                metrics.request_answered(scope, message["status"], overhead)
            await send(message)

        received = 0
        held = 0  # bytes of the budget this request holds

        def hold(size: int) -> None:
            nonlocal held
            budget = self.bodies_budget_bytes
            if budget is not None and size > held:
                if self.bodies_bytes + size - held > budget:
                    raise ServiceUnavailable(
                        "the server is reading as many request bodies as its memory budget allows "
                        f"(TEXTGEN_REQUEST_BODIES_BUDGET_BYTES, {budget} bytes); retry shortly"
                    )
                self.bodies_bytes += size - held
                held = size

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body is larger than the {limit} byte limit")
                hold(received)
            return message

        try:
            declared = _declared_length(scope)
            if declared > limit:  # refused before reading any of it
                raise PayloadTooLarge(f"request body is larger than the {limit} byte limit")
            hold(declared)  # a body that says its length holds it from the start
            await self.app(scope, limited_receive, send_with_headers)
        except ClientDisconnect:
            # The client went away before sending its whole body: expected, and there is nobody to answer.
            log.info("request %s: client disconnected before the request body was complete", request_id)
        except Exception as exc:
            if answered:  # the response has started: the server can only close the connection
                raise
            # Answered here, not by the outermost error handler, so the 500 carries the headers too.
            await error_response(exc, request_id)(scope, receive, send_with_headers)
        finally:
            self.bodies_bytes -= held
            current_timing.reset(token)


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
