"""The delivery store operations on SQLite and PostgreSQL: claim with a lock, record, release."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from textgen.capacity import Capacity
from textgen.catalog import Pricing
from textgen.lifecycle import Lifecycle
from textgen.notify import Wakeups
from textgen.providers import ProviderRegistry
from textgen.settings import Settings, load_settings
from textgen.storage import Storage
from textgen.storage.migrate import upgrade
from textgen.storage.outbox import _OFFERS, insert_delivery, new_delivery_id
from textgen.storage.rows import AttemptRecord, Outcome, TaskRow, utcnow
from textgen.webhooks.payload import webhook_payload

with contextlib.suppress(ImportError):
    from tests.pgdb import pg_template, pg_url  # noqa: F401  (fixtures)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "sqlite":
        settings = load_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/deliveries.db")
        upgrade(settings)
        return settings
    try:
        return load_settings(database_url=request.getfixturevalue("pg_url"))
    except pytest.FixtureLookupError:
        pytest.skip("no PostgreSQL fixtures")


@pytest.fixture
async def store(db_settings: Settings) -> AsyncIterator[Storage]:
    store = Storage.open(db_settings)
    try:
        yield store
    finally:
        await store.aclose()


async def finished_task(store: Storage, name: str = "acct", wakeups: Wakeups | None = None) -> TaskRow:
    account = await store.accounts.create_account(
        api_id=f"tg_{name}",
        key_id=f"key_{name}",
        key_hash=name.ljust(64, "h"),
        key_prefix="tgk_x",
        name=name,
        credits=10**9,
        rate_limit=60,
        webhook_secret="whsec_dGVzdA==",
    )
    await store.tasks.create(
        account_id=account.id,
        model_name="fake-model",
        mode="async",
        request={"messages": [{"role": "user", "content": "hi"}]},
        webhook_url="http://example.com/h",
        reserve=10,
    )
    claimed = await store.tasks.claim("w", 30)
    assert claimed is not None
    lifecycle = Lifecycle(
        store.tasks,
        ProviderRegistry({}, {}),
        Pricing(1000),
        wakeups or Wakeups(postgres=store.db.is_postgres),
        Capacity({}),
        worker_id="w",
        lease_seconds=30,
    )
    task = await lifecycle.finish(claimed, Outcome(status="done", response_text="ok", cost=5))
    assert task is not None
    return task


def attempt(outcome: str, next_at: dt.datetime | None = None) -> AttemptRecord:
    return AttemptRecord(
        attempted_at=utcnow(),
        status_code=500 if outcome != "delivered" else 200,
        error=None,
        duration_ms=1.0,
        outcome=outcome,
        next_attempt_at=next_at,
    )


async def test_finishing_a_task_queues_one_due_delivery_and_wakes_listeners(store: Storage) -> None:
    wakeups = Wakeups(postgres=store.db.is_postgres)
    task = await finished_task(store, wakeups=wakeups)
    assert wakeups.deliveries.is_set()
    [claimed] = await store.outbox.claim("s1", 60, 10)
    assert claimed.task_id == task.id
    assert claimed.locked_by == "s1"
    assert '"response_text":"ok"' in claimed.payload
    # Locked: nobody else gets it while the attempt is in flight.
    assert await store.outbox.claim("s2", 60, 10) == []


async def test_record_attempt_schedules_the_next_and_only_the_lock_holder_moves_it(store: Storage) -> None:
    await finished_task(store)
    [claimed] = await store.outbox.claim("s1", 60, 10)
    assert not await store.outbox.record_attempt(claimed.id, "intruder", attempt("delivered"))
    later = utcnow() + dt.timedelta(hours=1)
    assert await store.outbox.record_attempt(claimed.id, "s1", attempt("pending", later))
    assert await store.outbox.claim("s1", 60, 10) == []  # not due yet
    [row] = await store.outbox.history(claimed.task_id)
    assert row.delivery.status == "pending"
    assert row.delivery.attempt_count == 1
    assert len(row.attempts) == 2  # both attempts are logged, even the one whose lock was not held


async def test_an_expired_lock_is_claimed_again_and_release_frees_locks(store: Storage) -> None:
    await finished_task(store)
    [first] = await store.outbox.claim("dead", 0.05, 10)
    await asyncio.sleep(0.1)
    [again] = await store.outbox.claim("alive", 60, 10)
    assert again.id == first.id
    assert await store.outbox.release("alive") == 1
    [third] = await store.outbox.claim("other", 60, 10)
    assert third.id == first.id
    assert await store.outbox.record_attempt(third.id, "other", attempt("failed"))
    assert await store.outbox.claim("other", 60, 10) == []
    [row] = await store.outbox.history(third.task_id)
    assert row.delivery.status == "failed"


async def test_concurrent_senders_claim_each_delivery_once(db_settings: Settings) -> None:
    stores = [Storage.open(db_settings) for _ in range(3)]
    try:
        tasks = [await finished_task(stores[0], f"a{n}") for n in range(12)]
        for task in tasks:
            await stores[0].outbox.queue(
                task_id=task.id,
                account_id=task.account_id,
                url="http://example.com/again",
                payload=webhook_payload(task),
                notify=False,
            )
        claimed: list[str] = []

        async def sender(n: int) -> None:
            while rows := await stores[n % 3].outbox.claim(f"s{n}", 60, 2):
                claimed.extend(r.id for r in rows)
                await asyncio.sleep(0)

        await asyncio.gather(*(sender(n) for n in range(6)))
        assert len(claimed) == 24
        assert len(set(claimed)) == 24
    finally:
        for store in stores:
            await store.aclose()


async def test_concurrent_redeliveries_from_several_processes_stop_at_the_limit(
    db_settings: Settings,
) -> None:
    stores = [Storage.open(db_settings) for _ in range(3)]
    try:
        task = await finished_task(stores[0], "redelivered")

        async def redeliver(n: int) -> str | None:
            return await stores[n % 3].outbox.redeliver(
                task_id=task.id,
                account_id=task.account_id,
                url="http://example.com/again",
                payload=webhook_payload(task),
                notify=False,
                limit=4,
            )

        queued = await asyncio.gather(*(redeliver(n) for n in range(15)))
        assert len([q for q in queued if q is not None]) == 4
        assert len(await stores[0].outbox.history(task.id)) == 5  # its own delivery and 4 redeliveries
    finally:
        for store in stores:
            await store.aclose()


async def test_claims_take_every_accounts_oldest_first_and_each_url_in_turn(store: Storage) -> None:
    a = await finished_task(store, "a")  # its own delivery to http://example.com/h
    for url in ["http://example.com/h"] * 3 + ["http://other.example/h"]:
        await store.outbox.queue(
            task_id=a.id, account_id=a.account_id, url=url, payload=webhook_payload(a), notify=False
        )
    b = await finished_task(store, "b")  # queued after all of A's
    claimed = await store.outbox.claim("s", 60, 3)
    # A's oldest and B's only one (each account's first turn), then A's oldest to its other URL.
    assert sorted((row.account_id, row.url) for row in claimed) == sorted(
        [
            (a.account_id, "http://example.com/h"),
            (b.account_id, "http://example.com/h"),
            (a.account_id, "http://other.example/h"),
        ]
    )
    # What the chooser passes over stays claimable: of A's three left, it takes two.
    rest = await store.outbox.claim("s", 60, 5, choose=lambda offers: [o.id for o in offers][1:])
    assert [row.account_id for row in rest] == [a.account_id] * 2
    assert len(await store.outbox.claim("s", 60, 5)) == 1


async def test_a_claims_work_does_not_grow_with_the_backlog(db_settings: Settings) -> None:
    """A claim reads each (account, URL) pair's oldest due deliveries on an index, whatever the backlog:
    one claim over 4,400 due deliveries does about as much work as over 400 (where every pair already has
    more due deliveries than a claim ranks). Work is counted, not timed: SQLite's VM steps for the claim's
    statements; PostgreSQL's buffer accesses for the statement that ranks the offers."""
    store = Storage.open(db_settings)
    try:
        a = await finished_task(store, "a")
        b = await finished_task(store, "b")
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        def queue_many(n: int) -> Callable[[sa.Connection], None]:
            def work(conn: sa.Connection) -> None:
                for i in range(n):
                    task = a if i % 2 else b
                    insert_delivery(
                        conn,
                        delivery_id=new_delivery_id(),
                        task_id=task.id,
                        account_id=task.account_id,
                        url=f"http://example.com/{i % 3}",
                        payload="{}",
                    )

            return work

        async def sqlite_work() -> int:
            nonlocal steps
            await store.db.run(lambda conn: conn.connection.driver_connection.set_progress_handler(count, 10))
            steps = 0
            claimed = await store.outbox.claim("s", 60, 4, choose=lambda offers: [o.id for o in offers])
            await store.db.run(lambda conn: conn.connection.driver_connection.set_progress_handler(None, 10))
            assert len(claimed) == 4
            return steps

        async def postgres_work() -> int:
            offers = _OFFERS["postgresql"]
            explain = sa.text("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + offers.text).bindparams(
                *offers._bindparams.values()
            )
            params = {"now": utcnow(), "pending": "pending", "offers": 32}

            def work(conn: sa.Connection) -> Any:
                conn.execute(sa.text("ANALYZE webhook_deliveries"))
                return conn.execute(explain, params).scalar_one()

            plan = (await store.db.run(work))[0]["Plan"]
            assert len(await store.outbox.claim("s", 60, 4)) == 4
            return int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"])

        measure = postgres_work if store.db.is_postgres else sqlite_work
        await store.db.run(queue_many(400))
        small = await measure()
        await store.db.run(queue_many(4000))
        large = await measure()
        assert small > 0 and large < 1.5 * small, (small, large)
    finally:
        await store.aclose()
