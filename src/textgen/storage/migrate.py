"""Apply Alembic migrations programmatically (``textgen migrate`` and start-up), and check the schema before a
command that needs it."""

from __future__ import annotations

import asyncio

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import exc as sa_exc

from textgen.errors import ConfigurationError, StorageUnavailable
from textgen.settings import Settings

_UNREACHABLE = (sa_exc.DBAPIError, sa_exc.TimeoutError, OSError, TimeoutError)


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", "textgen:migrations")
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Bring the database to ``revision``; safe to run on every start (PostgreSQL: under an advisory lock,
    SQLite: under the write lock, so processes starting together migrate once)."""
    try:
        command.upgrade(alembic_config(settings.database_url), revision)
    except CommandError as exc:
        raise ConfigurationError(f"cannot migrate the database: {exc}") from None
    except _UNREACHABLE as exc:
        raise StorageUnavailable(f"database unavailable: {type(exc).__name__}") from None


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(""))


async def _current(settings: Settings) -> str | None:
    from textgen.storage.engine import create_engine

    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
    finally:
        await engine.dispose()


def current_revision(settings: Settings) -> str | None:
    """The database's revision; None when it has never been migrated."""
    try:
        return asyncio.run(_current(settings))
    except _UNREACHABLE as exc:
        raise StorageUnavailable(f"database unavailable: {type(exc).__name__}") from None


def ensure_schema(settings: Settings, *, migrate: bool) -> None:
    """Make sure the database has this version's schema before a command uses it: migrate it when
    ``migrate``, otherwise stop with one line saying to run ``textgen migrate``."""
    scripts = _scripts()
    current, head = current_revision(settings), scripts.get_current_head()
    if current == head:
        return
    known = {script.revision for script in scripts.walk_revisions()}
    if current is not None and current not in known:
        raise ConfigurationError(
            f"the database is at schema revision {current}, which this version of textgen does not know "
            f"(it needs {head}): was it migrated by a newer textgen?"
        )
    if migrate:
        upgrade(settings)
        return
    state = (
        "has no tables yet"
        if current is None
        else f"is at schema revision {current}, this textgen needs {head}"
    )
    raise ConfigurationError(f"the database {state}: run `textgen migrate` first")
