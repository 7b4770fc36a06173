"""Webhook delivery across real ``textgen`` processes: a SIGKILL between attempts, and scale-out workers."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from standardwebhooks import Webhook

from tests.processes import free_port
from tests.processes import textgen_env as base_env
from tests.test_webhooks import Answer, Receiver, serve_receiver

LOCAL_BODY = {
    "model_name": "smollm2-135m-instruct",
    "messages": [{"role": "user", "content": "Say hi."}],
    "config": {"max_output_tokens": 4},
}


def local_body(webhook_url: str) -> dict[str, Any]:
    return {**LOCAL_BODY, "webhook_url": webhook_url}


def textgen_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return base_env(
        TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/textgen.db",
        TEXTGEN_WEBHOOK_ALLOW_PRIVATE="true",
        TEXTGEN_WEBHOOK_JITTER="0",
        TEXTGEN_WEBHOOK_POLL_SECONDS="0.1",
        TEXTGEN_WORKER_POLL_SECONDS="0.1",
        TEXTGEN_SHUTDOWN_TIMEOUT_SECONDS="2",
        TEXTGEN_LOG_LEVEL="warning",
        **extra,
    )


async def textgen(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "textgen",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


@asynccontextmanager
async def process(env: dict[str, str], log: Path, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "textgen", *args, env=env, stdout=out, stderr=out
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_ready(url: str, proc: asyncio.subprocess.Process, log: Path) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"server exited; see {log}")
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"server not ready; see {log}")
            await asyncio.sleep(0.1)


async def poll_deliveries(
    url: str, headers: dict[str, str], task_id: str, done: Any, within: float = 60.0
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + within
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
        while True:
            response = await client.get(f"/sse/text_generator/{task_id}/webhooks/")
            assert response.status_code == 200, response.text
            results = response.json()["results"]
            if results and done(results[-1]):
                return results[-1]  # type: ignore[no-any-return]
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"deliveries of {task_id}: {results}")
            await asyncio.sleep(0.05)


async def account(env: dict[str, str]) -> tuple[dict[str, str], str]:
    created = json.loads(await textgen(env, "accounts", "create", "hooks", "--json"))
    shown = json.loads(await textgen(env, "accounts", "show", created["api_id"], "--json"))
    return {"X-API-ID": created["api_id"], "X-API-KEY": created["api_key"]}, shown["webhook_secret"]


async def test_delivery_survives_a_sigkill_between_attempts(tmp_path: Path) -> None:
    # The second attempt is due 3 s after the first: the server is killed in between.
    env = textgen_env(tmp_path, TEXTGEN_WEBHOOK_SCHEDULE="0,3,3")
    await textgen(env, "migrate")
    headers, secret = await account(env)
    receiver = Receiver(Answer(500))
    log = tmp_path / "serve.log"
    async with serve_receiver(receiver) as hook:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        async with process(env, log, "serve", "--port", str(port), "--no-migrate") as first:
            await wait_ready(url, first, log)
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
                response = await client.post("/sse/text_generator/", json=local_body(f"{hook}/h"))
                assert response.status_code == 201, response.text
                task_id = response.json()["id"]
            await receiver.wait(1)
            pending = await poll_deliveries(url, headers, task_id, lambda d: d["attempt_count"] == 1)
            first.kill()
            await first.wait()
        assert pending["status"] == "pending"
        assert pending["attempts"][0]["status_code"] == 500
        assert len(receiver.seen) == 1, "the retry came before the kill; the test proves nothing"

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        async with process(env, log, "serve", "--port", str(port), "--no-migrate") as second:
            await wait_ready(url, second, log)
            seen = await receiver.wait(2)
            delivered = await poll_deliveries(url, headers, task_id, lambda d: d["status"] == "delivered")
    assert seen[0].headers["webhook-id"] == seen[1].headers["webhook-id"] == delivered["id"]
    payload = Webhook(secret).verify(seen[1].body, seen[1].headers)
    assert payload["id"] == task_id
    assert payload["status"] == "done"
    assert [a["status_code"] for a in delivered["attempts"]] == [500, 200]


async def test_textgen_worker_sends_deliveries_queued_by_an_api_process(tmp_path: Path) -> None:
    env = textgen_env(tmp_path, TEXTGEN_WEBHOOK_SCHEDULE="0")
    await textgen(env, "migrate")
    headers, secret = await account(env)
    receiver = Receiver()
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    api_env = {**env, "TEXTGEN_RUN_WORKER": "false"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with (
        serve_receiver(receiver) as hook,
        process(api_env, api_log, "serve", "--port", str(port), "--no-migrate") as api,
        process(env, worker_log, "worker") as worker,
    ):
        await wait_ready(url, api, api_log)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
            response = await client.post("/sse/text_generator/", json=local_body(f"{hook}/h"))
            assert response.status_code == 201, response.text
            task_id = response.json()["id"]
            [seen] = await receiver.wait(1)
            assert Webhook(secret).verify(seen.body, seen.headers)["id"] == task_id
            # A redelivery queued by the API process (which sends nothing) reaches the worker by polling.
            queued = await client.post(f"/sse/text_generator/{task_id}/webhooks/redeliver/")
            assert queued.status_code == 201, queued.text
            second = (await receiver.wait(2))[1]
        assert second.headers["webhook-id"] == queued.json()["id"]
        assert worker.returncode is None, worker_log.read_text()
