"""The database executor: runs one transaction, written as a function of a synchronous connection.

On SQLite the function runs on one dedicated thread with the standard library driver: a transaction is one
hop off the event loop, and every statement of the process is serialised through one connection. The
transactions that queued up while the thread was busy share one COMMIT (a group commit): each runs inside
its own SAVEPOINT of one transaction, a failing one is rolled back to its savepoint alone, and no caller
hears of its result before the COMMIT that made it durable. On PostgreSQL the function runs on the async
pool through ``AsyncConnection.run_sync``, and the short writes of every task are group-committed too, one
group at a time on one connection and without savepoints (``PostgresGroups``); a connection found dead before COMMIT (the server restarted, a
proxy dropped it) is thrown away and the transaction runs once more on a fresh one, so the pool needs no
ping per checkout. Driver failures leave as ``StorageUnavailable``, never raw.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from textgen.errors import StorageUnavailable
from textgen.storage.engine import sqlite_sync_engine

T = TypeVar("T")

# At most this many transactions share one COMMIT (a bound on how long the first of them waits).
GROUP_COMMIT_MAX = 64


# PostgreSQL's "try again" failures: a deadlock between two transactions, or a serialization failure.
_TRY_AGAIN = {"40P01", "40001"}


@dataclass(slots=True)
class _Job:
    work: Callable[[Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    outcome: tuple[bool, Any] | None = None  # (ok, result or exception) once its savepoint is done
    retried: bool = False  # a group ran it once already and it failed with a "try again" error


def _deliver(answers: list[tuple[_Job, bool, Any]]) -> None:
    """Hand each job its result: at once on its own event loop's thread (PostgreSQL), else with one wake-up
    of each loop for the whole group (SQLite's thread), not one per job."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, bool, Any]]] = {}
    for answer in answers:
        by_loop.setdefault(answer[0].loop, []).append(answer)
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for loop, batch in by_loop.items():
        if loop is running:
            _settle_futures(batch)
        else:
            with contextlib.suppress(RuntimeError):  # its event loop has closed: nobody is waiting
                loop.call_soon_threadsafe(_settle_futures, batch)


def _settle_futures(batch: list[tuple[_Job, bool, Any]]) -> None:
    for job, ok, value in batch:
        if job.future.done():  # its caller stopped waiting (cancelled); the work ran all the same
            continue
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)


def _try_again(exc: BaseException) -> bool:
    return isinstance(exc, sa_exc.DBAPIError) and getattr(exc.orig, "sqlstate", None) in _TRY_AGAIN


def _run_jobs(conn: Connection, group: list[_Job]) -> None:
    """Run a group's jobs in the transaction ``conn`` is in: alone, plainly (its exception fails the
    transaction); several, each in its own SAVEPOINT, so that one that fails is rolled back alone."""
    if len(group) == 1:
        job = group[0]
        job.outcome = (True, job.work(conn))
        return
    # The savepoints go to the driver directly: SQLAlchemy's compile a new statement for each one.
    driver = conn.connection.driver_connection
    assert driver is not None
    for job in group:
        driver.execute("SAVEPOINT job")
        try:
            job.outcome = (True, job.work(conn))
        except sa_exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise  # the connection is gone: so is the whole transaction
            job.outcome = (False, exc)
            driver.execute("ROLLBACK TO job")
        except Exception as exc:
            job.outcome = (False, exc)
            driver.execute("ROLLBACK TO job")
        driver.execute("RELEASE job")


def _run_writes(conn: Connection, group: list[_Job]) -> None:
    """PostgreSQL: run a group's jobs one after the other in one transaction, without savepoints (each would
    cost two round trips). A grouped job raises only before it writes anything, so its exception is its own
    answer and the others go on; a database error aborts the transaction and leaves this function."""
    for job in group:
        try:
            job.outcome = (True, job.work(conn))
        except sa_exc.DBAPIError:
            raise
        except Exception as exc:
            job.outcome = (False, exc)


