"""What a process that dies leaves behind: a claimed batch is finished by the next process, each task charged
once; a sync request is failed as interrupted and charged nothing (its client got an error); a task claimed
too many times is failed with a reason that says so."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import run_server
from tests.fakes.providers import FakeProvider
from tests.processes import free_port, run_cli, textgen_env, textgen_process

GEMINI = {"model_name": "gemini-2.5-flash", "messages": [{"role": "user", "content": "hello there"}]}


@contextmanager
def fake_upstream(tmp_path: Path, delay_ms: float) -> Iterator[str]:
    port = free_port()
    log = tmp_path / f"upstream-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fakes.fake_gemini",
                "--port",
                str(port),
                "--delay-ms",
                str(delay_ms),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(300):
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def rows(db: Path, query: str, *args: Any) -> list[Any]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query, args).fetchall()


def test_a_claimed_batch_survives_sigkill_and_a_sync_request_is_not_rerun(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "crash.db"
    base = dict(
        TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{db}",
        TEXTGEN_LEASE_SECONDS="2",
        TEXTGEN_LOG_LEVEL="warning",
        TEXTGEN_WORKER_POLL_SECONDS="0.2",
        TEXTGEN_DEFAULT_RATE_LIMIT="100000",
        GEMINI_API_KEY="test-key",
        TEXTGEN_GEMINI_MAX_ATTEMPTS="1",
    )
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with fake_upstream(tmp_path, delay_ms=600_000) as held:
        env = textgen_env(**base, TEXTGEN_GEMINI_BASE_URL=held)
        with textgen_process("serve", "--port", str(port), env=env, log=log, port=port) as first:
            created = run_cli("accounts", "create", "batch", "--credits", "100000", "--json", env=env)
            account = json.loads(created.stdout)
            api_id, api_key = account["api_id"], account["api_key"]
            headers = {"X-API-ID": api_id, "X-API-KEY": api_key}
            answers = [
                httpx.post(f"{url}/sse/text_generator/", json=GEMINI, headers=headers, timeout=30)
                for _ in range(20)
            ]
            assert {answer.status_code for answer in answers} == {201}, answers[0].text
            ids = [answer.json()["id"] for answer in answers]
            sync_answer: list[Any] = []

            def sync_request() -> None:
                try:
                    httpx.post(f"{url}/sse/text_generator/", json={**GEMINI, "sync": True}, headers=headers)
                except httpx.HTTPError as exc:
                    sync_answer.append(exc)

            caller = threading.Thread(target=sync_request)
            caller.start()
            for _ in range(600):
                running = rows(db, "SELECT mode, COUNT(*) FROM tasks WHERE status = 'running' GROUP BY mode")
                if dict(running) == {"async": 20, "sync": 1}:
                    break
                time.sleep(0.05)
            assert dict(running) == {"async": 20, "sync": 1}, running
            first.send_signal(signal.SIGKILL)
            first.wait()
            caller.join(30)
            assert sync_answer, "the sync client saw its server die"
    (sync_id,) = rows(db, "SELECT id FROM tasks WHERE mode = 'sync'")[0]
    with fake_upstream(tmp_path, delay_ms=0) as quick:
        env = textgen_env(**base, TEXTGEN_GEMINI_BASE_URL=quick)
        with textgen_process("serve", "--port", str(port), env=env, log=log, port=port):
            for _ in range(1200):
                left = rows(db, "SELECT COUNT(*) FROM tasks WHERE status IN ('pending', 'running')")[0][0]
                if left == 0:
                    break
                time.sleep(0.05)
            assert left == 0
            tasks = [httpx.get(f"{url}/sse/text_generator/{i}/", headers=headers).json() for i in ids]
            interrupted = httpx.get(f"{url}/sse/text_generator/{sync_id}/", headers=headers).json()
    assert all(task["status"] == "done" and task["credits_used"] > 0 for task in tasks), tasks
    assert interrupted["status"] == "failed" and interrupted["credits_used"] == 0
    assert interrupted["failed_reason"].startswith("interrupted")
    for task_id in ids:
        kinds = [
            kind for (kind,) in rows(db, "SELECT kind FROM ledger WHERE task_id = ? ORDER BY id", task_id)
        ]
        assert kinds == ["reserve", "settle"]  # settled exactly once
    kinds = [kind for (kind,) in rows(db, "SELECT kind FROM ledger WHERE task_id = ? ORDER BY id", sync_id)]
    assert kinds == ["reserve", "release"]
    assert {attempts for (attempts,) in rows(db, "SELECT attempts FROM tasks WHERE mode = 'async'")} == {2}
    balance, total = rows(
        db, "SELECT a.balance, (SELECT SUM(amount) FROM ledger l WHERE l.account_id = a.id) FROM accounts a"
    )[0]
    assert balance == total


async def test_a_task_claimed_too_often_fails_and_is_charged_nothing(tmp_path: Path) -> None:
    from tests.conftest import make_settings
    from tests.fakes.providers import FAKE_MODELS_TOML

    models = tmp_path / "models.toml"
    models.write_text(FAKE_MODELS_TOML)
    settings = make_settings(tmp_path, models_file=models, task_max_attempts=3)
    fake = FakeProvider()
    body = {"model_name": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    async with run_server(settings, {"fake": fake}, run_worker=False) as server:
        account = await server.account(credits=1000)
        async with server.client(account) as client:
            doomed = (await client.post("/sse/text_generator/", json=body)).json()["id"]
            last_chance = (await client.post("/sse/text_generator/", json=body)).json()["id"]
    db = tmp_path / "textgen.db"
    # Both were claimed by processes that died while running them: one three times, one twice.
    for task_id, attempts in ((doomed, 3), (last_chance, 2)):
        with sqlite3.connect(db) as conn:
            conn.execute(
                "UPDATE tasks SET status = 'running', attempts = ?, lease_owner = 'dead',"
                " lease_expires_at = '2000-01-01 00:00:00.000000' WHERE id = ?",
                (attempts, task_id),
            )
    async with run_server(settings, {"fake": fake}) as server:
        failed = await server.wait_for(account, doomed)
        done = await server.wait_for(account, last_chance)
        summary = await server.services.storage.accounts.ledger_summary(account.id)
    assert failed["status"] == "failed" and failed["credits_used"] == 0
    assert "claimed 4 times" in failed["failed_reason"] and "3 attempts" in failed["failed_reason"]
    assert done["status"] == "done" and done["credits_used"] > 0
    assert len(fake.calls) == 1  # the abandoned task never reached the provider again
    assert summary.ledger_sum == summary.balance
