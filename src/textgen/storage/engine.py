"""Engine construction: the URL's scheme picks SQLite or PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from textgen.settings import Settings


def sqlite_path(url: str) -> Path | None:
    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def prepare_sqlite_file(path: Path) -> None:
    """Create the database file (and its directory, when missing) readable by the owner only: it holds
    webhook secrets. SQLite gives its -wal and -shm files the database file's mode. An existing file or
    directory is left as the operator made it."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.chmod(0o700)  # mkdir's mode is narrowed by the umask, never widened; make it exact
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.fchmod(fd, 0o600)
    os.close(fd)  # an empty file is a valid, empty SQLite database


def _sqlite_session_setup(engine: Engine) -> None:
    """WAL, a busy timeout, foreign keys, and BEGIN IMMEDIATE: a transaction takes the write lock up front,
    so concurrent writers (other processes) wait for it instead of failing when they upgrade a read lock."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        driver = conn.connection.driver_connection
        if isinstance(driver, sqlite3.Connection):
            driver.execute("BEGIN IMMEDIATE")  # the writer thread's connection: straight to the driver
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def sqlite_sync_engine(engine: AsyncEngine) -> Engine:
    """A synchronous engine on the same SQLite file, used from one dedicated thread.

    A whole transaction then costs one hop to that thread, where aiosqlite costs several per statement.
    """
    url = engine.url.set(drivername="sqlite+pysqlite")
    sync = sa_create_engine(
        url, pool_size=1, max_overflow=0, pool_timeout=60, connect_args={"check_same_thread": False}
    )
    _sqlite_session_setup(sync)
    return sync


def create_engine(settings: Settings) -> AsyncEngine:
    url = settings.database_url
    if settings.is_sqlite:
        path = sqlite_path(url)
        if path is not None:
            prepare_sqlite_file(path)
        # The async engine serves migrations; the store runs its transactions on sqlite_sync_engine().
        engine = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=60)
        _sqlite_session_setup(engine.sync_engine)
        return engine
    return create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=10,
    )
