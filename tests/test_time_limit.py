"""The generation time limit (TEXTGEN_GENERATION_TIMEOUT_SECONDS): a generation still running past it is
stopped on every provider and in every mode; its task fails saying so and is charged for what it produced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from httpx_sse import aconnect_sse

from tests.conftest import Server, make_settings, run_server
from tests.fakes.fake_gemini import Fault
from tests.test_gemini import GUIDE_BODY, create, fake_gemini, gemini_service

STREAM = "/sse/text_generator/stream/"
REASON = "timed out after 0.5 s: the generation time limit (TEXTGEN_GENERATION_TIMEOUT_SECONDS)"


async def books(server: Server, task: dict[str, Any]) -> None:
    """The ledger balances and the task is charged exactly its tokens' price."""
    account_id = (await server.services.storage.tasks.get(task["id"])).account_id
    summary = await server.services.storage.accounts.ledger_summary(account_id)
    assert summary.ledger_sum == summary.balance
    spec = server.services.registry.catalog[task["model_name"]]
    cost = server.services.tasks.pricing.cost(spec, task["input_tokens"], task["output_tokens"])
    assert task["credits_used"] == cost / 1_000_000


async def test_a_gemini_call_held_past_the_limit_is_stopped_and_not_retried(tmp_path: Path) -> None:
    async with (
        fake_gemini() as (fake, url),
        gemini_service(tmp_path, url, generation_timeout_seconds=0.5) as server,
    ):
        fake.faults.append(Fault(delay=4))  # the upstream holds the call
        account = await server.account()
        created = await create(server, account, GUIDE_BODY)
        task = await server.wait_for(account, created["id"])
        assert task["status"] == "failed" and task["failed_reason"] == REASON, task
        assert task["output_tokens"] == 0 and task["credits_used"] == 0  # nothing was produced
        assert len(fake.generate_requests) == 1  # closed, not retried
        await books(server, task)


async def test_a_gemini_stream_past_the_limit_ends_with_an_error_and_is_charged_for_its_chunks(
    tmp_path: Path,
) -> None:
    # The first chunk comes at once, the next one only after the limit.
    async with (
        fake_gemini(chunks=4, chunk_delay=4) as (_, url),
        gemini_service(tmp_path, url, generation_timeout_seconds=0.5) as server,
    ):
        account = await server.account()
        body = {k: v for k, v in GUIDE_BODY.items() if k != "system_instruction"}
        async with (
            server.client(account) as client,
            aconnect_sse(client, "POST", STREAM, json=body) as source,
        ):
            assert source.response.status_code == 200
            events = [(sse.event, json.loads(sse.data)) async for sse in source.aiter_sse()]
        assert [kind for kind, _ in events] == ["message", "error"], events
        first, error = events[0][1], events[1][1]
        assert error["error"]["code"] == 504
        assert error["error"]["message"].endswith(REASON)
        task = await server.wait_for(account, error["creatify"]["id"])
        assert task["status"] == "failed" and task["failed_reason"] == REASON, task
        assert task["output_tokens"] == first["usageMetadata"]["candidatesTokenCount"] > 0
        assert task["credits_used"] == error["creatify"]["credits_used"] > 0
        await books(server, task)


async def test_a_gemini_stream_with_no_first_chunk_within_the_limit_is_a_504(tmp_path: Path) -> None:
    async with (
        fake_gemini() as (fake, url),
        gemini_service(tmp_path, url, generation_timeout_seconds=0.5) as server,
    ):
        fake.faults.append(Fault(delay=4))
        account = await server.account()
        async with server.client(account) as client:
            response = await client.post(STREAM, json=GUIDE_BODY)
            assert response.status_code == 504, response.text
            assert response.json()["error"].endswith(f"{REASON}, before its first chunk")
            [task] = (await client.get("/sse/text_generator/")).json()["results"]
        assert task["status"] == "failed" and task["failed_reason"] == REASON
        await books(server, task)


async def test_a_local_generation_past_the_limit_stops_its_instance(tmp_path: Path) -> None:
    # 128 strings at least: hundreds of tokens, more than the limit allows on any machine.
    schema = {"type": "array", "items": {"type": "string"}, "minItems": 128}
    body = {
        "model_name": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "List words."}],
        "config": {"response_json_schema": schema, "max_output_tokens": 2048},
        "sync": True,
    }
    settings = make_settings(tmp_path, local_model_instances=1, generation_timeout_seconds=0.5)
    async with run_server(settings) as server:
        local = server.services.registry.providers["local"]
        account = await server.account()
        async with server.client(account) as client:
            task = (await client.post("/sse/text_generator/", json=body)).json()
        assert task["status"] == "failed" and task["failed_reason"] == REASON, task
        # The instance stopped generating and is back in the pool for the next request.
        assert local.pool.free == local.engines
        assert task["output_tokens"] < 128 * 3
        await books(server, task)
