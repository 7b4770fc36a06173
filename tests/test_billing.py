"""What a generation is charged however it ends: done, failed after output, cut off, blocked, disconnected.

Over real HTTP, against the embedded model and the fake Gemini upstream; each test checks the task's recorded
usage, its credits (priced from that usage, never more than reserved) and that the ledger reconciles.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from httpx_sse import aconnect_sse

from tests.conftest import Account, Server, make_settings, run_server
from tests.fakes.fake_gemini import Fault
from tests.fakes.providers import FakeProvider
from tests.test_gemini import fake_gemini, gemini_service
from textgen.catalog import from_micro

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "gemini-fixtures" / "generate"
STREAM = "/sse/text_generator/stream/"
LOCAL_MODEL = "smollm2-135m-instruct"
GEMINI = {
    "model_name": "gemini-2.5-flash",
    "messages": [{"role": "user", "content": "Write a short tagline for an AI video tool."}],
    "config": {"max_output_tokens": 256},
}
STORY_SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}


def fixture(name: str) -> dict[str, Any]:
    (path,) = FIXTURES.glob(f"{name}-*.json")
    body: dict[str, Any] = json.loads(path.read_text())
    return body


def price(server: Server, model: str, input_tokens: int, output_tokens: int) -> float:
    spec = server.services.registry.catalog[model]
    return from_micro(server.services.lifecycle.pricing.cost(spec, input_tokens, output_tokens))


async def reconciled(server: Server, account: Account) -> float:
    """The account's balance, after checking that it is the sum of its ledger."""
    summary = await server.services.storage.accounts.ledger_summary(account.id)
    assert summary.ledger_sum == summary.balance
    return from_micro(summary.balance)


async def reserved(server: Server, task_id: str) -> float:
    return from_micro((await server.services.storage.tasks.get(task_id)).credits_reserved)


async def stream_events(server: Server, account: Account, body: dict[str, Any]) -> list[tuple[str, Any]]:
    async with server.client(account) as client, aconnect_sse(client, "POST", STREAM, json=body) as source:
        assert source.response.status_code == 200, await source.response.aread()
        return [(sse.event, json.loads(sse.data)) async for sse in source.aiter_sse()]


async def assert_charged_for_its_usage(
    server: Server, account: Account, task: dict[str, Any], credits_before: float
) -> None:
    """The task is charged the price of its recorded tokens (within its reservation); the ledger agrees."""
    expected = min(
        price(server, task["model_name"], task["input_tokens"], task["output_tokens"]),
        await reserved(server, task["id"]),
    )
    assert task["credits_used"] == pytest.approx(expected)
    assert await reconciled(server, account) == pytest.approx(credits_before - task["credits_used"])


# -- the embedded model -------------------------------------------------------------------------------


def truncated_json(max_output_tokens: int) -> dict[str, Any]:
    return {
        "model_name": LOCAL_MODEL,
        "messages": [{"role": "user", "content": "A long story about the sea, as JSON."}],
        "config": {
            "response_json_schema": STORY_SCHEMA,
            "max_output_tokens": max_output_tokens,
            "temperature": 0,
        },
    }


async def test_local_stream_cut_at_max_output_tokens_is_charged_for_what_it_streamed(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account(credits=10)
        events = await stream_events(server, account, truncated_json(24))
        kinds = [kind for kind, _ in events]
        assert kinds[-1] == "error" and "message" in kinds  # text went out before the JSON was found cut
        error = events[-1][1]
        assert "max_output_tokens (24)" in error["error"]["message"]
        task = await server.wait_for(account, error["creatify"]["id"])
        assert task["status"] == "failed"
        assert task["output_tokens"] == 24 and task["input_tokens"] > 0
        streamed = "".join(
            p["text"]
            for kind, d in events
            if kind == "message"
            for p in d["candidates"][0]["content"]["parts"]
        )
        assert task["response_text"] == streamed
        assert task["credits_used"] > 0
        assert error["creatify"]["credits_used"] == task["credits_used"]
        await assert_charged_for_its_usage(server, account, task, 10)


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_local_truncated_json_is_charged_for_the_tokens_generated(tmp_path: Path, sync: bool) -> None:
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account(credits=10)
        async with server.client(account) as client:
            response = await client.post("/sse/text_generator/", json={**truncated_json(6), "sync": sync})
        assert response.status_code == 201, response.text
        task = await server.wait_for(account, response.json()["id"])
        assert task["status"] == "failed" and "max_output_tokens (6)" in task["failed_reason"]
        assert task["output_tokens"] == 6 and task["input_tokens"] > 0
        await assert_charged_for_its_usage(server, account, task, 10)


async def test_local_failure_before_the_first_token_is_free(tmp_path: Path) -> None:
    async with run_server(
        make_settings(tmp_path, local_model_instances=1, local_context_tokens=256)
    ) as server:
        account = await server.account(credits=10)
        body = {
            "model_name": LOCAL_MODEL,
            "messages": [{"role": "user", "content": "sea " * 400}],
            "sync": True,
        }
        async with server.client(account) as client:
            task = (await client.post("/sse/text_generator/", json=body)).json()
        assert task["status"] == "failed" and "context" in task["failed_reason"]
        assert task["credits_used"] == 0 and task["output_tokens"] == 0
        assert await reconciled(server, account) == 10


# -- Gemini ---------------------------------------------------------------------------------------------


async def test_gemini_mid_stream_error_is_charged_per_the_last_chunk_seen(tmp_path: Path) -> None:
    async with fake_gemini(chunks=6) as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=10)
        fake.add_fault(Fault(error_after_chunks=3))
        events = await stream_events(server, account, GEMINI)
        kinds = [kind for kind, _ in events]
        assert kinds == ["message"] * 3 + ["error"]
        last_seen = events[2][1]["usageMetadata"]
        error = events[-1][1]
        task = await server.wait_for(account, error["creatify"]["id"])
        assert task["status"] == "failed" and "fake mid-stream failure" in task["failed_reason"]
        assert task["input_tokens"] == last_seen["promptTokenCount"]
        assert task["output_tokens"] == last_seen["candidatesTokenCount"] > 0
        assert task["credits_used"] > 0 and error["creatify"]["credits_used"] == task["credits_used"]
        await assert_charged_for_its_usage(server, account, task, 10)


