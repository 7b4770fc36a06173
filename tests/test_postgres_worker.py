"""The task worker on PostgreSQL: LISTEN/NOTIFY wake-ups, the polling fallback, leases kept by heartbeats."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg

from tests.conftest import Server, make_settings, run_server
from tests.fakes.providers import FakeProvider
from tests.pgdb import ADMIN_DSN, pg_template, pg_url  # noqa: F401  (fixtures)
from textgen.notify import APPLICATION_NAME

BODY: dict[str, Any] = {"model_name": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
NEVER = 3600.0  # a poll interval no test waits for: only a notification can wake the worker


async def wait_connected(server: Server) -> None:
    listener = server.services.listener
    assert listener is not None
    await asyncio.wait_for(listener.connected.wait(), 30)


async def create(server: Server, account: Any, body: dict[str, Any] = BODY) -> str:
    async with server.client(account) as client:
        response = await client.post("/sse/text_generator/", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


async def test_a_task_queued_by_another_process_wakes_an_idle_worker(
    tmp_path: Path,
    models_file: Path,
    pg_url: str,  # noqa: F811
) -> None:
    worker_side = make_settings(
        tmp_path, models_file=models_file, database_url=pg_url, worker_poll_seconds=NEVER
    )
    api_side = make_settings(tmp_path, models_file=models_file, database_url=pg_url)
    fake = FakeProvider()
    async with (
        run_server(worker_side, {"fake": fake}) as worker,
        run_server(api_side, {"fake": FakeProvider()}, run_worker=False) as api,
    ):
        await wait_connected(worker)
        await asyncio.sleep(0.2)  # the worker has claimed nothing and gone to sleep on its long poll
        account = await api.account()
        task_id = await create(api, account)
        done = await api.wait_for(account, task_id, within=30)
        assert done["status"] == "done"
        assert len(fake.calls) == 1
        listener = worker.services.listener
        assert listener is not None and listener.received >= 1


async def test_the_listener_reconnects_after_its_connection_is_killed(
    tmp_path: Path,
    models_file: Path,
    pg_url: str,  # noqa: F811
) -> None:
    settings = make_settings(
        tmp_path, models_file=models_file, database_url=pg_url, worker_poll_seconds=NEVER
    )
    async with (
        run_server(settings, {"fake": FakeProvider()}) as worker,
        run_server(settings, {"fake": FakeProvider()}, run_worker=False) as api,
    ):
        await wait_connected(worker)
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND application_name = $2",
                pg_url.rsplit("/", 1)[1],
                APPLICATION_NAME,
            )
        finally:
            await admin.close()
        assert killed >= 1
        listener = worker.services.listener
        assert listener is not None
        for _ in range(600):
            if not listener.connected.is_set():
                break
            await asyncio.sleep(0.05)
        await wait_connected(worker)
        await asyncio.sleep(0.2)
        account = await api.account()
        task_id = await create(api, account)
        assert (await api.wait_for(account, task_id, within=30))["status"] == "done"


async def test_polling_still_finds_work_when_no_notification_arrives(
    tmp_path: Path,
    models_file: Path,
    pg_url: str,  # noqa: F811
) -> None:
    settings = make_settings(tmp_path, models_file=models_file, database_url=pg_url, worker_poll_seconds=0.2)
    async with (
        run_server(settings, {"fake": FakeProvider()}) as worker,
        run_server(settings, {"fake": FakeProvider()}, run_worker=False) as api,
    ):
        await wait_connected(worker)
        for task in worker.services.background:
            if task.get_name() == "textgen-listener":
                task.cancel()
        await asyncio.sleep(0.1)
        account = await api.account()
        task_id = await create(api, account)
        assert (await api.wait_for(account, task_id, within=30))["status"] == "done"


async def test_heartbeats_keep_a_long_task_with_its_first_worker(
    tmp_path: Path,
    models_file: Path,
    pg_url: str,  # noqa: F811
) -> None:
    # The generation outlives the lease several times over; two workers compete for expired leases.
    settings = make_settings(
        tmp_path, models_file=models_file, database_url=pg_url, lease_seconds=1.2, worker_poll_seconds=0.05
    )
    first, second = FakeProvider(delay=4), FakeProvider(delay=4)
    async with (
        run_server(settings, {"fake": first}) as one,
        run_server(settings, {"fake": second}) as two,
    ):
        account = await one.account()
        task_id = await create(one, account)
        done = await two.wait_for(account, task_id, within=60)
        assert done["status"] == "done"
        assert len(first.calls) + len(second.calls) == 1
        task = await one.services.storage.tasks.get(task_id)
        assert task.attempts == 1
        summary = await one.services.storage.accounts.ledger_summary(account.id)
        assert summary.ledger_sum == summary.balance


async def test_deliveries_wake_the_local_sender_in_process_and_others_by_notify(
    tmp_path: Path,
    models_file: Path,
    pg_url: str,  # noqa: F811
) -> None:
    from tests.test_webhooks import Receiver, serve_receiver
    from textgen.notify import DELIVERIES_CHANNEL, asyncpg_dsn

    # Neither process polls for deliveries: only an in-process wake-up or a NOTIFY can send one.
    worker_side = make_settings(
        tmp_path, models_file=models_file, database_url=pg_url, webhook_poll_seconds=NEVER
    )
    api_side = make_settings(
        tmp_path, models_file=models_file, database_url=pg_url, webhook_poll_seconds=NEVER
    )
    notified: list[str] = []
    watcher = await asyncpg.connect(asyncpg_dsn(pg_url))
    await watcher.add_listener(DELIVERIES_CHANNEL, lambda *args: notified.append(args[2]))
    receiver = Receiver()
    try:
        async with (
            serve_receiver(receiver) as url,
            run_server(worker_side, {"fake": FakeProvider()}) as worker,
            run_server(api_side, {"fake": FakeProvider()}, run_worker=False) as api,
        ):
            await wait_connected(worker)
            account = await api.account()
            task_id = await create(api, account, {**BODY, "webhook_url": f"{url}/hook"})
            for _ in range(600):
                if receiver.seen:
                    break
                await asyncio.sleep(0.05)
            # The worker that finished the task woke its own sender; no other process was disturbed.
            assert len(receiver.seen) == 1
            assert notified == []

            # A redelivery queued by the API process, which sends nothing itself, goes out by NOTIFY.
            async with api.client(account) as client:
                queued = await client.post(f"/sse/text_generator/{task_id}/webhooks/redeliver/")
                assert queued.status_code in (200, 201, 202), queued.text
            for _ in range(600):
                if len(receiver.seen) == 2:
                    break
                await asyncio.sleep(0.05)
            assert len(receiver.seen) == 2
            assert notified == [DELIVERIES_CHANNEL]
    finally:
        await watcher.close()


async def test_pooled_connections_that_died_are_replaced_before_use(
    tmp_path: Path,
    models_file: Path,
    pg_url: str,  # noqa: F811
) -> None:
    from sqlalchemy.engine import make_url

    settings = make_settings(tmp_path, models_file=models_file, database_url=pg_url)
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account()
        async with server.client(account) as client:
            for _ in range(3):
                assert (await client.get("/api/remaining_credits/")).status_code == 200
            admin = await asyncpg.connect(ADMIN_DSN)
            try:
                killed = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    make_url(pg_url).database,
                )
            finally:
                await admin.close()
            assert killed >= 1
            # Every pooled connection is dead, and none reaches a request: each is pinged and replaced.
            for _ in range(3):
                response = await client.get("/api/remaining_credits/")
                assert response.status_code == 200, response.text
