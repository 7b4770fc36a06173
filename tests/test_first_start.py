"""What a new user meets when starting textgen: bad settings stop the process with one line, logs show."""

from __future__ import annotations

import json
import re
import stat
import time
from pathlib import Path

import pytest

from tests.processes import free_port, run_cli, textgen_env, textgen_process
from textgen import limits

# (variable, value, what the one line must say besides the variable)
BAD_SETTINGS = [
    ("TEXTGEN_LOG_LEVEL", "verbose", "'debug', 'info', 'warning' or 'error'"),
    ("TEXTGEN_LOCAL_THREADS", "-3", "greater than or equal to 1"),
    ("TEXTGEN_LOCAL_MODEL_INSTANCES", "0", "greater than or equal to 1"),
    ("TEXTGEN_DEFAULT_MAX_OUTPUT_TOKENS", "0", "greater than or equal to 1"),
    ("TEXTGEN_LOCAL_MODEL_PATH", "{tmp}/missing.gguf", "No such file"),
    ("TEXTGEN_LOCAL_MODEL_PATH", "{tmp}/not-a-model.gguf", "must be a GGUF model file"),
    ("TEXTGEN_MODELS_FILE", "{tmp}/missing.toml", "No such file"),
    ("TEXTGEN_MODELS_FILE", "{tmp}/broken.toml", "not valid TOML"),
    ("TEXTGEN_WEBHOOK_SCHEDULE", "0,5,soon", "delays in seconds (numbers >= 0), got 'soon'"),
    ("TEXTGEN_WEBHOOK_SCHEDULE", ",", "at least one delay"),
    ("TEXTGEN_WEBHOOK_REFUSED_PORTS", "22,ssh", "port numbers"),
    ("TEXTGEN_PORT", "0", "greater than or equal to 1"),
    ("TEXTGEN_RUN_WORKER", "maybe", "valid boolean"),
    ("TEXTGEN_REDIS_URL", "http://127.0.0.1:6379", "redis://"),
    ("TEXTGEN_GEMINI_BASE_URL", "127.0.0.1:9", "http://"),
    ("TEXTGEN_DEFAULT_CREDITS", "inf", "finite number"),
    ("TEXTGEN_DEFAULT_CREDITS", "nan", "finite number"),
    ("TEXTGEN_DEFAULT_CREDITS", "1000000000001", "less than or equal to 1000000000000"),
    ("TEXTGEN_CREDITS_PER_USD", "inf", "finite number"),
    ("TEXTGEN_CREDITS_PER_USD", "nan", "finite number"),
    ("TEXTGEN_DEFAULT_RATE_LIMIT", "1000000001", "less than or equal to 1000000000"),
    ("TEXTGEN_DEFAULT_RATE_LIMIT", "0", "greater than or equal to 1"),
    ("TEXTGEN_REQUEST_BODIES_BUDGET_BYTES", "146800639", "at least TEXTGEN_MAX_BODY_BYTES (146800640)"),
]


