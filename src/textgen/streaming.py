"""Streaming generations: a task that is created running, relayed chunk by chunk, then settled.

Everything that can be refused is refused before the first byte of the response: ``Streams.open`` admits
the request, reserves credits, creates the task and pulls the provider's first chunk, so an upstream that
fails at once becomes an ordinary HTTP error. The generation runs under a ``Lease`` of the one lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from textgen.catalog import from_micro
from textgen.errors import Conflict, TextgenError, UpstreamError
from textgen.lifecycle import Lease, Lifecycle
from textgen.protocol import StreamRequest
from textgen.providers import FunctionCall, Generation, StreamChunk
from textgen.states import TaskMode, TaskStatus
from textgen.storage.rows import AccountRow, Outcome, TaskRow
from textgen.tasks import TaskService
from textgen.timing import add_upstream

log = logging.getLogger("textgen.streaming")

CLIENT_DISCONNECTED = "client disconnected"


def gemini_chunk(chunk: StreamChunk, model: str, response_id: str) -> dict[str, Any]:
    """A Gemini-native ``GenerateContentResponse`` (camelCase) for one chunk."""
    if chunk.raw is not None:
        return dict(chunk.raw)
    parts: list[dict[str, Any]] = []
    if chunk.text:
        parts.append({"text": chunk.text})
    for call in chunk.function_calls:
        part: dict[str, Any] = {"functionCall": {"name": call.name, "args": call.args}}
        if call.thought_signature:
            part["thoughtSignature"] = call.thought_signature
        parts.append(part)
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if chunk.finish_reason:
        candidate["finishReason"] = chunk.finish_reason
    return {
        "candidates": [candidate],
        "usageMetadata": {
            "promptTokenCount": chunk.input_tokens,
            "candidatesTokenCount": chunk.output_tokens,
            "totalTokenCount": chunk.input_tokens + chunk.output_tokens,
        },
        "modelVersion": chunk.model_version or model,
        "responseId": response_id,
    }


@dataclass
class _Accumulated:
    text: list[str] = field(default_factory=list)
    calls: list[FunctionCall] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None

    def add(self, chunk: StreamChunk) -> None:
        self.text.append(chunk.text)
        self.calls.extend(chunk.function_calls)
        if chunk.input_tokens or chunk.output_tokens:  # the last counts reported are the running totals
            self.input_tokens, self.output_tokens = chunk.input_tokens, chunk.output_tokens
        self.finish_reason = chunk.finish_reason or self.finish_reason

    def generation(self) -> Generation:
        return Generation(
            text="".join(self.text),
            function_calls=list(self.calls),
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            finish_reason=self.finish_reason or "STOP",
        )


@dataclass(frozen=True, slots=True)
class StreamEvent:
    data: dict[str, Any]
    event: str | None = None


class Streams:
    """Opens streamed generations."""

    def __init__(self, tasks: TaskService, lifecycle: Lifecycle) -> None:
        self.tasks = tasks
        self.lifecycle = lifecycle

    async def open(
        self, account: AccountRow, request: StreamRequest, idempotency_key: str | None = None
    ) -> StreamSession:
        """Admit, reserve and start the generation; raises TextgenError before any byte is sent."""
        task, admission = await self.tasks.open_task(
            account, request, TaskMode.STREAM, idempotency_key=idempotency_key
        )
        # Held from the start: a slow first chunk must not let another worker take the task over.
        lease = self.lifecycle.lease(task, admission.spec)
        opening = asyncio.current_task()
        if opening is not None:
            lease.on_cancel = opening.cancel
        chunks = admission.provider.stream(admission.spec, request, account=str(account.id)).__aiter__()
        try:
            first: StreamChunk | None = await chunks.__anext__()
            lease.first_chunk()
        except StopAsyncIteration:
            first = None
        except BaseException as exc:
            add_upstream(lease.stop())
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]
            if isinstance(exc, asyncio.CancelledError):
                if lease.cancel_requested and opening is not None and opening.uncancel() == 0:
                    await lease.settle(Outcome.failed(lease.stop_reason))
                    if lease.timed_out:
                        raise UpstreamError(
                            f"task {task.id} {lease.stop_reason}, before its first chunk", status_code=504
                        ) from None
                    raise Conflict(f"task {task.id} was cancelled before its first chunk") from None
                await lease.settle(Outcome.failed(CLIENT_DISCONNECTED))
                raise
            outcome = self.lifecycle.failure(task, exc)
            await lease.settle(outcome)
            if isinstance(exc, TextgenError):
                raise
            raise UpstreamError(outcome.failed_reason) from exc
        add_upstream(lease.elapsed())
        lease.on_cancel = None  # from here on the session stops it
        return StreamSession(self.lifecycle, lease, chunks, first)


class StreamSession:
    """One streamed generation, from its first chunk to settlement."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        lease: Lease,
        chunks: AsyncIterator[StreamChunk],
        first: StreamChunk | None,
    ) -> None:
        self._lifecycle = lifecycle
        self._lease = lease
        self.task: TaskRow = lease.task
        self._chunks = chunks
        self._first = first
        self._acc = _Accumulated()

    async def events(self) -> AsyncIterator[StreamEvent]:
        """Gemini-native chunks; the last also carries ``creatify: {id, credits_used}``.

        A cancel stops the relay before the next chunk: the task is settled for what was produced and the
        stream ends with an error event saying so.
        """
        held: StreamChunk | None = None
        relaying = asyncio.current_task()
        if relaying is not None:
            self._lease.on_cancel = relaying.cancel
            if self._lease.cancel_requested:
                relaying.cancel()
        try:
            pending = [self._first] if self._first is not None else []
            while True:
                if pending:
                    chunk = pending.pop()
                else:
                    try:
                        chunk = await self._chunks.__anext__()
                    except StopAsyncIteration:
                        break
                self._acc.add(chunk)
                if held is not None:  # something followed a finishing chunk: it was not the last after all
                    yield StreamEvent(gemini_chunk(held, self.task.model_name, self.task.id))
                    held = None
                # Every chunk goes out as it arrives, except the one that finishes the generation: it waits for
                # the settlement so that it can carry the credits actually charged.
                if chunk.finish_reason:
                    held = chunk
                else:
                    yield StreamEvent(gemini_chunk(chunk, self.task.model_name, self.task.id))
        except asyncio.CancelledError:
            if not (self._lease.cancel_requested and relaying is not None and relaying.uncancel() == 0):
                raise  # the client went away (abort settles) or the server stops
            with contextlib.suppress(Exception):
                await self._chunks.aclose()  # type: ignore[attr-defined]
            finished = await self._lease.settle(
                self._lifecycle.stopped(self.task, self._acc.generation(), self._lease.stop_reason)
            )
            if self._lease.timed_out:
                yield self._error_event(f"task {self.task.id} {self._lease.stop_reason}", 504, finished)
            else:
                yield self._error_event(f"task {self.task.id} was cancelled", 409, finished)
            return
        except Exception as exc:
            outcome = self._lifecycle.failure(self.task, exc, self._acc.generation())
            finished = await self._lease.settle(outcome)
            # A finishing chunk, then an error after it (Gemini's raw JSON tail): the chunk is relayed first.
            if held is not None:
                yield StreamEvent(gemini_chunk(held, self.task.model_name, self.task.id))
            status = getattr(exc, "status_code", 502) if isinstance(exc, TextgenError) else 502
            yield self._error_event(outcome.failed_reason, status, finished)
            return
        finished = await self._lease.settle(
            self._lifecycle.outcome(self.task.model_name, self._acc.generation())
        )
        last = held or StreamChunk(
            finish_reason="STOP", input_tokens=self._acc.input_tokens, output_tokens=self._acc.output_tokens
        )
        data = gemini_chunk(last, self.task.model_name, self.task.id)
        credits = from_micro(finished.credits_used) if finished else 0.0
        data["creatify"] = {"id": self.task.id, "credits_used": credits}
        yield StreamEvent(data)

    def _error_event(self, message: str, status: int, finished: TaskRow | None) -> StreamEvent:
        """The event that ends a failed stream, with what the task was charged for what it sent."""
        credits = from_micro(finished.credits_used) if finished else 0.0
        return StreamEvent(
            {
                "error": {"code": status, "message": message},
                "creatify": {"id": self.task.id, "credits_used": credits},
            },
            event="error",
        )

    async def abort(self) -> None:
        """The client went away (or a cancel stopped the relay): stop the generation and charge only the
        tokens produced so far."""
        if self._lease.settled:
            return
        with contextlib.suppress(Exception):
            await self._chunks.aclose()  # type: ignore[attr-defined]
        reason = self._lease.stop_reason if self._lease.cancel_requested else CLIENT_DISCONNECTED
        await self._lease.settle(self._lifecycle.stopped(self.task, self._acc.generation(), reason))


def replayed_events(task: TaskRow) -> list[StreamEvent]:
    """A finished stream told again to a repeat of its Idempotency-Key: its whole answer as one chunk."""
    if task.status == TaskStatus.FAILED:
        return [
            StreamEvent(
                {
                    "error": {"code": 502, "message": task.failed_reason},
                    "creatify": {"id": task.id, "credits_used": from_micro(task.credits_used)},
                },
                event="error",
            )
        ]
    chunk = StreamChunk(
        text=task.response_text,
        function_calls=[
            FunctionCall(
                name=call["name"],
                args=call.get("args", {}),
                id=call.get("id"),
                thought_signature=call.get("thought_signature"),
            )
            for call in task.response_function_calls
        ],
        input_tokens=task.input_tokens,
        output_tokens=task.output_tokens,
        finish_reason=task.finish_reason or "STOP",
    )
    data = gemini_chunk(chunk, task.model_name, task.id)
    data["creatify"] = {"id": task.id, "credits_used": from_micro(task.credits_used)}
    return [StreamEvent(data)]
