"""The output budget of a request without ``config.max_output_tokens``: the model's default from the catalog
(or TEXTGEN_DEFAULT_MAX_OUTPUT_TOKENS), sent to Gemini as maxOutputTokens and reserved for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from httpx_sse import aconnect_sse

from tests.conftest import Account, Server
from tests.test_gemini import fake_gemini, gemini_service
from tests.test_http_edges import assert_documented_headers
from textgen.catalog import load_catalog

CREATE = "/sse/text_generator/"


def hi(**config: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model_name": "gemini-2.5-pro", "messages": [{"role": "user", "content": "hi"}]}
    if config:
        body["config"] = config
    return body


async def reserved(server: Server, account: Account, body: dict[str, Any]) -> int:
    async with server.client(account) as client:
        created = await client.post(CREATE, json={**body, "sync": True})
    assert created.status_code == 201, created.text
    task = await server.services.storage.tasks.get(created.json()["id"])
    assert task is not None
    return task.credits_reserved


def test_the_catalog_gives_gemini_models_a_default_far_below_their_maximum() -> None:
    catalog = load_catalog()
    for spec in catalog.values():
        if spec.provider == "gemini":
            assert spec.max_output_tokens == 65536 and spec.default_output_tokens == 8192, spec
    assert catalog["smollm2-135m-instruct"].default_output_tokens == 512


async def test_hi_to_gemini_sends_and_reserves_the_default_budget(tmp_path: Path) -> None:
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        # 20 credits: 65,536 output tokens of gemini-2.5-pro would be a 402 ("may cost up to 65.54").
        account = await server.account(credits=20)
        default = await reserved(server, account, hi())
        assert fake.last.body["generationConfig"] == {"maxOutputTokens": 8192}
        assert default == await reserved(server, account, hi(max_output_tokens=8192))

        # The request's own budget wins, both ways.
        smaller = await reserved(server, account, hi(max_output_tokens=100))
        assert fake.last.body["generationConfig"] == {"maxOutputTokens": 100}
        assert smaller < default
        async with server.client(account) as client:
            refused = await client.post(CREATE, json=hi(max_output_tokens=65536))
        assert refused.status_code == 402, refused.text
        assert_documented_headers(refused)

        # A stream sends the same default.
        async with (
            server.client(account) as client,
            aconnect_sse(client, "POST", "/sse/text_generator/stream/", json=hi()) as source,
        ):
            assert source.response.status_code == 200
            _ = [event async for event in source.aiter_sse()]
        assert fake.last.stream and fake.last.body["generationConfig"] == {"maxOutputTokens": 8192}

        async with server.client(account) as client:
            models = {m["name"]: m for m in (await client.get("/sse/models/")).json()["results"]}
        assert models["gemini-2.5-pro"]["default_output_tokens"] == 8192
        assert models["gemini-2.5-pro"]["max_output_tokens"] == 65536


async def test_the_setting_replaces_every_default_within_each_maximum(tmp_path: Path) -> None:
    async with (
        fake_gemini() as (fake, url),
        gemini_service(tmp_path, url, default_max_output_tokens=1024) as server,
    ):
        account = await server.account(credits=20)
        budget = await reserved(server, account, hi())
        assert fake.last.body["generationConfig"] == {"maxOutputTokens": 1024}
        assert budget == await reserved(server, account, hi(max_output_tokens=1024))
        await reserved(server, account, hi(max_output_tokens=2000))  # still the request's to raise
        assert fake.last.body["generationConfig"] == {"maxOutputTokens": 2000}

    async with (
        fake_gemini() as (fake, url),
        gemini_service(tmp_path / "capped", url, default_max_output_tokens=1_000_000) as server,
    ):
        account = await server.account(credits=1000)
        async with server.client(account) as client:
            models = {m["name"]: m for m in (await client.get("/sse/models/")).json()["results"]}
        assert models["gemini-2.5-pro"]["default_output_tokens"] == 65536
        assert models["smollm2-135m-instruct"]["default_output_tokens"] == 2048
        await reserved(server, account, hi())
        assert fake.last.body["generationConfig"] == {"maxOutputTokens": 65536}