@pytest.mark.parametrize(("variable", "value", "expected"), BAD_SETTINGS)
def test_a_bad_setting_stops_serve_with_one_line_naming_it(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    (tmp_path / "not-a-model.gguf").write_text("hello")
    (tmp_path / "broken.toml").write_text("[models.x\n")
    value = value.format(tmp=tmp_path)
    env = textgen_env(TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/textgen.db", **{variable: value})
    done = run_cli("serve", "--port", str(free_port()), env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"textgen: invalid configuration: {variable}"), lines[0]
    assert expected in lines[0]
    assert not (tmp_path / "textgen.db").exists(), "nothing is created before the settings are checked"


def test_account_defaults_and_the_body_budget_are_accepted_at_their_edges(tmp_path: Path) -> None:
    # The largest amounts the admin API accepts, and a budget of exactly one body at the size limit.
    env = textgen_env(
        TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/t.db",
        TEXTGEN_DEFAULT_CREDITS=f"{limits.MAX_CREDITS:.0f}",
        TEXTGEN_CREDITS_PER_USD="1e-6",
        TEXTGEN_DEFAULT_RATE_LIMIT=str(limits.MAX_RATE_LIMIT),
        TEXTGEN_MAX_BODY_BYTES="1000",
        TEXTGEN_REQUEST_BODIES_BUDGET_BYTES="1000",
    )
    done = run_cli("accounts", "create", "edge", "--json", env=env)
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    assert created["remaining_credits"] == limits.MAX_CREDITS, created
    assert created["rate_limit_per_minute"] == limits.MAX_RATE_LIMIT, created


def test_a_bad_secret_is_named_but_not_repeated(tmp_path: Path) -> None:
    url = "mysql://admin:hunter2@db.internal/textgen"
    done = run_cli("accounts", "list", env=textgen_env(TEXTGEN_DATABASE_URL=url))
    assert done.returncode == 2
    assert done.stderr.startswith("textgen: invalid configuration: TEXTGEN_DATABASE_URL: must start with")
    assert "hunter2" not in done.stderr


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    env = textgen_env(
        TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/t.db", TEXTGEN_LOG_LEVEL="WARNING"
    )
    done = run_cli("migrate", env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "args",
    [("serve", "--workers", "0"), ("serve", "--port", "70000"), ("worker", "--concurrency", "-1")],
)
def test_bad_command_line_numbers_are_refused(tmp_path: Path, args: tuple[str, ...]) -> None:
    env = textgen_env(TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/t.db")
    done = run_cli(*args, env=env)
    assert done.returncode == 2
    assert f"argument {args[1]}: must be a" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.timeout(300)
def test_textgen_info_lines_show_with_several_workers(tmp_path: Path) -> None:
    env = textgen_env(
        TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/t.db", TEXTGEN_LOCAL_MODEL_INSTANCES="1"
    )
    port = free_port()
    log = tmp_path / "serve.log"
    with textgen_process("serve", "--port", str(port), "--workers", "2", env=env, log=log, port=port):
        for _ in range(1200):
            if len(re.findall(r" INFO textgen\.local: local model loaded", log.read_text())) >= 2:
                break
            time.sleep(0.1)
    text = log.read_text()
    assert len(re.findall(r" INFO textgen\.local: local model loaded", text)) == 2, text
    assert re.search(r" INFO uvicorn\.error: Started server process", text), text


# (arguments after `accounts`, what the one line must say); "{id}" is an existing account
BAD_ACCOUNT_COMMANDS = [
    (("create", "x", "--credits", "-5"), "credits: must not be negative"),
    (("create", "x", "--credits", "nan"), "credits: must be a finite number"),
    (("create", "x", "--credits", "inf"), "credits: must be a finite number"),
    (("create", "x", "--rate-limit", "0"), "rate_limit: must be an integer between 1 and"),
    (("create", "x", "--rate-limit", "-1"), "rate_limit: must be an integer between 1 and"),
    (("set-rate-limit", "tg_nobody", "5"), "no account with api_id 'tg_nobody'"),
    (("set-rate-limit", "{id}", "-1"), "rate_limit: must be an integer between 1 and"),
    (("set-rate-limit", "{id}", "0"), "rate_limit: must be an integer between 1 and"),
    (("credit", "{id}", "nan"), "amount: must be a finite number"),
    (("disable", "tg_nobody"), "no account with api_id 'tg_nobody'"),
]


@pytest.fixture(scope="module")
def cli_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], str]:
    path = tmp_path_factory.mktemp("cli") / "cli.db"
    env = textgen_env(TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{path}", TEXTGEN_DEFAULT_RATE_LIMIT="60")
    assert run_cli("migrate", env=env).returncode == 0
    created = run_cli("accounts", "create", "kept", "--credits", "3", "--rate-limit", "9", "--json", env=env)
    assert created.returncode == 0, created.stderr
    return env, str(json.loads(created.stdout)["api_id"])


@pytest.mark.parametrize(("args", "expected"), BAD_ACCOUNT_COMMANDS)
def test_a_bad_account_command_is_one_line_and_changes_nothing(
    cli_db: tuple[dict[str, str], str], args: tuple[str, ...], expected: str
) -> None:
    env, api_id = cli_db
    done = run_cli("accounts", *(a.format(id=api_id) for a in args), env=env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("textgen: ") and expected in lines[0], done.stderr
    assert done.stdout == ""
    listed = run_cli("accounts", "list", env=env).stdout.splitlines()
    assert not [line for line in listed if line.endswith("  x")], listed
    assert f"{api_id}  3 credits  active  kept" in listed, listed
    shown = json.loads(run_cli("accounts", "show", api_id, "--json", env=env).stdout)
    assert shown["rate_limit_per_minute"] == 9


def test_set_rate_limit_changes_an_existing_account(cli_db: tuple[dict[str, str], str]) -> None:
    env, _ = cli_db
    created = json.loads(run_cli("accounts", "create", "other", "--json", env=env).stdout)
    assert created["rate_limit_per_minute"] == 60
    done = run_cli("accounts", "set-rate-limit", created["api_id"], "120", env=env)
    assert done.returncode == 0 and done.stdout == f"{created['api_id']}: 120 requests per minute\n"
    shown = json.loads(run_cli("accounts", "show", created["api_id"], "--json", env=env).stdout)
    assert shown["rate_limit_per_minute"] == 120


def test_the_sqlite_file_and_its_new_directory_are_private(tmp_path: Path) -> None:
    path = tmp_path / "made" / "by" / "textgen" / "t.db"
    env = textgen_env(TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{path}")
    done = run_cli("migrate", env=env)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for sidecar in path.parent.glob("t.db-*"):  # the WAL and shared-memory files follow the database file
        assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600, sidecar
    # An existing directory is left as the operator made it; the new file in it is still private.
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    done = run_cli("migrate", env=textgen_env(TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{shared}/t.db"))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert stat.S_IMODE((shared / "t.db").stat().st_mode) == 0o600
