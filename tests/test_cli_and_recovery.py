"""The command line, first-start bootstrap, and crash recovery of a leased task (real processes)."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import httpx

from tests.processes import bootstrap_credentials, free_port, run_cli, textgen_env, textgen_process


def test_accounts_commands(tmp_path: Path) -> None:
    env = textgen_env(TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/cli.db")
    assert run_cli("migrate", env=env).returncode == 0
    created = run_cli("accounts", "create", "acme", "--credits", "5", "--rate-limit", "7", "--json", env=env)
    assert created.returncode == 0, created.stderr
    account = json.loads(created.stdout)
    assert account["api_key"].startswith("tgk_") and account["api_id"].startswith("tg_")
    assert account["remaining_credits"] == 5 and account["rate_limit_per_minute"] == 7
    shown = json.loads(run_cli("accounts", "show", account["api_id"], "--json", env=env).stdout)
    assert "api_key" not in shown
    assert account["api_key"] not in json.dumps(shown)
    assert account["api_key"].startswith(shown["keys"][0]["prefix"])
    assert shown["webhook_secret"].startswith("whsec_")
    credited = run_cli("accounts", "credit", account["api_id"], "2.5", env=env)
    assert credited.returncode == 0 and "7.5" in credited.stdout
    assert (
        json.loads(run_cli("accounts", "show", account["api_id"], "--json", env=env).stdout)[
            "remaining_credits"
        ]
        == 7.5
    )
    overdrawn = run_cli("accounts", "credit", account["api_id"], "-100", env=env)
    assert overdrawn.returncode != 0 and "below zero" in overdrawn.stderr
    missing = run_cli("accounts", "show", "tg_nobody", env=env)
    assert missing.returncode == 1
    # Only a hash of the key is stored.
    with sqlite3.connect(tmp_path / "cli.db") as db:
        stored = db.execute("SELECT key_hash FROM api_keys").fetchall()
    assert all(account["api_key"] not in row[0] for row in stored)
    bad = run_cli("migrate", env={**env, "TEXTGEN_DATABASE_URL": "mysql://nope"})
    assert bad.returncode == 2 and "TEXTGEN_DATABASE_URL" in bad.stderr


def test_killed_server_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL while a task is generating; after a restart the expired lease is reclaimed and it completes."""
    port = free_port()
    db = tmp_path / "crash.db"
    env = textgen_env(
        TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{db}",
        TEXTGEN_LEASE_SECONDS="2",
        TEXTGEN_LOG_LEVEL="warning",
        TEXTGEN_WORKER_POLL_SECONDS="0.2",
        TEXTGEN_DEFAULT_RATE_LIMIT="100000",
    )
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    body = {
        "model_name": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Count from 1 to 300, one number per line."}],
        "config": {"max_output_tokens": 200, "temperature": 0.0},
    }
    with textgen_process("serve", "--port", str(port), env=env, log=log, port=port) as first:
        api_id, api_key = bootstrap_credentials(log)
        headers = {"X-API-ID": api_id, "X-API-KEY": api_key}
        task = httpx.post(f"{url}/sse/text_generator/", json=body, headers=headers, timeout=30).json()
        for _ in range(600):
            status = httpx.get(f"{url}/sse/text_generator/{task['id']}/", headers=headers).json()["status"]
            if status != "pending":
                break
            time.sleep(0.05)
        assert status == "running"
        first.send_signal(signal.SIGKILL)
        first.wait()
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT status, lease_owner FROM tasks WHERE id = ?", (task["id"],)).fetchone()
    assert row[0] == "running" and row[1]
    with textgen_process("serve", "--port", str(port), env=env, log=log, port=port):
        for _ in range(1200):
            done = httpx.get(f"{url}/sse/text_generator/{task['id']}/", headers=headers).json()
            if done["status"] in ("done", "failed"):
                break
            time.sleep(0.1)
        assert done["status"] == "done", done
        assert done["response_text"]
        remaining = httpx.get(f"{url}/api/remaining_credits/", headers=headers).json()["remaining_credits"]
    with sqlite3.connect(db) as conn:
        attempts = conn.execute("SELECT attempts FROM tasks WHERE id = ?", (task["id"],)).fetchone()[0]
        kinds = [
            r[0] for r in conn.execute("SELECT kind FROM ledger WHERE task_id = ? ORDER BY id", (task["id"],))
        ]
        balance, total = conn.execute(
            "SELECT a.balance, (SELECT SUM(amount) FROM ledger l WHERE l.account_id = a.id) FROM accounts a"
        ).fetchone()
    assert attempts == 2
    assert kinds == ["reserve", "settle"]  # settled exactly once
    assert balance == total
    assert abs(remaining - balance / 1e6) < 1e-9
    assert done["credits_used"] > 0