async def test_gemini_stream_the_client_abandons_is_charged_per_the_last_chunk_seen(tmp_path: Path) -> None:
    async with (
        fake_gemini(chunks=64, chunk_delay=0.05) as (fake, url),
        gemini_service(tmp_path, url) as server,
    ):
        account = await server.account(credits=10)
        async with (
            server.client(account) as client,
            aconnect_sse(client, "POST", STREAM, json=GEMINI) as source,
        ):
            async for sse in source.aiter_sse():
                if sse.event == "message":
                    break
        await asyncio.wait_for(fake.abandoned.wait(), 10)
        assert fake.streams_abandoned == 1 and fake.streams_completed == 0
        task_id = (await server.services.storage.tasks.list(account.id, limit=1))[0][0].id
        task = await server.wait_for(account, task_id)
        assert task["status"] == "failed" and task["failed_reason"] == "client disconnected"
        assert task["output_tokens"] >= 1 and task["input_tokens"] > 0
        assert task["credits_used"] > 0
        await assert_charged_for_its_usage(server, account, task, 10)


@pytest.mark.parametrize(
    ("reply", "reason", "input_tokens", "output_tokens"),
    [
        pytest.param("g10", "finish reason SAFETY", 7, 20, id="g10-SAFETY"),
        pytest.param("g11", "finish reason RECITATION", 18, 0, id="g11-RECITATION-no-content"),
        pytest.param(
            "g13", "finish reason MALFORMED_FUNCTION_CALL", 2595, 0, id="g13-MALFORMED_FUNCTION_CALL"
        ),
        pytest.param("g14", "Gemini blocked the prompt (SAFETY)", 0, 0, id="g14-blocked-no-usage"),
    ],
)
@pytest.mark.parametrize("mode", ["sync", "async", "stream"])
async def test_a_blocked_gemini_answer_is_charged_per_its_usage_metadata(
    tmp_path: Path, reply: str, reason: str, input_tokens: int, output_tokens: int, mode: str
) -> None:
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=10)
        fake.replies.append(fixture(reply))
        if mode == "stream":
            async with (
                server.client(account) as client,
                aconnect_sse(client, "POST", STREAM, json=GEMINI) as source,
            ):
                if source.response.status_code == 200:  # an answer blocked after its first chunk
                    events = [(sse.event, json.loads(sse.data)) async for sse in source.aiter_sse()]
                    assert events[-1][0] == "error"
                    assert events[-1][1]["creatify"]["credits_used"] == pytest.approx(
                        price(server, GEMINI["model_name"], input_tokens, output_tokens)
                    )
                else:  # blocked in its first (only) chunk: an HTTP error, as any failure before the stream
                    assert source.response.status_code == (502 if reply == "g13" else 400)
                    assert reason in json.loads(await source.response.aread())["error"]
            task_id = (await server.services.storage.tasks.list(account.id, limit=1))[0][0].id
        else:
            async with server.client(account) as client:
                response = await client.post("/sse/text_generator/", json={**GEMINI, "sync": mode == "sync"})
            assert response.status_code == 201, response.text
            task_id = response.json()["id"]
        task = await server.wait_for(account, task_id)
        assert task["status"] == "failed" and reason in task["failed_reason"], task["failed_reason"]
        assert (task["input_tokens"], task["output_tokens"]) == (input_tokens, output_tokens)
        if input_tokens or output_tokens:
            assert task["credits_used"] > 0
        else:
            assert task["credits_used"] == 0  # nothing reported, nothing billed upstream: nothing charged
        await assert_charged_for_its_usage(server, account, task, 10)


