"""The database executor: runs one transaction, written as a function of a synchronous connection.

On SQLite the function runs on one dedicated thread with the standard library driver: a transaction is one
hop off the event loop, and every statement of the process is serialised through one connection. On
PostgreSQL it runs on the async pool through ``AsyncConnection.run_sync``. Driver failures leave as
``StorageUnavailable``, never raw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from textgen.errors import StorageUnavailable
from textgen.storage.engine import sqlite_sync_engine

T = TypeVar("T")


class Database:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self._sqlite = None if self.is_postgres else sqlite_sync_engine(engine)
        self._thread = (
            None if self.is_postgres else ThreadPoolExecutor(1, thread_name_prefix="textgen-sqlite")
        )

    async def run(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in one transaction."""
        try:
            if self._sqlite is not None:
                return await asyncio.get_running_loop().run_in_executor(self._thread, self._in_sqlite, work)
            async with self.engine.begin() as conn:
                return await conn.run_sync(work)
        except (sa_exc.IntegrityError, sa_exc.ProgrammingError):
            raise
        except (sa_exc.DBAPIError, sa_exc.TimeoutError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"database unavailable: {type(exc).__name__}") from exc

    def _in_sqlite(self, work: Callable[[Connection], T]) -> T:
        assert self._sqlite is not None
        with self._sqlite.begin() as conn:
            return work(conn)

    def notify(self, conn: Connection, channel: str, payload: str = "") -> None:
        """On PostgreSQL, wake the listeners of ``channel`` in every process once this transaction commits."""
        if self.is_postgres:
            conn.execute(sa.select(sa.func.pg_notify(channel, payload)))

    async def ping(self) -> None:
        await self.run(lambda conn: conn.execute(sa.text("SELECT 1")))

    async def aclose(self) -> None:
        if self._sqlite is not None and self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._sqlite.dispose)
            self._thread.shutdown(wait=False)
        await self.engine.dispose()
