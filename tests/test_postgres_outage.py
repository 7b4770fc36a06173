"""A transient PostgreSQL outage: requests fail with 503 and Retry-After, then the service recovers by itself.

The app reaches PostgreSQL through a TCP proxy the test controls: cutting it drops every open connection and
refuses new ones, like a database restart or a network partition.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from tests.conftest import free_socket, make_settings, run_server
from tests.fakes.providers import FakeProvider
from tests.pgdb import pg_template, pg_url  # noqa: F401  (fixtures)
from textgen.settings import Settings

BODY: dict[str, Any] = {"model_name": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


class Proxy:
    """Forwards a loopback port to PostgreSQL until cut; restore() listens on the same port again."""

    def __init__(self, upstream_port: int = 5432) -> None:
        sock = free_socket()
        self.port: int = sock.getsockname()[1]
        sock.close()
        self.upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def restore(self) -> None:
        await self.start()


async def proxied(tmp_path: Path, models_file: Path, pg_url: str) -> tuple[Proxy, Settings]:  # noqa: F811
    """A started proxy to PostgreSQL, and settings that reach the test's database through it."""
    proxy = Proxy()
    await proxy.start()
    database = pg_url.rsplit("/", 1)[1]
    settings = make_settings(
        tmp_path,
        models_file=models_file,
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/{database}",
        worker_poll_seconds=0.1,
    )
    return proxy, settings


async def test_database_outage_gives_503_with_retry_after_then_recovers(
    tmp_path: Path,
    models_file: Path,
    pg_url: str,  # noqa: F811
) -> None:
    proxy, settings = await proxied(tmp_path, models_file, pg_url)
    try:
        async with run_server(settings, {"fake": FakeProvider()}) as server:
            account = await server.account()
            async with server.client(account) as client:
                assert (await client.get("/api/remaining_credits/")).status_code == 200
                await proxy.cut()
                for method, path, body in (
                    ("GET", "/api/remaining_credits/", None),
                    ("POST", "/sse/text_generator/", BODY),
                    ("POST", "/sse/text_generator/", {**BODY, "sync": True}),
                    ("GET", "/sse/text_generator/", None),
                ):
                    response = await client.request(method, path, json=body)
                    assert response.status_code == 503, (path, response.text)
                    assert int(response.headers["Retry-After"]) >= 1
                    assert set(response.json()) == {"error"}
                ready = await client.get("/readyz")
                assert ready.status_code == 503 and "Retry-After" in ready.headers
                assert (await client.get("/healthz")).status_code == 200

                await proxy.restore()
                # No restart: the pool reconnects on its own.
                for _ in range(200):
                    response = await client.get("/api/remaining_credits/")
                    if response.status_code == 200:
                        break
                    assert response.status_code == 503, response.text
                    await asyncio.sleep(0.05)
                assert response.status_code == 200
                assert (await client.get("/readyz")).status_code == 200
                created = await client.post("/sse/text_generator/", json=BODY)
                assert created.status_code == 201
            done = await server.wait_for(account, created.json()["id"], within=30)
            assert done["status"] == "done"
            summary = await server.services.storage.accounts.ledger_summary(account.id)
            assert summary.ledger_sum == summary.balance
    finally:
        with contextlib.suppress(AssertionError):
            await proxy.cut()


async def test_connections_that_died_while_idle_cost_no_request(
    tmp_path: Path,
    models_file: Path,
    pg_url: str,  # noqa: F811
) -> None:
    """The pool keeps no ping per checkout: a transaction that finds its pooled connection dead before
    COMMIT runs again on a fresh one, so a database restart between two requests is invisible to clients."""
    proxy, settings = await proxied(tmp_path, models_file, pg_url)
    try:
        async with run_server(settings, {"fake": FakeProvider()}) as server:
            account = await server.account()
            async with server.client(account) as client:
                # Several pooled connections, all idle afterwards.
                answers = await asyncio.gather(*(client.get("/api/remaining_credits/") for _ in range(6)))
                assert {a.status_code for a in answers} == {200}
                for round_ in range(3):
                    await proxy.cut()  # every pooled connection dies while idle
                    await proxy.restore()
                    credits = await client.get("/api/remaining_credits/")
                    assert credits.status_code == 200, (round_, credits.text)
                    created = await client.post("/sse/text_generator/", json={**BODY, "sync": True})
                    assert created.status_code == 201, (round_, created.text)
                    assert created.json()["status"] == "done"
            summary = await server.services.storage.accounts.ledger_summary(account.id)
            assert summary.ledger_sum == summary.balance
    finally:
        with contextlib.suppress(AssertionError):
            await proxy.cut()
