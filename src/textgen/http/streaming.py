"""``POST /sse/text_generator/stream/``: Server-Sent Events of Gemini-native chunks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from textgen.http.routes import authorize, read_body, services
from textgen.protocol import StreamRequest

TASK_ID_HEADER = "X-Textgen-Task-Id"


async def stream_task(request: Request) -> Response:
    account, quota = await authorize(request)
    payload = StreamRequest.model_validate_json(await read_body(request))
    svc = services(request)
    session = await svc.streams.open(account, payload)

    async def body() -> AsyncIterator[ServerSentEvent]:
        completed = False
        # The task id from the first byte (a comment, which Gemini-native clients ignore) and in a header.
        yield ServerSentEvent(comment=f"task {session.task.id}", sep="\n")
        try:
            async for event in session.events():
                yield ServerSentEvent(
                    data=json.dumps(event.data, separators=(",", ":")), event=event.event, sep="\n"
                )
            completed = True
        finally:
            if not completed:
                # Cancelled by a client disconnect (or server shutdown): the cleanup must not be cancelled too.
                with anyio.CancelScope(shield=True):
                    await session.abort()

    # sse-starlette sends keep-alive comments while the generator is silent and watches for the
    # client's disconnect, cancelling the generator at once (which reaches the provider via abort()).
    return EventSourceResponse(
        body(),
        ping=svc.settings.stream_keepalive_seconds,
        headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            TASK_ID_HEADER: session.task.id,
            **quota.headers(),
        },
        sep="\n",
    )
