"""The delivery store operations on SQLite and PostgreSQL: claim with a lock, record, release."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from textgen.settings import Settings, load_settings
from textgen.storage.engine import create_engine
from textgen.storage.migrate import upgrade
from textgen.storage.store import AttemptRecord, Outcome, Store, TaskRow, utcnow

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
async def store(db_settings: Settings) -> AsyncIterator[Store]:
    store = Store(create_engine(db_settings))
    try:
        yield store
    finally:
        await store.aclose()


async def finished_task(store: Store, name: str = "acct") -> TaskRow:
    account = await store.create_account(
        api_id=f"tg_{name}",
        key_id=f"key_{name}",
        key_hash=name.ljust(64, "h"),
        key_prefix="tgk_x",
        name=name,
        credits=10**9,
        rate_limit=60,
        webhook_secret="whsec_dGVzdA==",
    )
    await store.create_task(
        account_id=account.id,
        model_name="fake-model",
        mode="async",
        request={"messages": [{"role": "user", "content": "hi"}]},
        webhook_url="http://example.com/h",
        reserve=10,
    )
    claimed = await store.claim_task("w", 30)
    assert claimed is not None
    task = await store.finish_task(claimed.id, "w", Outcome(status="done", response_text="ok", cost=5))
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


async def test_finishing_a_task_queues_one_due_delivery_and_wakes_listeners(store: Store) -> None:
    woken: list[bool] = []
    store.delivery_listeners.append(lambda: woken.append(True))
    task = await finished_task(store)
    assert woken == [True]
    [claimed] = await store.claim_deliveries("s1", 60, 10)
    assert claimed.task_id == task.id
    assert claimed.locked_by == "s1"
    assert '"response_text":"ok"' in claimed.payload
    # Locked: nobody else gets it while the attempt is in flight.
    assert await store.claim_deliveries("s2", 60, 10) == []


async def test_record_attempt_schedules_the_next_and_only_the_lock_holder_moves_it(store: Store) -> None:
    await finished_task(store)
    [claimed] = await store.claim_deliveries("s1", 60, 10)
    assert not await store.record_attempt(claimed.id, "intruder", attempt("delivered"))
    later = utcnow() + dt.timedelta(hours=1)
    assert await store.record_attempt(claimed.id, "s1", attempt("pending", later))
    assert await store.claim_deliveries("s1", 60, 10) == []  # not due yet
    [row] = await store.deliveries_for_task(claimed.task_id)
    assert row["status"] == "pending"
    assert row["attempt_count"] == 1
    assert len(row["attempts"]) == 2  # both attempts are logged, even the one whose lock was not held


async def test_an_expired_lock_is_claimed_again_and_release_frees_locks(store: Store) -> None:
    await finished_task(store)
    [first] = await store.claim_deliveries("dead", 0.05, 10)
    await asyncio.sleep(0.1)
    [again] = await store.claim_deliveries("alive", 60, 10)
    assert again.id == first.id
    assert await store.release_deliveries("alive") == 1
    [third] = await store.claim_deliveries("other", 60, 10)
    assert third.id == first.id
    assert await store.record_attempt(third.id, "other", attempt("failed"))
    assert await store.claim_deliveries("other", 60, 10) == []
    [row] = await store.deliveries_for_task(third.task_id)
    assert row["status"] == "failed"


async def test_concurrent_senders_claim_each_delivery_once(db_settings: Settings) -> None:
    stores = [Store(create_engine(db_settings)) for _ in range(3)]
    try:
        tasks = [await finished_task(stores[0], f"a{n}") for n in range(12)]
        for task in tasks:
            await stores[0].queue_delivery(task, "http://example.com/again")
        claimed: list[str] = []

        async def sender(n: int) -> None:
            while rows := await stores[n % 3].claim_deliveries(f"s{n}", 60, 2):
                claimed.extend(r.id for r in rows)
                await asyncio.sleep(0)

        await asyncio.gather(*(sender(n) for n in range(6)))
        assert len(claimed) == 24
        assert len(set(claimed)) == 24
    finally:
        for store in stores:
            await store.aclose()
