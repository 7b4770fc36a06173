"""Migrations produce exactly the schema the code's table metadata describes, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tests.pgdb import pg_empty_url  # noqa: F401  (fixture)
from textgen.settings import load_settings
from textgen.storage.engine import create_engine
from textgen.storage.migrate import upgrade
from textgen.storage.tables import metadata


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/migrations.db"
    return str(request.getfixturevalue("pg_empty_url"))


def _unquote(text: str | None) -> str | None:
    if text is None:
        return None
    return re.sub(r"^\"?'(.*)'\"?$", r"\1", re.sub(r"^\((.*)\)$", r"\1", text))


def _compare_default(
    context: MigrationContext,
    inspected: sa.Column[Any],
    column: sa.Column[Any],
    inspected_default: str | None,
    metadata_default: Any,
    rendered_metadata_default: str | None,
) -> bool | None:
    """Alembic's SQLite comparison misreads an empty-string default as changed; unquote both sides alike."""
    if context.dialect.name != "sqlite":
        return None
    return _unquote(inspected_default) != _unquote(rendered_metadata_default)


async def schema_diff(url: str) -> list[Any]:
    engine = create_engine(load_settings(database_url=url))

    def compare(connection: sa.Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": _compare_default}
        )
        return list(compare_metadata(context, metadata))

    try:
        async with engine.connect() as conn:
            return await conn.run_sync(compare)
    finally:
        await engine.dispose()


async def test_migrations_equal_the_metadata(empty_url: str) -> None:
    assert await schema_diff(empty_url) != []  # the comparison sees a missing schema
    await asyncio.to_thread(upgrade, load_settings(database_url=empty_url))
    assert await schema_diff(empty_url) == []
    await asyncio.to_thread(upgrade, load_settings(database_url=empty_url))  # idempotent on every start
    assert await schema_diff(empty_url) == []


async def test_concurrent_start_ups_migrate_once(pg_empty_url: str) -> None:  # noqa: F811
    # Several `textgen migrate` processes starting together on an empty PostgreSQL database.
    env = {**os.environ, "TEXTGEN_DATABASE_URL": pg_empty_url}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "textgen",
            "migrate",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        for _ in range(4)
    ]
    try:
        outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 90)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [out.decode()[-2000:] for out, _ in outputs]
    assert await schema_diff(pg_empty_url) == []


async def test_the_account_key_carries_over_to_api_keys(empty_url: str) -> None:
    """An account created under 0001 (one key on the account row) keeps its key after 0002."""
    import datetime as dt

    from textgen.accounts import Authenticator, hash_key
    from textgen.storage import Storage

    settings = load_settings(database_url=empty_url)
    await asyncio.to_thread(upgrade, settings, "0001")
    engine = create_engine(settings)
    created = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    old = sa.table(
        "accounts",
        *(sa.column(n) for n in ("api_id", "key_hash", "key_prefix", "name", "balance", "rate_limit")),
        sa.column("webhook_secret"),
        sa.column("created_at", metadata.tables["accounts"].c.created_at.type),
    )
    async with engine.begin() as conn:
        await conn.execute(
            old.insert().values(
                api_id="tg_old",
                key_hash=hash_key("tgk_the-old-key"),
                key_prefix="tgk_the-ol",
                name="old",
                balance=5,
                rate_limit=60,
                webhook_secret="whsec_x",
                created_at=created,
            )
        )
    await engine.dispose()
    await asyncio.to_thread(upgrade, settings)
    assert await schema_diff(empty_url) == []
    store = Storage.open(settings)
    try:
        account = await Authenticator(store.admin).authenticate("tg_old", "tgk_the-old-key")
        assert account.balance == 5 and account.disabled is False
        rows = await store.db.run(lambda conn: conn.execute(sa.select(metadata.tables["api_keys"])).all())
        assert [(r.prefix, r.created_at, r.revoked_at) for r in rows] == [("tgk_the-ol", created, None)]
    finally:
        await store.aclose()
