"""POST /sse/text_generator/stream/ over real HTTP, parsed with an SSE client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.conftest import Account, Server, make_settings, run_server
from tests.fakes.providers import FakeProvider
from textgen.errors import UpstreamError
from textgen.providers import StreamChunk
from textgen.settings import Settings

STREAM = "/sse/text_generator/stream/"
LOCAL = {
    "model_name": "smollm2-135m-instruct",
    "messages": [{"role": "user", "content": "Write a short tagline for an AI video tool."}],
    "config": {"temperature": 0.8, "max_output_tokens": 40},
}


def fake_body(text: str = "one two three four five") -> dict[str, Any]:
    return {
        "model_name": "fake-model",
        "messages": [{"role": "user", "content": text}],
        "config": {"max_output_tokens": 20},
    }


async def collect(server: Server, account: Account, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    events = []
    async with server.client(account) as client, aconnect_sse(client, "POST", STREAM, json=body) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        assert source.response.headers["cache-control"] == "no-cache"
        assert source.response.headers["x-accel-buffering"] == "no"
        async for sse in source.aiter_sse():
            events.append((sse.event, json.loads(sse.data)))
    return events


def chunk_text(data: dict[str, Any]) -> str:
    parts = data["candidates"][0]["content"]["parts"]
    return "".join(p.get("text", "") for p in parts)


async def balance(server: Server, account: Account) -> float:
    async with server.client(account) as client:
        return float((await client.get("/api/remaining_credits/")).json()["remaining_credits"])


async def test_local_stream_chunks_final_creatify_and_task(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path)) as server:
        account = await server.account(credits=10)
        events = await collect(server, account, LOCAL)
        assert len(events) >= 2
        assert all(kind == "message" for kind, _ in events)
        for _, data in events:
            assert data["candidates"][0]["content"]["role"] == "model"
            assert data["modelVersion"] == "smollm2-135m-instruct"
            usage = data["usageMetadata"]
            assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
        counts = [d["usageMetadata"]["candidatesTokenCount"] for _, d in events]
        assert counts == sorted(counts)  # cumulative
        final = events[-1][1]
        assert final["candidates"][0]["finishReason"] in ("STOP", "MAX_TOKENS")
        assert all("creatify" not in d for _, d in events[:-1])
        task_id = final["creatify"]["id"]
        text = "".join(chunk_text(d) for _, d in events)
        task = await server.wait_for(account, task_id)
        assert task["status"] == "done"
        assert task["response_text"] == text
        assert task["output_tokens"] == final["usageMetadata"]["candidatesTokenCount"]
        assert task["credits_used"] == final["creatify"]["credits_used"] > 0
        assert abs(await balance(server, account) - (10 - task["credits_used"])) < 1e-9
        async with server.client(account) as client:
            listed = (await client.get("/sse/text_generator/")).json()["results"]
        assert [t["id"] for t in listed] == [task_id]


async def test_errors_before_the_stream_are_http_statuses(settings: Settings) -> None:
    fake = FakeProvider()
    async with run_server(settings, {"fake": fake}) as server:
        account = await server.account(credits=1, rate_limit=6)  # 6 counted requests below
        async with server.client() as anonymous:
            assert (await anonymous.post(STREAM, json=fake_body())).status_code == 401
        async with server.client(account) as client:
            for extra in ({"sync": True}, {"webhook_url": "http://127.0.0.1:9/hook"}):
                response = await client.post(STREAM, json={**fake_body(), **extra})
                assert response.status_code == 400
                assert next(iter(extra)) in response.json()["error"]
            response = await client.post(STREAM, json={**fake_body(), "model_name": "nope"})
            assert response.status_code == 400 and "unknown model" in response.json()["error"]
            # fake-model costs 1000 USD per 1M tokens: 20 output tokens need more than 1 credit.
            response = await client.post(STREAM, json=fake_body())
            assert response.status_code == 402
            fake.fail_before_first = UpstreamError(
                "upstream said: quota exhausted", status_code=429, retry_after=7
            )
            await server.services.storage.accounts.grant(account.api_id, 10_000_000)
            response = await client.post(STREAM, json=fake_body())
            assert response.status_code == 429
            assert response.json() == {"error": "upstream said: quota exhausted"}
            assert response.headers["Retry-After"] == "7"
            fake.fail_before_first = None
            response = await client.post(STREAM, json=fake_body())
            assert response.status_code == 200
            response = await client.post(STREAM, json=fake_body())
            assert response.status_code == 429  # the account's own limit of 6/min is now used up
            assert "rate limit" in response.json()["error"]
            assert int(response.headers["Retry-After"]) >= 1
            assert response.headers["RateLimit-Remaining"] == "0"
        tasks = (await server.services.storage.tasks.list(account.id, limit=10))[0]
        assert [t.status for t in tasks] == ["done", "failed"]
        assert tasks[1].credits_used == 0 and tasks[1].failed_reason == "upstream said: quota exhausted"


async def test_mid_stream_failure_sends_error_event_and_charges_what_was_sent(settings: Settings) -> None:
    fake = FakeProvider(fail_after_chunks=2)
    async with run_server(settings, {"fake": fake}) as server:
        account = await server.account(credits=100)
        events = await collect(server, account, fake_body())
        kinds = [kind for kind, _ in events]
        assert kinds[-1] == "error"
        assert kinds[:-1] == ["message", "message"]  # the two chunks before the failure
        error = events[-1][1]
        assert "connection reset" in error["error"]["message"]
        task = await server.wait_for(account, error["creatify"]["id"])
        assert task["status"] == "failed"
        assert "connection reset" in task["failed_reason"]
        assert task["response_text"] == "echo: one"  # what the client was sent
        # The two chunks sent: 7 + 2 tokens at 1000 USD per 1M, 100 credits per USD.
        assert (task["input_tokens"], task["output_tokens"]) == (7, 2)
        assert task["credits_used"] == error["creatify"]["credits_used"] == pytest.approx(0.9)
        assert await balance(server, account) == pytest.approx(100 - 0.9)


async def test_keepalive_comments_while_upstream_is_silent(tmp_path: Path, models_file: Path) -> None:
    settings = make_settings(tmp_path, models_file=models_file, stream_keepalive_seconds=0.1)
    fake = FakeProvider(chunk_delay=0.5)
    async with run_server(settings, {"fake": fake}) as server:
        account = await server.account()
        async with (
            server.client(account) as client,
            client.stream("POST", STREAM, json=fake_body("a b c")) as r,
        ):
            raw = "".join([chunk async for chunk in r.aiter_text()])
        assert ": ping" in raw
        # "echo: a b c" is four word chunks plus the final one; Gemini framing is "data: {json}\n\n".
        assert raw.count("data: ") == 5
        assert "\r" not in raw
        frames = [f for f in raw.split("\n\n") if f.startswith("data: ")]
        assert all(json.loads(f.removeprefix("data: ")) for f in frames)


async def test_client_disconnect_stops_the_local_model(tmp_path: Path) -> None:
    body = {
        **LOCAL,
        "messages": [{"role": "user", "content": "Count from 1 to 500, one number per line."}],
        "config": {"max_output_tokens": 1500, "temperature": 0.0},
    }
    async with run_server(make_settings(tmp_path)) as server:
        account = await server.account(credits=10)
        provider: Any = server.services.registry.providers["local"]
        async with (
            server.client(account) as client,
            aconnect_sse(client, "POST", STREAM, json=body) as source,
        ):
            seen = 0
            async for _ in source.aiter_sse():
                seen += 1
                if seen == 5:
                    break
            task_id = (await server.services.storage.tasks.list(account.id, limit=1))[0][0].id
        # Leaving the block closed the connection mid-stream.
        task = await server.wait_for(account, task_id)
        assert task["status"] == "failed"
        assert task["failed_reason"] == "client disconnected"
        assert 0 < task["output_tokens"] < 1500
        assert task["credits_used"] > 0  # the tokens generated so far are charged, no more
        reserved = (await server.services.storage.tasks.get(task_id)).credits_reserved
        assert task["credits_used"] * 1_000_000 < reserved
        assert abs(await balance(server, account) - (10 - task["credits_used"])) < 1e-9
        # The generation thread stops and returns its model instance to the pool ...
        for _ in range(100):
            if len(provider.pool.free) == len(provider.engines):
                break
            await asyncio.sleep(0.05)
        assert len(provider.pool.free) == len(provider.engines)
        # ... and the model samples no more tokens for it.
        sampled = [engine.sampled for engine in provider.engines]
        assert sum(sampled) > 0
        await asyncio.sleep(0.5)
        assert [engine.sampled for engine in provider.engines] == sampled


async def test_many_concurrent_streams_in_one_process(settings: Settings) -> None:
    fake = FakeProvider(chunk_delay=0.02)
    async with run_server(settings, {"fake": fake}) as server:
        account = await server.account(credits=1000, rate_limit=10_000)
        limits = httpx.Limits(max_connections=200)

        async def one(i: int) -> tuple[str, str]:
            body = fake_body(f"stream {i} says hello world")
            async with (
                server.client(account, limits=limits) as client,
                aconnect_sse(client, "POST", STREAM, json=body) as source,
            ):
                datas = [json.loads(s.data) async for s in source.aiter_sse()]
            return datas[-1]["creatify"]["id"], "".join(chunk_text(d) for d in datas)

        results = await asyncio.gather(*(one(i) for i in range(100)))
        assert len({task_id for task_id, _ in results}) == 100
        for i, (_, text) in enumerate(results):
            assert text == f"echo: stream {i} says hello world"
        counts = await server.services.storage.tasks.counts()
        assert counts == {"done": 100}


class _SteppedProvider(FakeProvider):
    """Sends one chunk, then waits until the test lets it finish."""

    def __init__(self) -> None:
        super().__init__()
        self.proceed = asyncio.Event()

    async def stream(self, spec: Any, request: Any, *, account: str) -> Any:
        yield StreamChunk(text="first", input_tokens=7, output_tokens=1)
        await self.proceed.wait()
        yield StreamChunk(text=" last", input_tokens=7, output_tokens=2, finish_reason="STOP")


async def test_chunks_are_relayed_without_waiting_for_the_next(settings: Settings) -> None:
    provider = _SteppedProvider()
    async with run_server(settings, {"fake": provider}) as server:
        account = await server.account()
        async with (
            server.client(account) as client,
            aconnect_sse(client, "POST", STREAM, json=fake_body()) as source,
        ):
            events = source.aiter_sse()
            # The upstream is blocked before its second chunk: the first must already be here.
            first = json.loads((await asyncio.wait_for(anext(events), 10)).data)
            assert chunk_text(first) == "first" and "creatify" not in first
            provider.proceed.set()
            last = json.loads((await anext(events)).data)
        assert chunk_text(last) == " last"
        assert last["candidates"][0]["finishReason"] == "STOP"
        assert last["creatify"]["credits_used"] > 0


async def test_a_slow_first_chunk_keeps_the_task_leased(tmp_path: Path, models_file: Path) -> None:
    # The first chunk takes three lease periods; the worker, polling all the while, must not reclaim the task.
    settings = make_settings(tmp_path, models_file=models_file, lease_seconds=0.5)
    provider = FakeProvider(delay=1.5)
    async with run_server(settings, {"fake": provider}) as server:
        account = await server.account()
        events = await collect(server, account, fake_body("slow start"))
        final = events[-1][1]
        task = await server.wait_for(account, final["creatify"]["id"])
        assert task["status"] == "done", task
        assert task["response_text"] == "echo: slow start"
        assert (await server.services.storage.tasks.get(task["id"])).attempts == 1


async def test_local_stream_under_auto_calls_or_streams_text(tmp_path: Path) -> None:
    weather = {
        "name": "get_weather",
        "description": "Get the current weather for a given location.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    }

    def body(question: str) -> dict[str, Any]:
        return {
            **LOCAL,
            "messages": [{"role": "user", "content": question}],
            "tools": [{"function_declarations": [weather]}],
            "tool_config": {"function_calling_config": {"mode": "AUTO"}},
        }

    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account(credits=10)
        events = await collect(server, account, body("What is the weather in Paris?"))
        parts = [p for _, d in events for p in d["candidates"][0]["content"]["parts"]]
        calls = [p["functionCall"] for p in parts if "functionCall" in p]
        assert [c["name"] for c in calls] == ["get_weather"]
        assert isinstance(calls[0]["args"]["location"], str)
        assert "".join(p.get("text", "") for p in parts) == ""
        assert "functionCall" in str(events[-1][1]) and "creatify" in events[-1][1]
        task = await server.wait_for(account, events[-1][1]["creatify"]["id"])
        assert task["response_function_calls"] == [{"name": "get_weather", "args": calls[0]["args"]}]

        events = await collect(server, account, body("Write a short tagline for an AI video tool."))
        text_chunks = [chunk_text(d) for _, d in events if chunk_text(d)]
        assert len(text_chunks) >= 2  # streamed as generated, not held back
        assert not any("functionCall" in str(d) for _, d in events)


async def test_the_task_id_comes_with_the_first_byte(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account()
        async with (
            server.client(account) as client,
            client.stream("POST", STREAM, json=fake_body()) as response,
        ):
            task_id = response.headers["x-textgen-task-id"]
            lines = response.aiter_lines()
            assert await lines.__anext__() == f": task {task_id}"  # a comment: Gemini-native parsers skip it
            rest = [line async for line in lines]
        last = json.loads(next(line for line in reversed(rest) if line.startswith("data:"))[5:])
        assert last["creatify"]["id"] == task_id
        assert (await server.wait_for(account, task_id))["status"] == "done"
