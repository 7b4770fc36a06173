"""Alembic environment: runs the migrations on the configured async engine."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from textgen.storage.tables import metadata

config = context.config
# A fixed key for the PostgreSQL advisory lock that serialises concurrent `textgen migrate`/`serve` start-ups.
MIGRATION_LOCK_KEY = 0x7465787467656E  # "textgen"


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Processes starting together queue here; each then reads the version the previous one left.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        context.run_migrations()


async def _main() -> None:
    from textgen.settings import load_settings
    from textgen.storage.engine import create_engine

    url = config.get_main_option("sqlalchemy.url")
    engine = create_engine(load_settings(database_url=url))
    async with engine.connect() as connection:
        await connection.run_sync(_run)
        await connection.commit()
    await engine.dispose()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    asyncio.run(_main())