@pytest.mark.parametrize("mode", ["sync", "stream"])
async def test_a_blocked_prompt_is_charged_its_reported_prompt_tokens(tmp_path: Path, mode: str) -> None:
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=10)
        # The recorded blocked prompts carry no usage (g14, g16: charged nothing, above); one that does is
        # charged what it reports.
        fake.replies.append(
            {
                "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
            }
        )
        async with server.client(account) as client:
            if mode == "sync":
                response = await client.post("/sse/text_generator/", json={**GEMINI, "sync": True})
                assert response.status_code == 201
            else:
                response = await client.post(STREAM, json=GEMINI)
                assert response.status_code == 400
                assert "PROHIBITED_CONTENT" in response.json()["error"]
        task_id = (await server.services.storage.tasks.list(account.id, limit=1))[0][0].id
        task = await server.wait_for(account, task_id)
        assert task["status"] == "failed" and "PROHIBITED_CONTENT" in task["failed_reason"]
        assert task["input_tokens"] == 9 and task["output_tokens"] == 0
        assert task["credits_used"] > 0
        await assert_charged_for_its_usage(server, account, task, 10)


async def test_a_failure_before_the_first_chunk_is_free(tmp_path: Path) -> None:
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=10)
        fake.fail(400, message="Invalid value at 'generation_config.top_k'.")
        fake.fail(400, message="Invalid value at 'generation_config.top_k'.")
        async with server.client(account) as client:
            assert (await client.post(STREAM, json=GEMINI)).status_code == 400
            task = (await client.post("/sse/text_generator/", json={**GEMINI, "sync": True})).json()
        assert task["status"] == "failed" and task["credits_used"] == 0
        rows, _ = await server.services.storage.tasks.list(account.id, limit=5)
        assert len(rows) == 2
        for row in rows:
            assert row.credits_used == 0 and row.output_tokens == 0
        assert await reconciled(server, account) == 10


@pytest.mark.parametrize("mode", ["sync", "stream"])
async def test_usage_past_the_reservation_is_charged_the_reservation(tmp_path: Path, mode: str) -> None:
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=10)
        reply = fixture("g10")
        reply["candidates"][0]["finishReason"] = "STOP"
        reply["usageMetadata"] = {"promptTokenCount": 7, "candidatesTokenCount": 900, "totalTokenCount": 907}
        fake.replies.append(reply)
        body = {**GEMINI, "config": {"max_output_tokens": 10}}
        if mode == "sync":
            async with server.client(account) as client:
                task = (await client.post("/sse/text_generator/", json={**body, "sync": True})).json()
        else:
            events = await stream_events(server, account, body)
            task = await server.wait_for(account, events[-1][1]["creatify"]["id"])
            assert events[-1][1]["creatify"]["credits_used"] == task["credits_used"]
        assert task["status"] == "done" and task["output_tokens"] == 900
        limit = await reserved(server, task["id"])
        assert price(server, GEMINI["model_name"], 7, 900) > limit
        assert task["credits_used"] == pytest.approx(limit)
        assert await reconciled(server, account) == pytest.approx(10 - limit)


async def test_a_sync_request_past_its_timeout_is_charged_for_what_it_used(
    tmp_path: Path, models_file: Path
) -> None:
    gate = asyncio.Event()
    provider = FakeProvider(gate=gate)  # reads the prompt (7 tokens), then waits at the gate
    settings = make_settings(tmp_path, models_file=models_file, sync_timeout_seconds=0.5)
    async with run_server(settings, {"fake": provider}) as server:
        account = await server.account(credits=100)
        body = {"model_name": "fake-model", "messages": [{"role": "user", "content": "hi"}], "sync": True}
        async with server.client(account) as client:
            response = await client.post("/sse/text_generator/", json=body)
        assert response.status_code == 201, response.text
        task = response.json()
        assert task["status"] == "failed" and task["failed_reason"] == "timed out after 0.5 s"
        assert (task["input_tokens"], task["output_tokens"]) == (7, 0)
        assert task["credits_used"] > 0
        assert task["credits_used"] == pytest.approx(price(server, "fake-model", 7, 0))
        assert await reconciled(server, account) == pytest.approx(100 - task["credits_used"])
        gate.set()


async def test_an_answer_that_cannot_be_read_is_not_charged(tmp_path: Path) -> None:
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=10)
        # Gemini reports usage, but the answer is unreadable (content is not an object): the client got
        # nothing, so nothing is charged.
        fake.replies.append(
            {
                "candidates": [{"content": "not an object", "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3, "totalTokenCount": 8},
            }
        )
        async with server.client(account) as client:
            task = (await client.post("/sse/text_generator/", json={**GEMINI, "sync": True})).json()
        assert task["status"] == "failed" and "could not be read" in task["failed_reason"]
        assert task["credits_used"] == 0 and task["output_tokens"] == 0
        assert await reconciled(server, account) == 10
