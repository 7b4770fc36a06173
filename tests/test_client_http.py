"""The Python client's HTTP behaviour: retries, Retry-After, typed errors, interrupted streams, base URLs.

A loopback front answers the scripted statuses a healthy textgen rarely gives on demand (a 503, a 429 with a
one-second Retry-After, a connection dropped mid-answer) and passes every other request to a real textgen server.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import free_socket, run_server, serve_app
from tests.fakes.providers import FakeProvider
from textgen.settings import Settings
from textgen_client import (
    APIConnectionError,
    AsyncClient,
    Client,
    ConflictError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    StreamInterrupted,
    TextDelta,
    UnprocessableEntityError,
)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    at: float


@dataclass
class Front:
    """Answers from ``script`` first, then forwards to ``target``; ``rewrite`` edits forwarded JSON bodies."""

    target: str
    prefix: str = ""
    script: deque[Callable[[], Response]] = field(default_factory=deque)
    rewrite: Callable[[Any], Any] | None = None
    seen: list[Seen] = field(default_factory=list)

    async def handle(self, request: Request) -> Response:
        self.seen.append(Seen(request.method, request.url.path, dict(request.headers), time.monotonic()))
        if self.script:
            return self.script.popleft()()
        path = request.url.path.removeprefix(self.prefix)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with httpx.AsyncClient(base_url=self.target, timeout=30) as client:
            upstream = await client.request(
                request.method,
                path,
                params=request.query_params,
                content=await request.body(),
                headers=headers,
            )
        content = upstream.content
        if self.rewrite is not None and upstream.headers.get("content-type") == "application/json":
            content = json.dumps(self.rewrite(upstream.json())).encode()
        kept = {
            k: v
            for k, v in upstream.headers.items()
            if k.lower() not in ("content-length", "content-encoding")
        }
        return Response(content, status_code=upstream.status_code, headers=kept)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.handle, methods=["GET", "POST"])])


def error(status: int, message: str, **headers: str) -> Callable[[], Response]:
    return lambda: JSONResponse({"error": message}, status_code=status, headers=headers)


@asynccontextmanager
async def fronted(settings: Settings, prefix: str = "") -> AsyncIterator[tuple[Front, str, Any]]:
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account()
        front = Front(server.url, prefix)
        async with serve_app(front.app()) as url:
            yield front, url + prefix, account


def posts(front: Front) -> list[Seen]:
    return [s for s in front.seen if s.method == "POST"]


async def test_429_and_503_are_retried_after_their_retry_after(settings: Settings) -> None:
    async with fronted(settings) as (front, url, account):

        def busy_until_soon() -> Response:
            # An HTTP date two seconds ahead, in whole seconds: at least one second away when it is read.
            soon = email.utils.formatdate(time.time() + 2, usegmt=True)
            return JSONResponse({"error": "busy"}, status_code=503, headers={"Retry-After": soon})

        front.script.extend([error(429, "rate limit exceeded", **{"Retry-After": "1"}), busy_until_soon])
        async with AsyncClient(account.api_id, account.api_key, base_url=url) as client:
            task = await client.generate("fake-model", "persist")
            assert task.status == "done" and task.response_text == "echo: persist"
            # Exactly one task: the refused attempts created nothing.
            assert [t.id async for t in client.tasks.list()] == [task.id]
        attempts = posts(front)
        assert len(attempts) == 3
        assert attempts[1].at - attempts[0].at >= 1.0
        assert attempts[2].at - attempts[1].at >= 1.0


async def test_retries_stop_at_max_retries_and_raise_with_retry_after(settings: Settings) -> None:
    async with fronted(settings) as (front, url, account):
        front.script.extend(error(429, "slow down", **{"Retry-After": "0"}) for _ in range(3))
        front.script.extend(error(503, "down", **{"Retry-After": "120"}) for _ in range(1))
        with Client(account.api_id, account.api_key, base_url=url, max_retries=1) as client:
            with pytest.raises(RateLimitError) as limited:
                await asyncio.to_thread(client.remaining_credits)
            assert limited.value.retry_after == 0 and limited.value.message == "slow down"
            assert len(front.seen) == 2
            # The third scripted 429 is used by this call's first attempt, the 503 by its retry, whose
            # Retry-After is past max_retry_wait: raised at once, not slept through.
            with pytest.raises(ServiceUnavailableError) as unavailable:
                await asyncio.to_thread(client.remaining_credits)
            assert unavailable.value.retry_after == 120 and len(front.seen) == 4
            # Other errors are never retried.
            front.script.append(error(500, "boom"))
            with pytest.raises(ServerError):
                await asyncio.to_thread(client.remaining_credits)
            assert len(front.seen) == 5


async def test_503_without_retry_after_backs_off_then_succeeds(settings: Settings) -> None:
    async with fronted(settings) as (front, url, account):
        front.script.extend([error(503, "database unavailable"), error(503, "database unavailable")])
        async with AsyncClient(account.api_id, account.api_key, base_url=url) as client:
            assert await client.remaining_credits() == pytest.approx(100)
        assert len(front.seen) == 3


async def test_conflict_and_mismatch_errors_and_the_idempotency_headers(settings: Settings) -> None:
    async with (
        fronted(settings) as (front, url, account),
        AsyncClient(account.api_id, account.api_key, base_url=url) as client,
    ):
        front.script.append(error(409, "task already finished"))
        with pytest.raises(ConflictError) as conflict:
            await client.cancel("a1b2c3d4-5678-90ab-cdef-1234567890ab")
        assert conflict.value.status_code == 409 and conflict.value.message == "task already finished"
        assert front.seen[-1].path == "/sse/text_generator/a1b2c3d4-5678-90ab-cdef-1234567890ab/cancel/"

        front.script.append(error(422, "Idempotency-Key: reused with a different request body"))
        with pytest.raises(UnprocessableEntityError):
            await client.submit("fake-model", "x", idempotency_key="order-17")
        assert front.seen[-1].headers["idempotency-key"] == "order-17"

        task = await client.submit("fake-model", "y", idempotency_key="order-18")
        assert not task.replayed and front.seen[-1].headers["idempotency-key"] == "order-18"

        front.script.append(
            lambda: JSONResponse({**task.raw}, status_code=201, headers={"Idempotency-Replayed": "true"})
        )
        again = await client.submit("fake-model", "y", idempotency_key="order-18")
        assert again.replayed and again.id == task.id

        with pytest.raises(ValueError, match="idempotency_key"):
            await client.submit("fake-model", "z", idempotency_key="k" * 256)
        await client.stream("fake-model", "s", idempotency_key="stream-1").final()
        assert front.seen[-1].headers["idempotency-key"] == "stream-1"
        assert front.seen[-1].path == "/sse/text_generator/stream/"


async def test_next_links_are_followed_against_the_clients_own_base_url(settings: Settings) -> None:
    """Behind a proxy with a path prefix, whose server writes links to an address clients cannot reach."""

    def internal_links(body: Any) -> Any:
        if isinstance(body, dict) and body.get("next"):
            body["next"] = str(
                httpx.URL(body["next"]).copy_with(scheme="http", host="internal.invalid", port=81)
            )
        return body

    async with fronted(settings, prefix="/textgen") as (front, url, account):
        front.rewrite = internal_links
        async with AsyncClient(account.api_id, account.api_key, base_url=url + "/") as client:
            created = [await client.generate("fake-model", f"n{i}") for i in range(3)]
            listed = [t.id async for t in client.tasks.list(page_size=1)]
        assert listed == [t.id for t in reversed(created)]
        assert all(s.path.startswith("/textgen/") for s in front.seen)


@asynccontextmanager
async def raw_server(answer: bytes) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP server that reads a request, writes ``answer`` and hangs up; counts the connections."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    sock = free_socket()
    server = await asyncio.start_server(handle, sock=sock)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", connections
    finally:
        server.close()
        await server.wait_closed()


async def test_dropped_connections_are_retried_only_when_a_retry_cannot_repeat_a_side_effect() -> None:
    async with (
        raw_server(b"") as (url, connections),
        AsyncClient("id", "key", base_url=url, max_retries=2) as client,
    ):
        with pytest.raises(APIConnectionError):
            await client.submit("m", "no key: sent once")
        assert len(connections) == 1
        with pytest.raises(APIConnectionError):
            await client.submit("m", "with a key", idempotency_key="k1")
        assert len(connections) == 4
        with pytest.raises(APIConnectionError):
            await client.get("some-id")
        assert len(connections) == 7
    # Nothing listens: the request never left, so even a POST is retried.
    port = free_socket()
    closed_url = f"http://127.0.0.1:{port.getsockname()[1]}"
    port.close()
    attempts: list[int] = []

    async def count(request: httpx.Request) -> None:
        attempts.append(1)

    async with httpx.AsyncClient(event_hooks={"request": [count]}) as http:
        client = AsyncClient("id", "key", base_url=closed_url, max_retries=2, http_client=http)
        with pytest.raises(APIConnectionError):
            await client.submit("m", "refused")
    assert len(attempts) == 3


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-textgen-task-id: %s\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def chunked(text: str) -> bytes:
    data = text.encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


GEMINI_CHUNK = json.dumps(
    {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hel"}]}, "index": 0}]}
)


async def test_a_stream_cut_before_its_last_chunk_says_which_task_it_was() -> None:
    task_id = "a1b2c3d4-5678-90ab-cdef-1234567890ab"
    from_header = SSE_HEAD % task_id.encode() + chunked(f"data: {GEMINI_CHUNK}\n\n")
    async with raw_server(from_header) as (url, _):

        def read() -> tuple[list[object], StreamInterrupted, str | None]:
            events: list[object] = []
            with Client("id", "key", base_url=url) as client:
                stream = client.stream("m", "hi")
                with pytest.raises(StreamInterrupted) as cut:
                    events.extend(stream)
            return events, cut.value, stream.task_id

        events, interrupted, seen_id = await asyncio.to_thread(read)
    assert events == [TextDelta("Hel")]
    assert interrupted.task_id == task_id == seen_id and task_id in str(interrupted)

    from_comment = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 1000\r\n\r\n"
        + f": task {task_id}\n\ndata: {GEMINI_CHUNK}\n\n".encode()
    )
    async with raw_server(from_comment) as (url, _):
        async with AsyncClient("id", "key", base_url=url) as aclient:
            astream = aclient.stream("m", "hi")
            with pytest.raises(StreamInterrupted) as acut:
                await astream.final()
        assert acut.value.task_id == task_id == astream.task_id
