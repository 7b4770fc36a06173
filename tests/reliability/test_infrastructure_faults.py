"""Faults below the service: a locked SQLite file, PostgreSQL connections killed, Redis gone, a webhook
receiver that is down, and the server SIGKILLed mid-batch. Clients never get a 500; afterwards every task
is finished and the credits reconcile."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import free_socket, run_server, serve_app
from tests.fakes.fake_gemini import FakeGemini, Fault
from tests.fakes.providers import FakeProvider
from tests.pgdb import ADMIN_DSN, pg_template, pg_url  # noqa: F401 (fixtures)
from tests.processes import bootstrap_credentials, free_port, textgen_env, textgen_process
from tests.reliability.conftest import (
    PLENTY,
    UNLIMITED,
    BackgroundLoop,
    assert_books_balance,
    reliability_settings,
)

CREATE = "/sse/text_generator/"
BODY: dict[str, Any] = {"model_name": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def unused_url() -> str:
    sock = free_socket()  # bound, never listening: connections are refused
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@pytest.mark.timeout(120)
async def test_sqlite_write_lock_held_elsewhere_gives_503_then_recovers(tmp_path: Path) -> None:
    settings = reliability_settings(tmp_path, unused_url())
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account(credits=PLENTY, rate_limit=UNLIMITED)
        async with server.client(account) as client:
            assert (await client.post(CREATE, json={**BODY, "sync": True})).status_code == 201
            holder = sqlite3.connect(tmp_path / "textgen.db", isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
            try:
                blocked = await client.post(CREATE, json={**BODY, "sync": True})
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            assert blocked.status_code == 503, blocked.text
            assert int(blocked.headers["Retry-After"]) >= 1
            assert set(blocked.json()) == {"error"}
            # A lock released within the busy timeout is waited out: the request succeeds.
            holder = sqlite3.connect(tmp_path / "textgen.db", isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
            asyncio.get_running_loop().call_later(0.5, lambda: (holder.execute("ROLLBACK"), holder.close()))
            waited = await client.post(CREATE, json={**BODY, "sync": True})
            assert waited.status_code == 201 and waited.json()["status"] == "done", waited.text
            created = await client.post(CREATE, json=BODY)
            assert created.status_code == 201
        await assert_books_balance(server.services, account, PLENTY)


async def test_postgres_connections_killed_gives_503_or_success_then_recovers(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    settings = reliability_settings(tmp_path, unused_url(), database_url=pg_url)
    database = pg_url.rsplit("/", 1)[1]
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account(credits=PLENTY, rate_limit=UNLIMITED)
        async with server.client(account) as client:
            ids = [(await client.post(CREATE, json=BODY)).json()["id"] for _ in range(5)]
            statuses = []
            for round_ in range(3):
                admin = await asyncpg.connect(ADMIN_DSN)
                try:
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = $1 AND pid <> pg_backend_pid()",
                        database,
                    )
                finally:
                    await admin.close()
                for _ in range(5):
                    response = await client.post(CREATE, json={**BODY, "sync": round_ % 2 == 0})
                    statuses.append(response.status_code)
                    assert response.status_code in (201, 503), response.text
                    if response.status_code == 503:
                        assert set(response.json()) == {"error"} and "Retry-After" in response.headers
                    else:
                        ids.append(response.json()["id"])
            assert statuses[-1] == 201, statuses  # recovered
            for task_id in ids:
                assert (await server.wait_for(account, task_id))["status"] == "done"
        await assert_books_balance(server.services, account, PLENTY)


async def test_redis_down_requests_are_still_served(tmp_path: Path) -> None:
    sock = free_socket()  # nothing listens: every Redis call fails fast
    redis_url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    try:
        settings = reliability_settings(tmp_path, unused_url(), redis_url=redis_url)
        async with run_server(settings, {"fake": FakeProvider()}) as server:
            account = await server.account(credits=PLENTY, rate_limit=3)
            async with server.client(account) as client:
                served = [await client.post(CREATE, json={**BODY, "sync": True}) for _ in range(3)]
                assert [r.status_code for r in served] == [201, 201, 201]
                limited = await client.post(CREATE, json=BODY)
                # Limits still hold, per process, while Redis is away.
                assert limited.status_code == 429 and "Retry-After" in limited.headers
                ready = (await client.get("/readyz")).json()
                assert ready["checks"]["rate_limits"] == "memory (redis unreachable)"
            await assert_books_balance(server.services, account, PLENTY)
    finally:
        sock.close()


async def test_webhook_receiver_down_then_up_gets_the_delivery_once(tmp_path: Path) -> None:
    received: list[bytes] = []

    async def receiver(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        message = await receive()
        received.append(message.get("body", b""))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    settings = reliability_settings(
        tmp_path,
        unused_url(),
        webhook_schedule="0,0.3,0.3,0.3,0.3,0.3,0.3,0.3",
        webhook_jitter=0.0,
        webhook_poll_seconds=0.1,
    )
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account(credits=PLENTY, rate_limit=UNLIMITED)
        async with server.client(account) as client:
            hook = f"http://127.0.0.1:{port}/hook"
            task = (await client.post(CREATE, json={**BODY, "sync": True, "webhook_url": hook})).json()
            assert task["status"] == "done"
            deliveries_url = f"{CREATE}{task['id']}/webhooks/"
            for _ in range(100):
                view = (await client.get(deliveries_url)).json()
                if view["results"] and view["results"][0]["attempts"]:
                    break
                await asyncio.sleep(0.05)
            first = view["results"][0]
            assert first["status"] == "pending" and first["attempts"][0]["status_code"] is None
            # The receiver comes up on the same port; the retry schedule delivers it.
            import uvicorn

            up = uvicorn.Server(uvicorn.Config(receiver, host="127.0.0.1", port=port, log_level="warning"))
            serving = asyncio.create_task(up.serve())
            try:
                for _ in range(200):
                    view = (await client.get(deliveries_url)).json()
                    if view["results"][0]["status"] != "pending":
                        break
                    await asyncio.sleep(0.05)
            finally:
                up.should_exit = True
                await serving
            assert view["results"][0]["status"] == "delivered", view
            assert len(received) == 1 and task["id"].encode() in received[0]
        await assert_books_balance(server.services, account, PLENTY)


def test_sigkill_during_a_batch_of_async_tasks_settles_everything_after_restart(tmp_path: Path) -> None:
    fake = FakeGemini()
    for _ in range(12):
        fake.add_fault(Fault(delay=0.5))  # slow enough that the kill lands mid-generation
    loop = BackgroundLoop()
    stack = AsyncExitStack()
    try:
        _sigkill_batch(tmp_path, fake, loop.run(stack.enter_async_context(serve_app(fake.app))))
    finally:
        loop.run(stack.aclose())
        loop.close()


def _sigkill_batch(tmp_path: Path, fake: FakeGemini, upstream: str) -> None:
    port = free_port()
    db = tmp_path / "crash.db"
    env = textgen_env(
        TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{db}",
        TEXTGEN_LEASE_SECONDS="2",
        TEXTGEN_LOG_LEVEL="warning",
        TEXTGEN_WORKER_POLL_SECONDS="0.1",
        TEXTGEN_DEFAULT_RATE_LIMIT="100000",
        TEXTGEN_DEFAULT_CREDITS="1000",
        TEXTGEN_GEMINI_BASE_URL=upstream,
        TEXTGEN_GEMINI_RETRY_INITIAL_DELAY_SECONDS="0.01",
        GEMINI_API_KEY="test-key",
    )
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    body = {
        "model_name": "gemini-2.5-flash",
        "messages": [{"role": "user", "content": "hi"}],
        "config": {"max_output_tokens": 32},
    }
    with textgen_process("serve", "--port", str(port), env=env, log=log, port=port) as first:
        api_id, api_key = bootstrap_credentials(log)
        headers = {"X-API-ID": api_id, "X-API-KEY": api_key}
        ids = [
            httpx.post(f"{url}{CREATE}", json=body, headers=headers, timeout=30).json()["id"]
            for _ in range(12)
        ]
        for _ in range(200):
            if len(fake.received) >= 2:
                break
            time.sleep(0.05)
        assert len(fake.received) >= 2  # generations are in flight
        first.send_signal(signal.SIGKILL)
        first.wait()
    with sqlite3.connect(db) as conn:
        unfinished = conn.execute(
            "SELECT count(*) FROM tasks WHERE status IN ('pending', 'running')"
        ).fetchone()
    assert unfinished[0] > 0
    with textgen_process("serve", "--port", str(port), env=env, log=log, port=port):
        for _ in range(600):
            tasks = [httpx.get(f"{url}{CREATE}{i}/", headers=headers).json() for i in ids]
            if all(t["status"] in ("done", "failed") for t in tasks):
                break
            time.sleep(0.1)
        assert all(t["status"] == "done" for t in tasks), [t["status"] for t in tasks]
        remaining = httpx.get(f"{url}/api/remaining_credits/", headers=headers).json()["remaining_credits"]
    with sqlite3.connect(db) as conn:
        balance, total = conn.execute(
            "SELECT a.balance, (SELECT SUM(amount) FROM ledger l WHERE l.account_id = a.id) FROM accounts a"
        ).fetchone()
        settles = conn.execute(
            "SELECT task_id, count(*) FROM ledger WHERE kind IN ('settle', 'release') GROUP BY task_id"
        ).fetchall()
        charged = conn.execute("SELECT sum(credits_used) FROM tasks").fetchone()[0]
    assert balance == total  # the ledger sums to the balance
    assert sorted(t for t, _ in settles) == sorted(ids) and all(n == 1 for _, n in settles)  # settled once
    assert balance == 1000 * 1_000_000 - charged
    assert abs(remaining - balance / 1e6) < 1e-9
