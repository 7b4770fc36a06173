"""The memory budget of request bodies in flight (TEXTGEN_REQUEST_BODIES_BUDGET_BYTES), over raw sockets: two
slow uploads that together pass it, and a chunked one that passes it while being read, each body within the
size limit (which the budget may not be below)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.conftest import Account, Server, make_settings, run_server
from tests.fakes.providers import FakeProvider
from textgen.http.middleware import RequestContextMiddleware

BUDGET = 1000


def create_body(size: int) -> bytes:
    """A valid create request of exactly ``size`` bytes (JSON allows trailing spaces)."""
    body = json.dumps({"model_name": "fake-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
    return body + b" " * (size - len(body))


def head(account: Account, extra: str) -> bytes:
    return (
        "POST /sse/text_generator/ HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"X-API-ID: {account.api_id}\r\nX-API-KEY: {account.api_key}\r\n{extra}\r\n"
    ).encode()


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(server.url)
    return await asyncio.open_connection(url.hostname, url.port)


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], Any]:
    status_line = await reader.readline()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, json.loads(body)


def middleware(server: Server) -> RequestContextMiddleware:
    layer: Any = server.app.middleware_stack
    while not isinstance(layer, RequestContextMiddleware):
        layer = layer.app
    return layer


async def test_bodies_past_the_budget_are_503_until_it_frees(tmp_path: Path, models_file: Path) -> None:
    settings = make_settings(
        tmp_path, models_file=models_file, request_bodies_budget_bytes=BUDGET, max_body_bytes=BUDGET
    )
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account()
        body = create_body(800)
        # A slow upload: it says its length, sends a little, and holds 800 bytes of the budget meanwhile.
        slow_reader, slow = await connect(server)
        slow.write(head(account, f"Content-Length: {len(body)}\r\n") + body[:100])
        await slow.drain()
        budget = middleware(server)
        for _ in range(1000):
            if budget.bodies_bytes:
                break
            await asyncio.sleep(0.01)
        assert budget.bodies_bytes == 800

        # A second one would take the sum past the budget: refused before its body is read.
        reader, writer = await connect(server)
        writer.write(head(account, f"Content-Length: {len(body)}\r\n") + body)
        status, headers, error = await answer(reader)
        writer.close()
        assert status == 503, error
        assert set(error) == {"error"} and "TEXTGEN_REQUEST_BODIES_BUDGET_BYTES" in error["error"]
        assert headers["retry-after"] == "1"
        assert headers["x-request-id"] and "x-textgen-overhead-ms" in headers
        assert budget.bodies_bytes == 800

        # The slow one completes and is served; then its share is free again.
        slow.write(body[100:])
        status, _, created = await answer(slow_reader)
        slow.close()
        assert status == 201, created
        assert budget.bodies_bytes == 0
        reader, writer = await connect(server)
        writer.write(head(account, f"Content-Length: {len(body)}\r\n") + body)
        status, _, created = await answer(reader)
        writer.close()
        assert status == 201, created

        # A chunked body (no Content-Length) is counted as it arrives, and refused once past the budget: here
        # its first 300 bytes beside another slow upload's 800, though the whole body is within the size limit.
        slow_reader, slow = await connect(server)
        slow.write(head(account, f"Content-Length: {len(body)}\r\n") + body[:100])
        await slow.drain()
        for _ in range(1000):
            if budget.bodies_bytes:
                break
            await asyncio.sleep(0.01)
        assert budget.bodies_bytes == 800
        reader, writer = await connect(server)
        writer.write(head(account, "Transfer-Encoding: chunked\r\n"))
        big = create_body(600)
        for start in range(0, len(big), 300):
            piece = big[start : start + 300]
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        writer.write(b"0\r\n\r\n")
        status, headers, error = await answer(reader)
        writer.close()
        assert status == 503, error
        assert "TEXTGEN_REQUEST_BODIES_BUDGET_BYTES" in error["error"] and headers["retry-after"] == "1"
        assert budget.bodies_bytes == 800
        slow.close()  # leaves mid-body: its share is freed
        for _ in range(1000):
            if not budget.bodies_bytes:
                break
            await asyncio.sleep(0.01)
        assert budget.bodies_bytes == 0
        tasks = (await server.services.storage.tasks.list(account.id, limit=10))[0]
        assert len(tasks) == 2  # the two served; nothing for the refused ones
