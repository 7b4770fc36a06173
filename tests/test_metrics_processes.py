"""/metrics across real processes: ``textgen serve --workers 2`` on one port, and ``textgen worker``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from tests.conftest import serve_app
from tests.fakes.fake_gemini import FakeGemini, Fault
from tests.processes import free_port
from tests.test_metrics import Scrape
from tests.test_webhooks import Receiver, serve_receiver
from tests.test_webhooks_process import process, textgen, textgen_env, wait_ready

TOKEN = "metrics-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CREDITS_ROUTE = {"method": "GET", "route": "/api/remaining_credits/", "status": "200"}
# A new connection per request, so that both processes behind the port get some of them.
FRESH = httpx.Limits(max_keepalive_connections=0)

pytestmark = pytest.mark.timeout(240)


def counted_by_process(directory: Path) -> dict[int, float]:
    """Requests to the credits route, per process, read from each process's own file."""
    out: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        for family in MultiProcessCollector.merge([str(path)]):
            for sample in family.samples:
                if sample.name == "textgen_http_requests_total" and sample.labels == CREDITS_ROUTE:
                    out[pid] = out.get(pid, 0.0) + sample.value
    return out


async def scrape(url: str) -> Scrape:
    async with httpx.AsyncClient(limits=FRESH, timeout=30) as client:
        response = await client.get(f"{url}/metrics", headers=AUTH)
    assert response.status_code == 200, response.text
    return Scrape(response.text)


async def account(env: dict[str, str]) -> dict[str, str]:
    created = json.loads(await textgen(env, "accounts", "create", "m", "--rate-limit", "100000", "--json"))
    return {"X-API-ID": created["api_id"], "X-API-KEY": created["api_key"]}


