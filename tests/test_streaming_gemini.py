"""The streaming endpoint against the fake Gemini upstream, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from httpx_sse import aconnect_sse

from tests.conftest import Server
from tests.fakes.fake_gemini import Fault
from tests.test_gemini import fake_gemini, gemini_service

STREAM = "/sse/text_generator/stream/"
GUIDE = {
    "model_name": "gemini-2.5-flash",
    "messages": [{"role": "user", "content": "Write a short tagline for an AI video tool."}],
    "config": {"temperature": 0.8, "max_output_tokens": 256},
}


async def events_of(server: Server, account: Any, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    async with server.client(account) as client, aconnect_sse(client, "POST", STREAM, json=body) as source:
        assert source.response.status_code == 200
        return [(sse.event, json.loads(sse.data)) async for sse in source.aiter_sse()]


async def test_guide_streaming_example_relays_gemini_chunks(tmp_path: Path) -> None:
    async with fake_gemini(chunks=6) as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=100)
        events = await events_of(server, account, GUIDE)
        assert [kind for kind, _ in events] == ["message"] * 6
        received = fake.last
        assert received.stream
        assert received.body["generationConfig"]["temperature"] == 0.8
        assert received.body["generationConfig"]["maxOutputTokens"] == 256
        final = events[-1][1]
        assert final["candidates"][0]["finishReason"] == "STOP"
        assert final["usageMetadata"]["promptTokenCount"] > 0
        text = "".join(p.get("text", "") for _, d in events for p in d["candidates"][0]["content"]["parts"])
        assert text == fake.reply_text
        task = await server.wait_for(account, final["creatify"]["id"])
        assert task["status"] == "done" and task["response_text"] == text
        assert task["output_tokens"] == final["usageMetadata"]["candidatesTokenCount"]
        assert task["credits_used"] == final["creatify"]["credits_used"] > 0


async def test_upstream_error_before_the_first_chunk_is_an_http_status(tmp_path: Path) -> None:
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=100)
        fake.fail(400, message="Invalid JSON payload received.")
        async with server.client(account) as client:
            response = await client.post(STREAM, json=GUIDE)
        assert response.status_code == 400
        assert "Invalid JSON payload" in response.json()["error"]
        async with server.client(account) as client:
            assert (await client.get("/api/remaining_credits/")).json()["remaining_credits"] == 100


async def test_mid_stream_upstream_error_is_an_error_event_charged_for_what_was_sent(tmp_path: Path) -> None:
    async with fake_gemini(chunks=6) as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=100)
        fake.add_fault(Fault(error_after_chunks=3))
        events = await events_of(server, account, GUIDE)
        kinds = [kind for kind, _ in events]
        assert kinds[-1] == "error" and set(kinds[:-1]) == {"message"}
        error = events[-1][1]
        assert "fake mid-stream failure" in error["error"]["message"]
        task = await server.wait_for(account, error["creatify"]["id"])
        # Charged per the usage of the last chunk relayed (the running totals of the three sent).
        usage = events[-2][1]["usageMetadata"]
        assert task["status"] == "failed" and task["output_tokens"] == usage["candidatesTokenCount"] > 0
        assert task["input_tokens"] == usage["promptTokenCount"]
        assert task["credits_used"] == error["creatify"]["credits_used"] > 0
        async with server.client(account) as client:
            remaining = (await client.get("/api/remaining_credits/")).json()["remaining_credits"]
        assert remaining == pytest.approx(100 - task["credits_used"])


async def test_a_stream_that_stalls_mid_way_fails_after_the_read_timeout(tmp_path: Path) -> None:
    """After the first chunk the read deadline is the shared sweeper's, not aiohttp's per-read timer: an
    upstream that goes silent still ends the stream, as a timeout, charged for what was relayed."""
    async with (
        fake_gemini(chunks=6) as (fake, url),
        gemini_service(tmp_path, url, gemini_timeout_seconds=0.5) as server,
    ):
        account = await server.account(credits=100)
        fake.add_fault(Fault(stall_after_chunks=2))
        events = await events_of(server, account, GUIDE)
        kinds = [kind for kind, _ in events]
        assert kinds == ["message", "message", "error"]
        error = events[-1][1]
        assert error["error"]["message"].startswith("Gemini did not answer in time")
        await asyncio.wait_for(
            fake.abandoned.wait(), 10
        )  # closed by the deadline, not after the fake's stall
        assert fake.streams_abandoned == 1 and fake.streams_completed == 0
        task = await server.wait_for(account, error["creatify"]["id"])
        assert task["status"] == "failed" and task["output_tokens"] > 0
        assert task["credits_used"] == error["creatify"]["credits_used"] > 0


async def test_client_disconnect_closes_the_gemini_stream(tmp_path: Path) -> None:
    async with (
        fake_gemini(chunks=64, chunk_delay=0.05) as (fake, url),
        gemini_service(tmp_path, url) as server,
    ):
        account = await server.account(credits=100)
        async with (
            server.client(account) as client,
            aconnect_sse(client, "POST", STREAM, json=GUIDE) as source,
        ):
            async for _ in source.aiter_sse():
                break
        await asyncio.wait_for(fake.abandoned.wait(), 10)
        assert fake.streams_abandoned == 1 and fake.streams_completed == 0
        task_id = (await server.services.storage.tasks.list(account.id, limit=1))[0][0].id
        task = await server.wait_for(account, task_id)
        assert task["status"] == "failed" and task["failed_reason"] == "client disconnected"
