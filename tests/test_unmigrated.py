"""A command started on a database without this version's schema migrates it (a SQLite file) or stops with one
line saying to run `textgen migrate`, never a bare `database unavailable: OperationalError`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tests.pgdb import pg_empty_url  # noqa: F401  (fixture)
from tests.processes import free_port, run_cli, textgen_env
from textgen.settings import load_settings
from textgen.storage.migrate import alembic_config, upgrade

RUN_MIGRATE = "run `textgen migrate` first"


def _head() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None
    return head


def _revision(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return str(db.execute("SELECT version_num FROM alembic_version").fetchone()[0])


def test_accounts_on_a_fresh_sqlite_file_migrate_it(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    env = textgen_env(TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{path}")
    listed = run_cli("accounts", "list", env=env)
    assert listed.returncode == 0 and listed.stdout == "", listed.stderr
    assert "Traceback" not in listed.stderr and "OperationalError" not in listed.stderr
    created = run_cli("accounts", "create", "first", "--credits", "2", "--json", env=env)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["remaining_credits"] == 2
    assert _revision(path) == _head()


def test_a_worker_on_a_fresh_sqlite_file_migrates_it(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    env = textgen_env(TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{path}", TEXTGEN_LOCAL_MODEL_INSTANCES="1")
    done = run_cli("worker", "--burst", env=env)
    assert done.returncode == 0, done.stderr
    assert _revision(path) == _head()


def test_serve_no_migrate_on_a_fresh_sqlite_file_stops_with_one_line(tmp_path: Path) -> None:
    env = textgen_env(TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/fresh.db")
    done = run_cli("serve", "--no-migrate", "--port", str(free_port()), env=env)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"textgen: the database has no tables yet: {RUN_MIGRATE}"], (
        done.stderr
    )


def test_serve_no_migrate_on_an_old_schema_names_both_revisions(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade(load_settings(database_url=url), "0002")
    done = run_cli(
        "serve", "--no-migrate", "--port", str(free_port()), env=textgen_env(TEXTGEN_DATABASE_URL=url)
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"textgen: the database is at schema revision 0002, this textgen needs {_head()}: {RUN_MIGRATE}"
    ], done.stderr
    assert _revision(path) == "0002", "--no-migrate never changes the schema"


def test_a_schema_from_a_newer_textgen_is_named(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade(load_settings(database_url=url))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = '0099'")
    env = textgen_env(TEXTGEN_DATABASE_URL=url)
    for args in (("accounts", "list"), ("serve", "--port", str(free_port()))):
        done = run_cli(*args, env=env)
        assert done.returncode == 2
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and "0099" in lines[0], done.stderr


def test_on_a_fresh_postgresql_database_commands_say_to_migrate(pg_empty_url: str) -> None:  # noqa: F811
    env = textgen_env(TEXTGEN_DATABASE_URL=pg_empty_url, TEXTGEN_LOCAL_MODEL_INSTANCES="1")
    for args in (
        ("accounts", "list"),
        ("accounts", "create", "x"),
        ("worker", "--burst"),
        ("serve", "--no-migrate", "--port", str(free_port())),
    ):
        done = run_cli(*args, env=env)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.splitlines() == [f"textgen: the database has no tables yet: {RUN_MIGRATE}"], (
            args,
            done.stderr,
        )
    assert run_cli("migrate", env=env).returncode == 0
    assert run_cli("accounts", "list", env=env).returncode == 0
