"""What a new user meets when starting textgen: bad settings stop the process with one line, logs show."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.processes import free_port, run_cli, textgen_env, textgen_process

# (variable, value, what the one line must say besides the variable)
BAD_SETTINGS = [
    ("TEXTGEN_LOG_LEVEL", "verbose", "'debug', 'info', 'warning' or 'error'"),
    ("TEXTGEN_LOCAL_THREADS", "-3", "greater than or equal to 1"),
    ("TEXTGEN_LOCAL_MODEL_INSTANCES", "0", "greater than or equal to 1"),
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
