"""``POST /sse/text_generator/stream/``: Server-Sent Events of Gemini-native chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from textgen import idempotency, jsoncodec
from textgen.errors import Conflict, TextgenError
from textgen.http.routes import authorize, read_body, services
from textgen.protocol import StreamRequest
from textgen.ratelimit import Quota
from textgen.services import Services
from textgen.storage.rows import AccountRow
from textgen.streaming import StreamEvent, replayed_events

TASK_ID_HEADER = "X-Textgen-Task-Id"


def _encode(event: StreamEvent) -> bytes:
    """One event as it goes on the wire. Built here rather than as a ``ServerSentEvent``, which scans its
    data for line breaks: compact JSON has none (a line break inside a string is escaped)."""
    data = b"data: " + jsoncodec.dumps(event.data) + b"\n\n"
    return data if event.event is None else b"event: " + event.event.encode() + b"\n" + data


def _comment(text: str) -> bytes:
    return b": " + text.encode() + b"\n\n"


async def stream_task(request: Request) -> Response:
    account, quota = await authorize(request)
    key = idempotency.check_key(request.headers.get(idempotency.HEADER))
    raw = await read_body(request)
    payload = StreamRequest.model_validate_json(raw)
    svc = services(request)
    if key is None:
        session = await svc.streams.open(account, payload)
    else:
        claim = await svc.idempotency.begin(account, key, "stream", raw)
        if isinstance(claim, idempotency.Replay):
            return await _replay(svc, account, quota, claim)
        try:
            session = await svc.streams.open(account, payload, idempotency_key=key)
        except TextgenError:
            await svc.idempotency.release(claim)
            raise
        await svc.idempotency.complete(claim, 200, "")  # replayed from the task, once it has finished

    async def body() -> AsyncIterator[bytes]:
        completed = False
        # The task id from the first byte (a comment, which Gemini-native clients ignore) and in a header.
        yield _comment(f"task {session.task.id}")
        try:
            async for event in session.events():
                yield _encode(event)
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


async def _replay(svc: Services, account: AccountRow, quota: Quota, claim: idempotency.Replay) -> Response:
    """A repeat of a stream's Idempotency-Key: the finished task's answer as one chunk (409 while it runs)."""
    assert claim.task_id is not None
    task = await svc.tasks.get(account, claim.task_id)
    if not task.status.finished:
        raise Conflict(f"Idempotency-Key: its stream (task {task.id}) is still running; retry once it ends")

    async def body() -> AsyncIterator[bytes]:
        yield _comment(f"task {task.id}")
        for event in replayed_events(task):
            yield _encode(event)

    headers = {
        "Cache-Control": "no-cache",
        TASK_ID_HEADER: task.id,
        idempotency.REPLAYED_HEADER: "true",
        **quota.headers(),
    }
    return EventSourceResponse(body(), headers=headers, sep="\n")
