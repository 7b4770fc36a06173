"""One heartbeat per process keeps every lease it holds: one renewal covers all its running tasks, a task whose
lease another worker took is abandoned (not settled here), and a cancel written by another process without a
notification is still obeyed. Driven over HTTP with a short lease."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from tests.conftest import Server, make_settings, run_server
from tests.fakes.providers import FakeProvider

FAKE = {"model_name": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}
LEASE_SECONDS = 0.3  # renewed every 0.1 s


def spy_on_renewals(server: Server) -> list[list[str]]:
    """The task ids of each renewal the process makes."""
    queue = server.services.storage.tasks
    real = queue.renew_leases
    calls: list[list[str]] = []

    async def renew_leases(task_ids: Any, worker_id: str, lease_seconds: float) -> dict[str, bool]:
        calls.append(list(task_ids))
        return await real(task_ids, worker_id, lease_seconds)

    queue.renew_leases = renew_leases  # type: ignore[method-assign]
    return calls


async def until(condition: Any) -> None:
    while True:
        if condition():
            return
        await asyncio.sleep(0.02)


def execute(db: Path, statement: str, *args: Any) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(statement, args)


async def test_one_renewal_covers_every_running_task_and_a_stolen_lease_is_abandoned(
    tmp_path: Path, models_file: Path
) -> None:
    settings = make_settings(tmp_path, models_file=models_file, lease_seconds=LEASE_SECONDS)
    fake = FakeProvider(gate=asyncio.Event())  # every generation runs until released
    async with run_server(settings, {"fake": fake}) as server:
        calls = spy_on_renewals(server)
        account = await server.account(credits=1000)
        async with server.client(account) as client:
            ids = [(await client.post("/sse/text_generator/", json=FAKE)).json()["id"] for _ in range(5)]
        running = server.services.lifecycle.running
        await asyncio.wait_for(until(lambda: len(running) == 5), 30)
        seen = len(calls)
        await asyncio.wait_for(until(lambda: len(calls) >= seen + 2), 30)
        assert all(sorted(call) == sorted(ids) for call in calls[seen:])  # each renewal: all five at once

        # Another worker takes the first task over (for an hour): this process stops generating it and settles
        # nothing.
        stolen = ids[0]
        execute(
            tmp_path / "textgen.db",
            "UPDATE tasks SET lease_owner = 'another-worker', lease_expires_at = datetime('now', '+1 hour') "
            "WHERE id = ?",
            stolen,
        )
        await asyncio.wait_for(until(lambda: stolen not in running), 30)
        fake.gate.set()  # type: ignore[union-attr]
        for task_id in ids[1:]:
            assert (await server.wait_for(account, task_id))["status"] == "done"
        with sqlite3.connect(tmp_path / "textgen.db") as conn:
            status, owner = conn.execute(
                "SELECT status, lease_owner FROM tasks WHERE id = ?", (stolen,)
            ).fetchone()
        assert (status, owner) == ("running", "another-worker")


async def test_a_cancel_written_without_a_notification_is_obeyed_at_the_next_renewal(
    tmp_path: Path, models_file: Path
) -> None:
    settings = make_settings(tmp_path, models_file=models_file, lease_seconds=LEASE_SECONDS)
    fake = FakeProvider(gate=asyncio.Event())
    async with run_server(settings, {"fake": fake}) as server:
        account = await server.account(credits=1000)
        async with server.client(account) as client:
            task_id = (await client.post("/sse/text_generator/", json=FAKE)).json()["id"]
            await asyncio.wait_for(fake.started.wait(), 30)
            # As another process asks on PostgreSQL when its notification is lost: only the flag is set.
            execute(tmp_path / "textgen.db", "UPDATE tasks SET cancel_requested = 1 WHERE id = ?", task_id)
            task = await server.wait_for(account, task_id)
        assert task["status"] == "failed" and task["failed_reason"] == "cancelled"