def _settle_group(group: list[_Job], failure: BaseException | None) -> list[_Job]:
    """Tell each job of a group how it went, once its transaction committed (``failure`` None) or failed;
    returns the jobs to run once more (those that failed only for a deadlock, the first time)."""
    again: list[_Job] = []
    answers: list[tuple[_Job, bool, Any]] = []
    for job in group:
        outcome = job.outcome
        if outcome is not None and not outcome[0]:
            if _try_again(outcome[1]) and not job.retried:
                job.retried, job.outcome = True, None
                again.append(job)
            else:
                answers.append((job, False, outcome[1]))
        elif failure is not None:
            # The transaction as a whole failed (BEGIN, a savepoint that could not be rolled back, COMMIT):
            # nothing of it is durable, so every job hears of that, whatever its own part did.
            answers.append((job, False, failure))
        else:
            assert outcome is not None
            answers.append((job, True, outcome[1]))
    _deliver(answers)
    return again


class SqliteWriter:
    """The one thread that runs every transaction of this process on its one SQLite connection."""

    def __init__(self, engine: Engine, max_group: int = GROUP_COMMIT_MAX) -> None:
        self.engine = engine
        self.max_group = max_group
        self._jobs: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self.commits = 0  # COMMITs issued, and transactions committed by them (for tests and metrics)
        self.transactions = 0
        self._conn: Connection | None = None  # the writer's one connection, kept open between groups
        self._thread = threading.Thread(target=self._loop, name="textgen-sqlite", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._ready:
            if self._closed:
                raise StorageUnavailable("database unavailable: closed")
            self._jobs.append(_Job(work, future, loop))
            self._ready.notify()
        return future

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._closed:
                    self._ready.wait()
                if not self._jobs:
                    break
                group = [self._jobs.popleft() for _ in range(min(self.max_group, len(self._jobs)))]
            self._run_group(group)
        if self._conn is not None:
            self._conn.close()
        self.engine.dispose()

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self.engine.connect()
        return self._conn

    def _run_group(self, group: list[_Job]) -> None:
        try:
            conn = self._connection()
            try:
                with conn.begin():
                    _run_jobs(conn, group)
            except BaseException:
                # A failed group (a COMMIT that failed may leave the driver inside its transaction) leaves its
                # connection behind: closing returns it to the pool, whose reset rolls back; the next group
                # starts on a fresh one.
                self._conn = None
                with contextlib.suppress(Exception):
                    conn.close()
                raise
        except BaseException as exc:
            _settle_group(group, exc)
            return
        self.commits += 1
        self.transactions += len(group)
        _settle_group(group, None)

    def close(self) -> None:
        """Run what is queued, then stop the thread and close the connection."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=30)


class PostgresGroups:
    """Group commit on PostgreSQL for the short writes every task makes (creating and settling it, recording
    a webhook attempt): the jobs queued while a group runs go together in the next one, one after the other
    on one connection, under one COMMIT. An account's row, which all its tasks update, is then locked once
    per group instead of once per task, and the WAL is flushed once per group. Grouped jobs take no
    savepoints: each raises only before it writes (a refusal), so its exception answers it alone; a statement
    that fails aborts the group, whose jobs then run again one by one. A job that fails alone only for a
    deadlock with another process runs once more."""

    def __init__(self, engine: AsyncEngine, max_group: int = GROUP_COMMIT_MAX) -> None:
        self.engine = engine
        self.max_group = max_group
        self._jobs: deque[_Job] = deque()
        # One group at a time per process: groups side by side contend for the same account rows (measured
        # with 4 at once: fewer tasks/s and a later first stream chunk than with 1).
        self._drainer: asyncio.Task[None] | None = None
        self.commits = 0
        self.transactions = 0

    def submit(self, work: Callable[[Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.append(_Job(work, future, loop))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain(), name="textgen-group-commit")
        return future

    async def _drain(self) -> None:
        while self._jobs:
            group = [self._jobs.popleft() for _ in range(min(self.max_group, len(self._jobs)))]
            try:
                again = await self._run_group(group)
            except BaseException as exc:  # cancelled (shutdown): whoever waits, in the group or queued, hears
                waiting = [*group, *self._jobs]
                self._jobs.clear()
                for job in waiting:
                    job.retried = True  # no later group will run it
                _settle_group(waiting, StorageUnavailable(f"database unavailable: {type(exc).__name__}"))
                raise
            self._jobs.extendleft(reversed(again))

    async def _run_group(self, group: list[_Job]) -> list[_Job]:
        for attempt in (1, 2):
            committing = False
            try:
                async with self.engine.connect() as conn:
                    await conn.begin()
                    await conn.run_sync(_run_writes, group)
                    committing = True
                    await conn.commit()
            except sa_exc.DBAPIError as exc:
                for job in group:
                    job.outcome = None
                # A pooled connection found dead before COMMIT: nothing was committed; run the group again.
                if exc.connection_invalidated and attempt == 1 and not committing:
                    continue
                if len(group) > 1 and not committing:
                    # One job's statement failed and took the transaction with it (nothing was committed):
                    # each job runs again alone, so that only the failing one hears of its error.
                    again: list[_Job] = []
                    for job in group:
                        again += await self._run_group([job])
                    return again
                if len(group) == 1 and _try_again(exc) and not group[0].retried:
                    group[0].outcome = (False, exc)  # its deadlock failed the transaction: once more
                    return _settle_group(group, None)
                return _settle_group(group, exc)
            except Exception as exc:
                return _settle_group(group, exc)
            self.commits += 1
            self.transactions += len(group)
            return _settle_group(group, None)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self._drainer is not None and not self._drainer.done():
            await asyncio.wait([self._drainer], timeout=30)


class Database:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self.sqlite = None if self.is_postgres else SqliteWriter(sqlite_sync_engine(engine))
        self.groups = PostgresGroups(engine) if self.is_postgres else None

    async def run(self, work: Callable[[Connection], T], *, group: bool = False) -> T:
        """Run ``work`` in one transaction. On PostgreSQL, ``group`` lets it share its transaction with
        other short writes, without a savepoint: ``work`` must then raise only before it writes anything
        (or through a database error). On SQLite every transaction is grouped, each in its own savepoint."""
        try:
            if self.sqlite is not None:
                return await self.sqlite.submit(work)
            if group and self.groups is not None:
                return await self.groups.submit(work)
            return await self._run_postgres(work)
        except (sa_exc.IntegrityError, sa_exc.ProgrammingError):
            raise
        except (sa_exc.DBAPIError, sa_exc.TimeoutError, sqlite3.Error, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"database unavailable: {type(exc).__name__}") from exc

    async def _run_postgres(self, work: Callable[[Connection], T]) -> T:
        for attempt in (1, 2):
            async with self.engine.connect() as conn:
                try:
                    await conn.begin()
                    result = await conn.run_sync(work)
                except sa_exc.DBAPIError as exc:
                    # A pooled connection that died while idle fails here, before anything was committed:
                    # SQLAlchemy has invalidated it, and the transaction runs again on a fresh connection.
                    if exc.connection_invalidated and attempt == 1:
                        continue
                    raise
                await conn.commit()  # a failure here is not retried: the commit may have happened
                return result
        raise AssertionError("unreachable")

    def notify(self, conn: Connection, channel: str, payload: str = "") -> None:
        """On PostgreSQL, wake the listeners of ``channel`` in every process once this transaction commits."""
        if self.is_postgres:
            conn.execute(sa.select(sa.func.pg_notify(channel, payload)))

    async def ping(self) -> None:
        await self.run(lambda conn: conn.execute(sa.text("SELECT 1")))

    async def aclose(self) -> None:
        if self.groups is not None:
            await self.groups.aclose()
        if self.sqlite is not None:
            await asyncio.to_thread(self.sqlite.close)
        await self.engine.dispose()
