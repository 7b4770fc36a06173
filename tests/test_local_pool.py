"""The embedded model's instance pool: concurrency, fairness, cancellation, determinism, the model list."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from tests.conftest import make_settings, run_server
from textgen.catalog import load_catalog
from textgen.protocol import GenerationInput
from textgen.providers.local import LocalProvider, default_instances

MODEL = "smollm2-135m-instruct"


def body(content: str, **config: object) -> dict[str, object]:
    return {
        "model_name": MODEL,
        "messages": [{"role": "user", "content": content}],
        "config": {"max_output_tokens": 12, **config},
    }


@pytest.fixture
async def provider() -> LocalProvider:
    local = LocalProvider(instances=1, n_ctx=1024, threads=2)
    await local.open()
    return local


def test_default_pool_is_sized_to_the_cores() -> None:
    assert default_instances(1) == 1
    assert default_instances(2) == 1
    assert default_instances(8) == 4
    assert default_instances(64) == 8


async def test_concurrent_requests_with_a_pool_of_two_all_complete(tmp_path: Path) -> None:
    async with run_server(
        make_settings(tmp_path, local_model_instances=2, local_threads=1, worker_concurrency=4)
    ) as server:
        local = server.services.registry.providers["local"]
        assert isinstance(local, LocalProvider) and len(local.engines) == 2
        accounts = [await server.account(name=f"a{i}") for i in range(2)]

        async def one(i: int) -> dict[str, object]:
            async with server.client(accounts[i % 2]) as client:
                response = await client.post(
                    "/sse/text_generator/", json={**body(f"Say a word about {i}."), "sync": True}
                )
                assert response.status_code == 201
                return response.json()  # type: ignore[no-any-return]

        results = await asyncio.gather(*(one(i) for i in range(6)))
        assert all(r["status"] == "done" and r["response_text"] for r in results), results
        # Both instances served work.
        assert all(engine.sampled > 0 for engine in local.engines)


async def test_seed_gives_the_same_text(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account()
        async with server.client(account) as client:
            seeded = {
                **body("Name three colours.", temperature=1.2, seed=99, max_output_tokens=16),
                "sync": True,
            }
            first = (await client.post("/sse/text_generator/", json=seeded)).json()
            second = (await client.post("/sse/text_generator/", json=seeded)).json()
            assert first["response_text"] and first["response_text"] == second["response_text"]


async def test_models_endpoint_lists_models_with_capabilities(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account()
        async with server.client(account) as client:
            response = await client.get("/sse/models/")
            assert response.status_code == 200
            models = {m["name"]: m for m in response.json()["results"]}
            local = models[MODEL]
            assert local["provider"] == "local" and local["available"] is True
            assert set(local["capabilities"]) == {"text", "tools", "json"}
            assert local["input_price_per_million_usd"] > 0 and local["output_price_per_million_usd"] > 0
            assert "image" in models["gemini-2.5-flash"]["capabilities"]


async def test_closing_a_stream_stops_generation_within_one_token(provider: LocalProvider) -> None:
    spec = load_catalog(None)[MODEL]
    request = GenerationInput.model_validate(
        {**body("Write a very long story about the sea.", max_output_tokens=400, temperature=1.0)},
        strict=False,
    )
    [engine] = provider.engines
    stream = provider.stream(spec, request, account="a")
    chunks = 0
    async for chunk in stream:
        chunks += 1 if chunk.text else 0
        if chunks == 3:
            break
    at_close = engine.sampled
    await stream.aclose()  # type: ignore[attr-defined]
    stopped = engine.sampled
    assert stopped - at_close <= 1
    # The instance is back in the pool and its thread no longer samples.
    assert provider.pool.free == [engine]
    await asyncio.sleep(0.2)
    assert engine.sampled == stopped
    await provider.aclose()


async def test_waiting_requests_are_served_round_robin_across_accounts(provider: LocalProvider) -> None:
    spec = load_catalog(None)[MODEL]
    [engine] = provider.engines
    order: list[str] = []
    blocker = await provider.pool.acquire("x", "")

    async def run(account: str, n: int) -> None:
        request = GenerationInput.model_validate(body(f"Count to {n}.", max_output_tokens=2), strict=False)
        await provider.generate(spec, request, account=account)
        order.append(account)

    tasks = [asyncio.create_task(run("busy", i)) for i in range(3)]
    await asyncio.sleep(0.05)
    tasks.append(asyncio.create_task(run("quiet", 0)))
    await asyncio.sleep(0.05)
    assert provider.pool.queued() == {"busy": 3, "quiet": 1}
    provider.pool.release(blocker)
    await asyncio.gather(*tasks)
    assert order == ["busy", "quiet", "busy", "busy"]
    assert engine.sampled > 0
    await provider.aclose()


async def test_a_conversation_returns_to_the_instance_holding_its_prefix() -> None:
    local = LocalProvider(instances=2, n_ctx=1024, threads=1)
    await local.open()
    spec = load_catalog(None)[MODEL]
    first = GenerationInput.model_validate(body("My name is Ada. Remember it.", temperature=0), strict=False)
    reply = await local.generate(spec, first, account="a")
    served = [e for e in local.engines if e.sampled > 0]
    assert len(served) == 1
    other = next(e for e in local.engines if e is not served[0])
    other.cached = "unrelated"
    follow = GenerationInput.model_validate(
        {
            "model_name": MODEL,
            "config": {"max_output_tokens": 4, "temperature": 0},
            "messages": [
                {"role": "user", "content": "My name is Ada. Remember it."},
                {"role": "model", "content": reply.text or "ok"},
                {"role": "user", "content": "What is my name?"},
            ],
        },
        strict=False,
    )
    before = served[0].sampled
    await local.generate(spec, follow, account="a")
    assert served[0].sampled > before and other.sampled == 0
    await local.aclose()


async def test_closing_the_provider_mid_generation_stops_it_before_freeing_the_model(
    provider: LocalProvider,
) -> None:
    # Freeing an instance while its thread still samples would crash the process: aclose stops them first.
    spec = load_catalog(None)[MODEL]
    request = GenerationInput.model_validate(
        body("Write a very long story about the sea.", max_output_tokens=400, temperature=1.0), strict=False
    )
    [engine] = provider.engines
    stream = provider.stream(spec, request, account="a")
    first = await stream.__anext__()  # type: ignore[attr-defined]
    assert first.text
    sampling = engine.sampled
    await provider.aclose()
    assert not provider.available()
    assert engine.sampled - sampling <= 2  # stopped within a token of the close
    with contextlib.suppress(Exception):
        await stream.aclose()  # type: ignore[attr-defined]
