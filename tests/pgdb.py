"""PostgreSQL databases for tests: one migrated template per test run, cloned into a fresh database per test.

Every name carries the pid and a random suffix, so parallel runs on one server never collide, and every
database is dropped afterwards (the template at the end of the session).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import asyncpg
import pytest

from textgen.settings import load_settings
from textgen.storage.migrate import upgrade

ADMIN_DSN = os.environ.get("TEXTGEN_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
T = TypeVar("T")


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a private loop in a thread (safe inside a running loop too)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(make())  # type: ignore[arg-type]
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


async def admin(*statements: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def unique_name(kind: str) -> str:
    return f"textgen_{kind}_{os.getpid()}_{uuid.uuid4().hex[:10]}"


def sqlalchemy_url(database: str, host: str = "127.0.0.1", port: int = 5432) -> str:
    return f"postgresql+asyncpg://postgres@{host}:{port}/{database}"


def create_database(template: str | None = None) -> str:
    name = unique_name("test")
    clause = f" TEMPLATE {template}" if template else ""
    run_sync(lambda: admin(f"CREATE DATABASE {name}{clause}"))
    return name


def drop_database(name: str) -> None:
    run_sync(lambda: admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A database migrated to head once per test run; tests clone it."""
    try:
        name = create_database()
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is not reachable at {ADMIN_DSN} ({exc}); run scripts/ensure-services.sh")
    try:
        upgrade(load_settings(database_url=sqlalchemy_url(name)))
        run_sync(lambda: admin(f"ALTER DATABASE {name} WITH is_template = true"))
        yield name
    finally:
        run_sync(lambda: admin(f"ALTER DATABASE {name} WITH is_template = false"))
        drop_database(name)


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test (a clone of the template), dropped afterwards."""
    name = create_database(template=pg_template)
    try:
        yield sqlalchemy_url(name)
    finally:
        drop_database(name)


@pytest.fixture
def pg_empty_url() -> Iterator[str]:
    """A fresh PostgreSQL database with no schema at all, dropped afterwards."""
    name = create_database()
    try:
        yield sqlalchemy_url(name)
    finally:
        drop_database(name)
