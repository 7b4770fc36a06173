"""POST /sse/text_generator/{id}/cancel/ over real HTTP: pending, running (async, sync, stream, local model),
finished, foreign, across processes on PostgreSQL; the ledger reconciles after each."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from tests.conftest import Account, Server, make_settings, run_server
from tests.fakes.providers import FakeProvider
from tests.pgdb import pg_template, pg_url  # noqa: F401  (fixtures)

FAKE = {"model_name": "fake-model", "messages": [{"role": "user", "content": "one two three"}]}
LOCAL = {
    "model_name": "smollm2-135m-instruct",
    "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
    "config": {"max_output_tokens": 400, "temperature": 1.0},
}


async def reconciled(server: Server, account: Account) -> float:
    summary = await server.services.storage.accounts.ledger_summary(account.id)
    assert summary.ledger_sum == summary.balance
    return summary.balance / 1_000_000


async def cancel(client: httpx.AsyncClient, task_id: str, prefix: str = "/sse") -> httpx.Response:
    return await client.post(f"{prefix}/text_generator/{task_id}/cancel/")


async def test_a_pending_task_never_starts_and_is_charged_nothing(settings: Any) -> None:
    fake = FakeProvider()
    async with run_server(settings, {"fake": fake}, run_worker=False) as server:
        account = await server.account(credits=1000)
        async with server.client(account) as client:
            created = (await client.post("/sse/text_generator/", json=FAKE)).json()
            assert created["status"] == "pending"
            answer = await cancel(client, created["id"])
            assert answer.status_code == 200, answer.text
            task = answer.json()
            assert task["status"] == "failed" and task["failed_reason"] == "cancelled"
            assert task["credits_used"] == 0
            again = await cancel(client, created["id"], prefix="/api")
            assert again.status_code == 409 and "already finished" in again.json()["error"]
        assert await reconciled(server, account) == 1000
        assert fake.calls == []


async def test_a_running_async_task_stops_and_is_charged_what_it_used(settings: Any) -> None:
    fake = FakeProvider(gate=asyncio.Event())  # runs until released: only a cancel ends it
    async with run_server(settings, {"fake": fake}) as server:
        account = await server.account(credits=1000)
        async with server.client(account) as client:
            created = (await client.post("/sse/text_generator/", json=FAKE)).json()
            await asyncio.wait_for(fake.started.wait(), 30)
            task = (await cancel(client, created["id"])).json()
        assert task["status"] == "failed" and task["failed_reason"] == "cancelled"
        assert task["input_tokens"] == 7 and task["output_tokens"] == 0
        assert task["credits_used"] > 0  # the prompt it had read (7 tokens at the fake price)
        assert await reconciled(server, account) == 1000 - task["credits_used"]


async def test_a_running_sync_request_answers_cancelled(settings: Any) -> None:
    fake = FakeProvider(gate=asyncio.Event())
    async with run_server(settings, {"fake": fake}) as server:
        account = await server.account(credits=1000)
        async with server.client(account) as client:
            sync = asyncio.create_task(client.post("/sse/text_generator/", json={**FAKE, "sync": True}))
            await asyncio.wait_for(fake.started.wait(), 30)
            [row], _ = await server.services.storage.tasks.list(account.id, limit=1)
            cancelled = await cancel(client, row.id)
            answered = await sync
        assert cancelled.json()["status"] == "failed"
        assert answered.status_code == 201
        assert answered.json()["failed_reason"] == "cancelled"
        await reconciled(server, account)


async def test_a_stream_ends_with_an_error_event_and_keeps_what_it_sent(settings: Any) -> None:
    fake = FakeProvider(chunk_delay=0.3)
    async with run_server(settings, {"fake": fake}) as server:
        account = await server.account(credits=1000)
        body = {**FAKE, "messages": [{"role": "user", "content": " ".join(["word"] * 50)}]}
        events: list[tuple[str, dict[str, Any]]] = []
        async with (
            server.client(account) as client,
            aconnect_sse(client, "POST", "/sse/text_generator/stream/", json=body) as source,
        ):
            task_id = source.response.headers["x-textgen-task-id"]
            async for sse in source.aiter_sse():
                events.append((sse.event, json.loads(sse.data)))
                if len(events) == 2:
                    async with server.client(account) as other:
                        assert (await cancel(other, task_id)).status_code == 200
        kinds = [kind for kind, _ in events]
        assert kinds[-1] == "error" and "cancelled" in events[-1][1]["error"]["message"]
        assert len(events) < 50  # stopped long before the end
        task = await server.wait_for(account, task_id)
        assert task["status"] == "failed" and task["failed_reason"] == "cancelled"
        assert task["output_tokens"] >= 2
        await reconciled(server, account)


async def test_the_local_model_stops_within_a_token(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path)) as server:
        account = await server.account(credits=1000)
        local = server.services.registry.providers["local"]
        [engine] = local.engines  # type: ignore[attr-defined]
        async with server.client(account) as client:
            created = (await client.post("/sse/text_generator/", json=LOCAL)).json()
            for _ in range(3000):  # until it is well into its answer
                if engine.sampled >= 5:
                    break
                await asyncio.sleep(0.02)
            task = (await cancel(client, created["id"])).json()
            stopped = engine.sampled
        assert task["status"] == "failed" and task["failed_reason"] == "cancelled"
        assert 0 < task["output_tokens"] < 400
        assert task["credits_used"] > 0
        await asyncio.sleep(0.3)
        assert engine.sampled - stopped <= 1
        await reconciled(server, account)


async def test_finished_and_foreign_tasks(settings: Any) -> None:
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        owner, stranger = await server.account(name="owner"), await server.account(name="stranger")
        async with server.client(owner) as client:
            done = (await client.post("/sse/text_generator/", json={**FAKE, "sync": True})).json()
            pending = (await client.post("/sse/text_generator/", json=FAKE)).json()
            conflict = await cancel(client, done["id"])
            assert conflict.status_code == 409
            assert (await client.get(f"/sse/text_generator/{done['id']}/")).json() == done
        async with server.client(stranger) as client:
            assert (await cancel(client, pending["id"])).status_code == 404
            assert (await cancel(client, "no-such-task")).status_code == 404
        await reconciled(server, owner)


async def test_a_task_running_in_another_process_stops_promptly(
    tmp_path: Path,
    models_file: Path,
    pg_url: str,  # noqa: F811
) -> None:
    # A lease of an hour: only the cancel channel (not a renewal) can tell the worker in time.
    runner_side = make_settings(tmp_path, models_file=models_file, database_url=pg_url, lease_seconds=3600)
    api_side = make_settings(tmp_path, models_file=models_file, database_url=pg_url)
    fake = FakeProvider(gate=asyncio.Event())
    async with (
        run_server(runner_side, {"fake": fake}) as runner,
        run_server(api_side, {"fake": FakeProvider()}, run_worker=False) as api,
    ):
        listener = runner.services.listener
        assert listener is not None
        await asyncio.wait_for(listener.connected.wait(), 30)
        account = await api.account(credits=1000)
        async with api.client(account) as client:
            created = (await client.post("/sse/text_generator/", json=FAKE)).json()
            await asyncio.wait_for(fake.started.wait(), 30)
            task = (await cancel(client, created["id"])).json()
        assert task["status"] == "failed" and task["failed_reason"] == "cancelled"
        await reconciled(api, account)
