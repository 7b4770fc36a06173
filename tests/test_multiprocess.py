"""Scale-out end to end: 2 `textgen serve` + 3 `textgen worker` processes on one PostgreSQL and one Redis.

A few hundred async tasks with webhooks go through a fake Gemini upstream while one worker is SIGKILLed
mid-task. Afterwards every task is finished and settled exactly once, the credits reconcile with the
ledger, every webhook delivery id reached the receiver once, and one rate limit held across both APIs.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import serve_app
from tests.fakes.fake_gemini import FakeGemini, Fault
from tests.pgdb import pg_template, pg_url  # noqa: F401  (fixtures)
from tests.processes import free_port, run_cli, textgen_env
from textgen.settings import load_settings
from textgen.storage import Storage

TASKS = 300
CREDITS = 1_000_000.0
CREATE = "/sse/text_generator/"


class Receiver:
    """A webhook receiver on loopback that counts deliveries by their ``webhook-id``."""

    def __init__(self) -> None:
        self.by_id: collections.Counter[str] = collections.Counter()
        self.task_ids: set[str] = set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        self.by_id[headers[b"webhook-id"].decode()] += 1
        self.task_ids.add(json.loads(body)["id"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


class Fleet:
    """The processes of one deployment; every one of them is stopped at the end, also on failure."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, **extra_env: str) -> subprocess.Popen[bytes]:
        with (self.tmp_path / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "textgen", *args],
                env={**self.env, **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")[-3000:]

    def terminate_all(self, grace: float) -> dict[str, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes[name] = None
        return codes


@contextmanager
def fleet(tmp_path: Path, env: dict[str, str]) -> Iterator[Fleet]:
    processes = Fleet(tmp_path, env)
    try:
        yield processes
    finally:
        processes.terminate_all(grace=20)


async def wait_ready(client: httpx.AsyncClient, url: str, proc: subprocess.Popen[bytes], log: str) -> None:
    for _ in range(600):
        assert proc.poll() is None, f"{url} exited early:\n{log}"
        try:
            if (await client.get(f"{url}/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


@pytest.mark.timeout(240)
async def test_two_apis_three_workers_one_killed(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    upstream = FakeGemini(record=False)
    # Every generation takes a little while, so the kill lands while the victim holds tasks.
    for _ in range(TASKS * 2):
        upstream.add_fault(Fault(delay=0.15))
    receiver = Receiver()
    async with AsyncExitStack() as stack:
        gemini_url = await stack.enter_async_context(serve_app(upstream.app))
        hook_url = await stack.enter_async_context(serve_app(receiver))
        env = textgen_env(
            TEXTGEN_DATABASE_URL=pg_url,
            TEXTGEN_REDIS_URL="redis://127.0.0.1:6379/0",
            TEXTGEN_LEASE_SECONDS="2",
            TEXTGEN_WORKER_POLL_SECONDS="1",
            TEXTGEN_WORKER_CONCURRENCY="4",
            TEXTGEN_SHUTDOWN_TIMEOUT_SECONDS="5",
            TEXTGEN_WEBHOOK_ALLOW_PRIVATE="true",
            TEXTGEN_WEBHOOK_POLL_SECONDS="0.5",
            TEXTGEN_WEBHOOK_JITTER="0",
            TEXTGEN_WEBHOOK_SCHEDULE="0,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
            TEXTGEN_GEMINI_BASE_URL=gemini_url,
            TEXTGEN_GEMINI_RETRY_INITIAL_DELAY_SECONDS="0.01",
            TEXTGEN_LOG_LEVEL="warning",
            TEXTGEN_LOCAL_MODEL_INSTANCES="1",
            GEMINI_API_KEY="test-key",
        )
        main = json.loads(
            run_cli(
                "accounts",
                "create",
                "main",
                "--credits",
                str(CREDITS),
                "--rate-limit",
                "100000",
                "--json",
                env=env,
            ).stdout
        )
        limited = json.loads(
            run_cli("accounts", "create", "limited", "--rate-limit", "10", "--json", env=env).stdout
        )
        ports = [free_port(), free_port()]
        with fleet(tmp_path, env) as processes:
            apis = [
                processes.start(f"api{i}", "serve", "--port", str(port), TEXTGEN_RUN_WORKER="false")
                for i, port in enumerate(ports)
            ]
            workers = [processes.start(f"worker{i}", "worker", "--concurrency", "4") for i in range(3)]
            urls = [f"http://127.0.0.1:{port}" for port in ports]
            db = await asyncpg.connect(pg_url.replace("postgresql+asyncpg://", "postgresql://"))
            stack.push_async_callback(db.close)
            async with httpx.AsyncClient(timeout=60) as client:
                for i, (url, proc) in enumerate(zip(urls, apis, strict=True)):
                    await wait_ready(client, url, proc, processes.log(f"api{i}"))
                headers = {"X-API-ID": main["api_id"], "X-API-KEY": main["api_key"]}

                # --- a few hundred async tasks, spread over both APIs ---------------------------
                gate = asyncio.Semaphore(16)

                async def submit(i: int) -> str:
                    body = {
                        "model_name": "gemini-2.5-flash",
                        "messages": [{"role": "user", "content": f"task {i}"}],
                        "config": {"max_output_tokens": 32},
                        "webhook_url": f"{hook_url}/hook",
                    }
                    async with gate:
                        response = await client.post(f"{urls[i % 2]}{CREATE}", json=body, headers=headers)
                    assert response.status_code == 201, response.text
                    return str(response.json()["id"])

                submitting = asyncio.gather(*(submit(i) for i in range(TASKS)))

                # --- SIGKILL one worker while it holds tasks ---------------------------------------
                victim = workers[0]
                held: list[str] = []
                for _ in range(1200):
                    held = [
                        row["id"]
                        for row in await db.fetch(
                            "SELECT id FROM tasks WHERE status = 'running' AND lease_owner LIKE $1",
                            f"%-{victim.pid}-%",
                        )
                    ]
                    if held:
                        break
                    await asyncio.sleep(0.01)
                assert held, "the victim never claimed a task"
                victim.send_signal(signal.SIGKILL)
                victim.wait()

                # --- one rate limit across both API processes ---------------------------------------
                limited_headers = {"X-API-ID": limited["api_id"], "X-API-KEY": limited["api_key"]}
                answers = [
                    (
                        await client.get(f"{urls[i % 2]}/api/remaining_credits/", headers=limited_headers)
                    ).status_code
                    for i in range(24)
                ]
                assert answers.count(200) == 10 and answers.count(429) == 14, answers

                ids = await submitting
                assert len(set(ids)) == TASKS

                # --- wait for every task and every delivery --------------------------------------
                for _ in range(1200):
                    open_tasks = await db.fetchval(
                        "SELECT count(*) FROM tasks WHERE status IN ('pending', 'running')"
                    )
                    open_hooks = await db.fetchval(
                        "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
                    )
                    if open_tasks == 0 and open_hooks == 0 and len(receiver.by_id) >= TASKS:
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(
                        f"{open_tasks} tasks and {open_hooks} deliveries unfinished\n{processes.log('worker1')}"
                    )

            # --- graceful shutdown of the survivors ------------------------------------------------
            codes = processes.terminate_all(grace=20)
            # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is done.
            assert codes["api0"] in (0, -signal.SIGTERM) and codes["api1"] in (0, -signal.SIGTERM), codes
            assert codes["worker1"] == codes["worker2"] == 0, {n: processes.log(n) for n in codes}

        # --- every task finished, settled exactly once -----------------------------------------
        rows = await db.fetch("SELECT id, status, attempts, credits_used, credits_reserved FROM tasks")
        tasks = {row["id"]: row for row in rows}
        assert set(tasks) == set(ids)
        assert all(row["status"] == "done" for row in rows), collections.Counter(r["status"] for r in rows)
        for task_id in held:
            assert tasks[task_id]["attempts"] == 2  # reclaimed after the lease expired, run once more
        assert all(row["attempts"] in (1, 2) for row in rows)
        ledger = await db.fetch("SELECT task_id, kind, count(*) AS n FROM ledger GROUP BY task_id, kind")
        per_task: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for row in ledger:
            if row["task_id"] is not None:
                per_task[row["task_id"]][row["kind"]] = row["n"]
        assert all(per_task[task_id] == {"reserve": 1, "settle": 1} for task_id in ids)

        # --- credits reconcile -------------------------------------------------------------------
        for account in (main, limited):
            balance, total = await db.fetchrow(
                "SELECT a.balance, (SELECT sum(amount) FROM ledger l WHERE l.account_id = a.id) "
                "FROM accounts a WHERE api_id = $1",
                account["api_id"],
            )
            assert balance == total
        charged = sum(row["credits_used"] for row in rows)
        assert charged > 0
        main_balance = await db.fetchval("SELECT balance FROM accounts WHERE api_id = $1", main["api_id"])
        assert main_balance == round(CREDITS * 1_000_000) - charged

        # --- one delivery per task, each delivery id received once ---------------------------------
        deliveries = await db.fetch("SELECT id, task_id, status FROM webhook_deliveries")
        assert sorted(d["task_id"] for d in deliveries) == sorted(ids)
        assert all(d["status"] == "delivered" for d in deliveries)
        assert set(receiver.by_id) == {d["id"] for d in deliveries}
        assert receiver.task_ids == set(ids)
        assert all(n == 1 for n in receiver.by_id.values()), receiver.by_id.most_common(3)


@pytest.mark.timeout(120)
async def test_sigterm_finishes_what_it_can_and_releases_the_rest(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    upstream = FakeGemini(record=False)
    upstream.add_fault(Fault(delay=0.5))  # finishes within the shutdown timeout
    upstream.add_fault(Fault(delay=600))  # does not: it goes back to the queue
    async with serve_app(upstream.app) as gemini_url:
        env = textgen_env(
            TEXTGEN_DATABASE_URL=pg_url,
            TEXTGEN_SHUTDOWN_TIMEOUT_SECONDS="3",
            TEXTGEN_GEMINI_BASE_URL=gemini_url,
            TEXTGEN_LOG_LEVEL="warning",
            TEXTGEN_LOCAL_MODEL_INSTANCES="1",
            GEMINI_API_KEY="test-key",
        )
        account = json.loads(run_cli("accounts", "create", "main", "--json", env=env).stdout)
        store = Storage.open(load_settings(database_url=pg_url))
        try:
            owner = await store.accounts.account_by_api_id(account["api_id"])
            assert owner is not None
            ids = [
                (
                    await store.tasks.create(
                        account_id=owner.id,
                        model_name="gemini-2.5-flash",
                        mode="async",
                        request={"messages": [{"role": "user", "content": "hi"}], "config": {}},
                        webhook_url=None,
                        reserve=1_000_000,
                    )
                ).id
                for _ in range(2)
            ]
            with fleet(tmp_path, env) as processes:
                worker = processes.start("worker", "worker", "--concurrency", "2")
                for _ in range(600):
                    counts = await store.tasks.counts()
                    if counts.get("running") == 2 and upstream.faults == collections.deque():
                        break
                    await asyncio.sleep(0.05)
                assert await store.tasks.counts() == {"running": 2}
                worker.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(worker.wait, 60)
                assert code == 0, processes.log("worker")
            finished = {task_id: await store.tasks.get(task_id) for task_id in ids}
            assert sorted(t.status for t in finished.values()) == ["done", "pending"]
            released = next(t for t in finished.values() if t.status == "pending")
            assert released.lease_owner is None and released.credits_used == 0
            summary = await store.accounts.ledger_summary(owner.id)
            assert summary.balance == summary.ledger_sum
        finally:
            await store.aclose()