def in_flight_by_process(directory: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for path in directory.glob("gauge_livesum_*.db"):
        pid = int(path.stem.removeprefix("gauge_livesum_"))
        for family in MultiProcessCollector.merge([str(path)]):
            for sample in family.samples:
                if sample.name == "textgen_tasks_in_flight" and sample.value:
                    out[pid] = out.get(pid, 0.0) + sample.value
    return out


async def test_every_scrape_of_two_workers_on_one_port_counts_both(tmp_path: Path) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    (shared / "counter_1.db").write_bytes(b"left over from an earlier run")
    upstream = FakeGemini(record=False)
    upstream.add_fault(Fault(delay=60))  # the generation in flight when its process is killed
    async with serve_app(upstream.app) as gemini_url:
        env = textgen_env(
            tmp_path,
            TEXTGEN_ADMIN_TOKEN=TOKEN,
            TEXTGEN_LOCAL_MODEL_INSTANCES="1",
            TEXTGEN_GEMINI_BASE_URL=gemini_url,
            GEMINI_API_KEY="test-key",
            PROMETHEUS_MULTIPROC_DIR=str(shared),
        )
        await textgen(env, "migrate")
        headers = await account(env)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / "serve.log"
        async with (
            process(env, log, "serve", "--port", str(port), "--no-migrate", "--workers", "2") as api,
            httpx.AsyncClient(base_url=url, headers=headers, limits=FRESH, timeout=90) as client,
        ):
            await wait_ready(url, api, log)
            assert not (shared / "counter_1.db").exists(), "counts of an earlier run were kept"
            sent = 0
            for _ in range(100):
                answers = await asyncio.gather(*(client.get("/api/remaining_credits/") for _ in range(20)))
                assert all(a.status_code == 200 for a in answers)
                sent += len(answers)
                if len(counted_by_process(shared)) >= 2:
                    break
            by_process = counted_by_process(shared)
            assert len(by_process) == 2, f"one process answered all {sent} requests: {by_process}"
            assert sum(by_process.values()) == sent
            # Whichever process answers a scrape, it reports what both counted.
            for _ in range(8):
                assert (await scrape(url)).get("textgen_http_requests_total", **CREDITS_ROUTE) == sent

            slow = {
                "model_name": "gemini-2.5-flash",
                "messages": [{"role": "user", "content": "hi"}],
                "sync": True,
            }
            hanging = asyncio.ensure_future(client.post("/sse/text_generator/", json=slow))
            for _ in range(3000):
                holding = in_flight_by_process(shared)
                if holding:
                    break
                await asyncio.sleep(0.02)
            [victim] = holding
            assert victim in by_process
            for _ in range(4):
                assert (await scrape(url)).get("textgen_tasks_in_flight", provider="gemini") == 1
            # Killed outright: its counts stay in the sum, its generation leaves the in-flight gauge.
            os.kill(victim, signal.SIGKILL)
            with contextlib.suppress(httpx.HTTPError):
                await hanging
            await wait_ready(url, api, log)
            for _ in range(8):
                seen = await scrape(url)
                assert seen.get("textgen_http_requests_total", **CREDITS_ROUTE) == sent
                assert seen.get("textgen_tasks_in_flight", provider="gemini") == 0
    assert not list(shared.glob("gauge_live*")), "a stopped process left its in-flight gauges behind"


async def test_a_worker_process_serves_its_own_metrics(tmp_path: Path) -> None:
    upstream = FakeGemini(record=False)
    receiver = Receiver()
    async with serve_app(upstream.app) as gemini_url, serve_receiver(receiver) as hook:
        env = textgen_env(
            tmp_path,
            TEXTGEN_ADMIN_TOKEN=TOKEN,
            TEXTGEN_LOCAL_MODEL_INSTANCES="1",
            TEXTGEN_WEBHOOK_SCHEDULE="0",
            TEXTGEN_GEMINI_BASE_URL=gemini_url,
            GEMINI_API_KEY="test-key",
        )
        await textgen(env, "migrate")
        headers = await account(env)
        api_port, metrics_port = free_port(), free_port()
        api_url, worker_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{metrics_port}"
        api_env = {**env, "TEXTGEN_RUN_WORKER": "false"}
        api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
        worker_args = ("worker", "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1")
        async with (
            process(api_env, api_log, "serve", "--port", str(api_port), "--no-migrate") as api,
            process(env, worker_log, *worker_args) as worker,
        ):
            await wait_ready(api_url, api, api_log)
            async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30) as client:
                ids = []
                for i in range(3):
                    body = {
                        "model_name": "gemini-2.5-flash",
                        "messages": [{"role": "user", "content": f"task {i}"}],
                        "webhook_url": f"{hook}/h",
                    }
                    response = await client.post("/sse/text_generator/", json=body)
                    assert response.status_code == 201, response.text
                    ids.append(response.json()["id"])
                await receiver.wait(3)
                tasks = [(await client.get(f"/sse/text_generator/{i}/")).json() for i in ids]
            assert [t["status"] for t in tasks] == ["done"] * 3
            async with httpx.AsyncClient(timeout=30) as client:
                assert (await client.get(f"{worker_url}/metrics")).status_code == 401
                attempts = "textgen_webhook_attempts_total"
                for _ in range(500):
                    seen = await scrape(worker_url)
                    if seen.get(attempts, outcome="delivered", answer="2xx") >= 3:
                        break
                    await asyncio.sleep(0.02)
            assert seen.get(attempts, outcome="delivered", answer="2xx") == 3
            model = {"model": "gemini-2.5-flash"}
            assert seen.get("textgen_task_outcomes_total", status="done", failure="none", **model) == 3
            assert seen.get("textgen_tokens_total", kind="input", **model) == sum(
                t["input_tokens"] for t in tasks
            )
            assert seen.get("textgen_tokens_total", kind="output", **model) == sum(
                t["output_tokens"] for t in tasks
            )
            assert seen.get("textgen_upstream_seconds_count", **model) == 3
            on_api = await scrape(api_url)
            assert on_api.get(attempts, outcome="delivered", answer="2xx") == 0
            assert on_api.get("textgen_task_outcomes_total", status="done", failure="none", **model) == 0
            assert on_api.get("textgen_queue_tasks", status="pending") == seen.get(
                "textgen_queue_tasks", status="pending"
            )
            assert worker.returncode is None, worker_log.read_text()
        assert worker.returncode == 0, worker_log.read_text()
