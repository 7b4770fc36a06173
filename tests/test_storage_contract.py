"""The storage contract: the same tests against SQLite and PostgreSQL (a fresh database each)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.pgdb import pg_template, pg_url  # noqa: F401  (fixtures)
from textgen.errors import InsufficientCredits, NotFound
from textgen.settings import Settings, load_settings
from textgen.states import TaskStatus
from textgen.storage import Storage
from textgen.storage.migrate import upgrade
from textgen.storage.rows import AccountRow, Cursor, Outcome, TaskRow
from textgen.storage.tables import ledger, webhook_deliveries


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "sqlite":
        settings = load_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/contract.db")
        upgrade(settings)
        return settings
    return load_settings(database_url=request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(db_settings: Settings) -> AsyncIterator[Storage]:
    store = Storage.open(db_settings)
    try:
        yield store
    finally:
        await store.aclose()


async def new_account(store: Storage, balance: int, name: str = "acct") -> AccountRow:
    return await store.accounts.create_account(
        api_id=f"tg_{name}",
        key_id=f"key_{name}",
        key_hash=name.ljust(64, "h"),
        key_prefix="tgk_x",
        name=name,
        credits=balance,
        rate_limit=60,
        webhook_secret="whsec_test",
    )


async def new_task(
    store: Storage, account: AccountRow, reserve: int = 1000, webhook: str | None = None
) -> TaskRow:
    return await store.tasks.create(
        account_id=account.id,
        model_name="fake-model",
        mode="async",
        request={"messages": [{"role": "user", "content": "hi"}]},
        webhook_url=webhook,
        reserve=reserve,
    )


async def ledger_rows(store: Storage, task_id: str) -> list[tuple[str, int]]:
    async with store.db.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(ledger.c.kind, ledger.c.amount).where(ledger.c.task_id == task_id).order_by(ledger.c.id)
        )
        return [(str(kind), int(amount)) for kind, amount in rows]


async def create_or_refuse(store: Storage, account: AccountRow, reserve: int = 1000) -> str:
    """Create a task reserving ``reserve``: "created", or "refused" for a short balance."""
    try:
        await new_task(store, account, reserve=reserve)
    except InsufficientCredits:
        return "refused"
    return "created"


async def assert_reconciled(store: Storage, account: AccountRow) -> int:
    summary = await store.accounts.ledger_summary(account.id)
    assert summary.ledger_sum == summary.balance
    assert summary.balance >= 0
    return summary.balance


async def test_account_grant_and_lookup(store: Storage) -> None:
    account = await new_account(store, 5000)
    assert (await store.accounts.account_by_api_id("tg_acct")) == account
    assert (await store.accounts.account_by_api_id("tg_nobody")) is None
    assert (await store.accounts.grant("tg_acct", 700)).balance == 5700
    assert (await store.accounts.grant("tg_acct", -5700)).balance == 0
    with pytest.raises(InsufficientCredits):
        await store.accounts.grant("tg_acct", -1)
    with pytest.raises(NotFound):
        await store.accounts.grant("tg_nobody", 1)
    assert await store.accounts.count_accounts() == 1
    assert await assert_reconciled(store, account) == 0


async def test_reserve_then_settle_charges_the_actual_cost(store: Storage) -> None:
    account = await new_account(store, 10_000)
    task = await new_task(store, account, reserve=4000, webhook="http://127.0.0.1:9/hook")
    assert task.status == "pending"
    assert (await store.accounts.account_by_id(account.id)).balance == 6000
    claimed = await store.tasks.claim("w1", 30)
    assert claimed is not None and claimed.id == task.id and claimed.attempts == 1
    done = await store.tasks.finish(
        claimed,
        "w1",
        Outcome(
            status=TaskStatus.DONE,
            response_text="ok",
            function_calls=[{"name": "f", "args": {"x": 1}}],
            finish_reason="STOP",
            input_tokens=3,
            output_tokens=4,
            cost=1500,
        ),
    )
    assert done is not None and done.status == "done" and done.credits_used == 1500
    assert done == await store.tasks.get(task.id)  # the row returned is the row stored
    assert await assert_reconciled(store, account) == 8500
    assert await ledger_rows(store, task.id) == [("reserve", -4000), ("settle", 2500)]
    async with store.db.engine.connect() as conn:
        outbox = (await conn.execute(sa.select(webhook_deliveries.c.task_id))).all()
    assert [row.task_id for row in outbox] == [task.id]


async def test_failure_releases_the_whole_reservation(store: Storage) -> None:
    account = await new_account(store, 10_000)
    task = await new_task(store, account, reserve=4000)
    assert await store.tasks.claim("w1", 30) is not None
    failed = await store.tasks.finish(task, "w1", Outcome(status="failed", failed_reason="boom"))
    assert failed is not None and failed.credits_used == 0 and failed.failed_reason == "boom"
    assert await assert_reconciled(store, account) == 10_000
    assert await ledger_rows(store, task.id) == [("reserve", -4000), ("release", 4000)]


async def test_a_short_balance_refuses_and_changes_nothing(store: Storage) -> None:
    account = await new_account(store, 999)
    with pytest.raises(InsufficientCredits):
        await new_task(store, account, reserve=1000)
    assert (await store.tasks.list(account.id, limit=10))[0] == []
    assert await assert_reconciled(store, account) == 999


async def test_concurrent_reservations_never_overdraw(db_settings: Settings) -> None:
    # Three stores = three independent pools, as three processes would have.
    stores = [Storage.open(db_settings) for _ in range(3)]
    try:
        account = await new_account(stores[0], 10_000)

        async def attempt(i: int) -> bool:
            try:
                await new_task(stores[i % 3], account, reserve=1000)
            except InsufficientCredits:
                return False
            return True

        results = await asyncio.gather(*(attempt(i) for i in range(40)))
        assert sum(results) == 10
        assert await assert_reconciled(stores[0], account) == 0
    finally:
        for store in stores:
            await store.aclose()


async def test_concurrent_claimers_take_each_task_exactly_once(db_settings: Settings) -> None:
    stores = [Storage.open(db_settings) for _ in range(3)]
    try:
        account = await new_account(stores[0], 10**9)
        created = {(await new_task(stores[0], account)).id for _ in range(30)}
        claimed: list[str] = []

        async def claimer(n: int) -> None:
            while (task := await stores[n % 3].tasks.claim(f"w{n}", 30)) is not None:
                claimed.append(task.id)
                await asyncio.sleep(0)

        await asyncio.gather(*(claimer(n) for n in range(8)))
        assert sorted(claimed) == sorted(created)
        counts = await stores[0].tasks.counts()
        assert counts == {"running": 30}
    finally:
        for store in stores:
            await store.aclose()


async def test_an_expired_lease_is_reclaimed_and_only_the_new_holder_can_finish(store: Storage) -> None:
    account = await new_account(store, 10_000)
    task = await new_task(store, account, reserve=3000)
    # A lease that is already over, as if the first worker had died long ago.
    first = await store.tasks.claim("dead-worker", -1)
    assert first is not None and first.attempts == 1
    second = await store.tasks.claim("w2", 30)
    assert second is not None and second.id == task.id and second.attempts == 2
    assert second.lease_owner == "w2"
    assert await store.tasks.claim("w3", 30) is None  # a live lease is not reclaimed
    assert await store.tasks.renew_leases([task.id], "dead-worker", 30) == {}
    assert await store.tasks.renew_leases([task.id, "no-such-task"], "w2", 30) == {task.id: False}
    assert await store.tasks.finish(task, "dead-worker", Outcome(status="done", cost=10)) is None
    finished = await store.tasks.finish(task, "w2", Outcome(status="done", cost=1000))
    assert finished is not None and finished.credits_used == 1000
    assert await store.tasks.finish(task, "w2", Outcome(status="done", cost=1000)) is None
    assert await ledger_rows(store, task.id) == [("reserve", -3000), ("settle", 2000)]
    assert await assert_reconciled(store, account) == 9000


async def test_release_gives_the_task_back(store: Storage) -> None:
    account = await new_account(store, 10_000)
    task = await new_task(store, account)
    assert await store.tasks.claim("w1", 30) is not None
    assert not await store.tasks.release(task.id, "w2")
    assert await store.tasks.release(task.id, "w1")
    again = await store.tasks.claim("w2", 30)
    assert again is not None and again.id == task.id and again.lease_owner == "w2"


async def test_list_pages_newest_first_in_both_directions(store: Storage) -> None:
    account = await new_account(store, 10**9)
    other = await new_account(store, 10**9, name="other")
    ids = [(await new_task(store, account)).id for _ in range(7)]
    await new_task(store, other)
    newest_first = list(reversed(ids))
    seen: list[str] = []
    after: Cursor | None = None
    pages = []
    while True:
        rows, more = await store.tasks.list(account.id, limit=3, after=after)
        pages.append(rows)
        seen.extend(r.id for r in rows)
        if not more:
            break
        after = Cursor(rows[-1].created_at, rows[-1].id)
    assert seen == newest_first
    assert [len(p) for p in pages] == [3, 3, 1]
    last = pages[-1][0]
    back, more = await store.tasks.list(account.id, limit=3, before=Cursor(last.created_at, last.id))
    assert [r.id for r in back] == newest_first[3:6] and more
    claimed = await store.tasks.claim("w1", 30)
    assert claimed is not None
    running, _ = await store.tasks.list(account.id, limit=10, status="running")
    assert [r.id for r in running] == [claimed.id]
    with pytest.raises(NotFound):
        await store.tasks.get(ids[0], account_id=other.id)


async def test_concurrent_transactions_share_commits_and_fail_alone(tmp_path: Path) -> None:
    """SQLite's group commit: transactions queued while the writer is busy share one COMMIT, each in its own
    savepoint: a refused one (short balance) or one that raises changes nothing, the others are durable
    (read back through a separate connection to the file) once their callers hear of them."""
    settings = load_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/group.db")
    await asyncio.to_thread(upgrade, settings)
    store = Storage.open(settings)
    try:
        writer = store.db.sqlite
        assert writer is not None
        account = await new_account(store, 10_000)
        commits, transactions = writer.commits, writer.transactions

        def boom(conn: sa.Connection) -> None:
            conn.execute(sa.delete(ledger))  # undone: it raises afterwards
            raise RuntimeError("this transaction fails")

        async def failing() -> str:
            with pytest.raises(RuntimeError, match="this transaction fails"):
                await store.db.run(boom)
            return "failed"

        results = await asyncio.gather(
            *(create_or_refuse(store, account) for _ in range(30)), failing(), failing()
        )
        assert results.count("created") == 10 and results.count("refused") == 20
        assert results.count("failed") == 2
        assert writer.transactions - transactions == 32
        assert writer.commits - commits < writer.transactions - transactions  # some COMMITs were shared
        assert await assert_reconciled(store, account) == 0
    finally:
        await store.aclose()
    with sqlite3.connect(tmp_path / "group.db") as conn:
        (tasks_kept,) = conn.execute("SELECT count(*) FROM tasks").fetchone()
        (reserves,) = conn.execute("SELECT count(*) FROM ledger WHERE kind = 'reserve'").fetchone()
    assert tasks_kept == 10 and reserves == 10


async def test_postgres_groups_the_short_writes_of_tasks(pg_url: str) -> None:  # noqa: F811
    """On PostgreSQL, creating and settling tasks concurrently shares transactions (one COMMIT, and one lock
    of the account's row, for many), and a refused one in a group changes nothing of the others."""
    settings = load_settings(database_url=pg_url)
    store = Storage.open(settings)
    try:
        groups = store.db.groups
        assert groups is not None
        account = await new_account(store, 10_000)
        commits, transactions = groups.commits, groups.transactions

        results = await asyncio.gather(*(create_or_refuse(store, account) for _ in range(30)))
        assert results.count("created") == 10 and results.count("refused") == 20
        assert groups.transactions - transactions == 30
        assert groups.commits - commits < 30
        tasks_now = (await store.tasks.list(account.id, limit=50))[0]
        assert len(tasks_now) == 10
        claimed = await store.tasks.claim_batch("w", 30, limit=10)
        finished = await asyncio.gather(
            *(store.tasks.finish(task, "w", Outcome(status=TaskStatus.DONE, cost=100)) for task in claimed)
        )
        assert all(task is not None and task.status == "done" for task in finished)
        assert await assert_reconciled(store, account) == 10 * (1000 - 100)
    finally:
        await store.aclose()


async def test_a_grouped_write_that_deadlocks_with_another_process_runs_again(pg_url: str) -> None:  # noqa: F811
    """Two processes' grouped writes lock two accounts in opposite orders: PostgreSQL breaks the deadlock by
    failing one, which then runs once more on its own, so both callers succeed and both changes count."""
    settings = load_settings(database_url=pg_url)
    stores = [Storage.open(settings), Storage.open(settings)]
    try:
        first = await new_account(stores[0], 0, "first")
        second = await new_account(stores[0], 0, "second")

        def move(one: int, other: int) -> Callable[[sa.Connection], None]:
            def work(conn: sa.Connection) -> None:
                bump = sa.text("UPDATE accounts SET rate_limit = rate_limit + 1 WHERE id = :id")
                conn.execute(bump, {"id": one})
                conn.execute(sa.text("SELECT pg_sleep(0.3)"))
                conn.execute(bump, {"id": other})

            return work

        await asyncio.gather(
            stores[0].db.run(move(first.id, second.id), group=True),
            stores[1].db.run(move(second.id, first.id), group=True),
        )
        limits = await stores[0].db.run(
            lambda conn: dict(conn.execute(sa.text("SELECT id, rate_limit FROM accounts")).all())
        )
        assert limits[first.id] == limits[second.id] == 62
    finally:
        for store in stores:
            await store.aclose()


async def test_a_grouped_write_whose_statement_fails_fails_alone(pg_url: str) -> None:  # noqa: F811
    """On PostgreSQL a failing statement aborts its group's transaction: the group's jobs run again one by
    one, so only the failing job hears of its error and every other job's write is committed once."""
    store = Storage.open(load_settings(database_url=pg_url))
    try:
        account = await new_account(store, 0)
        groups = store.db.groups
        assert groups is not None
        bump = sa.text("UPDATE accounts SET rate_limit = rate_limit + 1 WHERE id = :id")

        def good(conn: sa.Connection) -> str:
            conn.execute(bump, {"id": account.id})
            return "ok"

        def bad(conn: sa.Connection) -> str:
            conn.execute(bump, {"id": account.id})
            conn.execute(sa.text("INSERT INTO accounts (id) VALUES (:id)"), {"id": account.id})  # fails
            return "unreachable"

        commits = groups.commits
        results = await asyncio.gather(
            *(store.db.run(work, group=True) for work in (good, good, bad, good, good)),
            return_exceptions=True,
        )
        assert results[:2] == ["ok", "ok"] and results[3:] == ["ok", "ok"]
        assert isinstance(results[2], sa.exc.IntegrityError)
        assert groups.commits - commits == 4  # the group was aborted; the four good jobs committed alone
        rate = await store.db.run(
            lambda conn: conn.execute(
                sa.text("SELECT rate_limit FROM accounts WHERE id = :id"), {"id": account.id}
            ).scalar_one()
        )
        assert rate == 60 + 4
    finally:
        await store.aclose()


async def test_a_renewal_skips_a_row_another_transaction_holds_and_keeps_its_lease(store: Storage) -> None:
    """On PostgreSQL the renewal of many leases does not wait for a row locked elsewhere (a settlement group
    that locks its tasks in another order could deadlock with it): the locked task is read instead, still
    held, so it is not taken for lost. On SQLite there is no other writer to wait for."""
    account = await new_account(store, 10_000)
    first, second = await new_task(store, account), await new_task(store, account)
    assert {t.id for t in [await store.tasks.claim("w", 30), await store.tasks.claim("w", 30)] if t} == {
        first.id,
        second.id,
    }
    if not store.db.is_postgres:
        assert await store.tasks.renew_leases([first.id, second.id], "w", 30) == {
            first.id: False,
            second.id: False,
        }
        return
    async with store.db.engine.connect() as other:
        await other.execute(sa.text("SELECT 1 FROM tasks WHERE id = :id FOR UPDATE"), {"id": first.id})
        before = await store.tasks.get(first.id)
        held = await asyncio.wait_for(store.tasks.renew_leases([first.id, second.id], "w", 600), 10)
        assert held == {first.id: False, second.id: False}
        await other.rollback()
    # The locked one kept its old expiry (renewed next time); the other was renewed.
    assert (await store.tasks.get(first.id)).lease_expires_at == before.lease_expires_at
    renewed = await store.tasks.get(second.id)
    assert renewed.lease_expires_at is not None and before.lease_expires_at is not None
    assert renewed.lease_expires_at > before.lease_expires_at
