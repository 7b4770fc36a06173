"""Apply Alembic migrations programmatically (``textgen migrate`` and start-up)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from textgen.settings import Settings


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", "textgen:migrations")
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Bring the database to ``revision``; safe to run on every start."""
    command.upgrade(alembic_config(settings.database_url), revision)
