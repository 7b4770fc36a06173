"""The create / poll / list / credits endpoints over HTTP: auth, validation, pagination, isolation, limits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_settings, run_server
from tests.fakes.providers import FakeProvider
from textgen.settings import Settings

CREATE = "/sse/text_generator/"


def body(**overrides: Any) -> dict[str, Any]:
    return {"model_name": "fake-model", "messages": [{"role": "user", "content": "hi"}], **overrides}


async def test_missing_or_wrong_credentials_are_401(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account()
        async with server.client() as client:
            for headers in (
                {},
                {"X-API-ID": account.api_id},
                {"X-API-ID": account.api_id, "X-API-KEY": "tgk_wrong"},
                {"X-API-ID": "tg_unknown", "X-API-KEY": account.api_key},
            ):
                for method, path in (
                    ("POST", CREATE),
                    ("GET", CREATE),
                    ("GET", "/api/remaining_credits/"),
                    ("GET", "/sse/text_generator/00000000-0000-0000-0000-000000000000/"),
                ):
                    response = await client.request(method, path, headers=headers, json=body())
                    assert response.status_code == 401, (headers, path)
                    assert set(response.json()) == {"error"}


BAD_BODIES = [
    (body(messages=[{"role": "assistant", "content": "x"}]), "messages[0].role"),
    (body(messages=[]), "messages"),
    (body(messages=[{"role": "user", "function_call": {"name": "f", "args": {}}}]), "function_call"),
    (
        body(messages=[{"role": "model", "function_response": {"name": "f", "response": {}}}]),
        "function_response",
    ),
    (body(config={"temperature": 2.5}), "config.temperature"),
    (body(config={"temperature": -0.1}), "config.temperature"),
    (body(config={"top_p": 1.5}), "config.top_p"),
    (body(config={"presence_penalty": -3}), "config.presence_penalty"),
    (body(config={"frequency_penalty": 2.1}), "config.frequency_penalty"),
    (body(config={"max_output_tokens": 0}), "config.max_output_tokens"),
    (body(config={"max_output_tokens": 5000}), "config.max_output_tokens"),
    (body(config={"response_mime_type": "text/html"}), "config.response_mime_type"),
    (
        body(config={"response_mime_type": "text/plain", "response_json_schema": {"type": "object"}}),
        "response_json_schema",
    ),
    (body(config={"max_tokens": 5}), "config.max_tokens"),
    (body(model_name="gpt-4"), "model_name"),
    (body(model_name="x" * 300), "model_name"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model_name"),
    (body(webhook_url="ftp://example.com/hook"), "webhook_url"),
    (body(webhook_url="https://user:pw@example.com/hook"), "webhook_url"),
    (
        body(tools=[{"function_declarations": [{"name": "bad name"}]}]),
        "tools[0].function_declarations[0].name",
    ),
    (body(tools=[{"function_declarations": [{"name": "f"}, {"name": "f"}]}]), "declared more than once"),
    (body(tool_config={"function_calling_config": {"mode": "ANY"}}), "tool_config"),
    (
        body(
            tools=[{"function_declarations": [{"name": "f"}]}],
            tool_config={"function_calling_config": {"mode": "ANY", "allowed_function_names": ["g"]}},
        ),
        "allowed_function_names",
    ),
    (
        body(
            messages=[
                {"role": "user", "content": [{"type": "image", "data": "!!!", "mime_type": "image/png"}]}
            ]
        ),
        "messages[0].content[0]",
    ),
    (
        body(messages=[{"role": "user", "content": [{"type": "audio", "data": "AA=="}]}]),
        "messages[0].content",
    ),
    (body(sync="yes"), "sync"),
]


@pytest.mark.parametrize(("payload", "field"), BAD_BODIES)
async def test_invalid_bodies_are_400_naming_the_field(settings: Settings, payload: Any, field: str) -> None:
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            response = await client.post(CREATE, json=payload)
            assert response.status_code == 400, response.text
            assert field in response.json()["error"]
        assert await server.services.storage.tasks.counts() == {}
        assert (await server.services.storage.accounts.ledger_summary(account.id)).balance == 100_000_000


async def test_malformed_json_and_empty_body_are_400(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            for raw in (b'{"model_name": ', b"", b"not json", b"[1,2]", b'{"model_name": "fake-model"'):
                response = await client.post(
                    CREATE, content=raw, headers={"Content-Type": "application/json"}
                )
                assert response.status_code == 400
                assert response.json()["error"]
            deep = (
                b'{"model_name":"fake-model","messages":[{"role":"user","function_response":{"name":"f",'
                b'"response":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}}]}"
            )
            response = await client.post(CREATE, content=deep)
            assert response.status_code == 400


async def test_unknown_model_lists_known_models(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            error = (await client.post(CREATE, json=body(model_name="nope"))).json()["error"]
        assert "fake-model" in error and "gemini-2.5-flash" in error and "smollm2-135m-instruct" in error


async def test_body_over_the_limit_is_413(tmp_path: Path, models_file: Path) -> None:
    settings = make_settings(tmp_path, models_file=models_file, max_body_bytes=2000)
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            big = body(messages=[{"role": "user", "content": "x" * 5000}])
            response = await client.post(CREATE, json=big)
            assert response.status_code == 413
            assert "limit" in response.json()["error"]

            async def chunks() -> Any:  # no Content-Length: counted while reading
                for _ in range(10):
                    yield b" " * 500

            response = await client.post(CREATE, content=chunks())
            assert response.status_code == 413
            response = await client.post(CREATE, json=body())
            assert response.status_code == 201, response.text


async def test_sync_and_async_through_the_same_task_path(settings: Settings) -> None:
    fake = FakeProvider()
    async with run_server(settings, {"fake": fake}) as server:
        account = await server.account(credits=100)
        async with server.client(account) as client:
            sync = (await client.post(CREATE, json=body(sync=True, config={"max_output_tokens": 10}))).json()
            assert sync["status"] == "done" and sync["response_text"] == "echo: hi"
            # fake-model: 7 input + 5 output tokens at 1000 USD/1M, 100 credits per USD.
            assert sync["credits_used"] == pytest.approx(12 * 1000 / 1e6 * 100)
            assert sync["input_tokens"] == 7 and sync["output_tokens"] == 5
            queued = (
                await client.post(CREATE, json=body(messages=[{"role": "user", "content": "later"}]))
            ).json()
            assert queued["status"] == "pending"
        done = await server.wait_for(account, queued["id"])
        assert done["response_text"] == "echo: later"
        summary = await server.services.storage.accounts.ledger_summary(account.id)
        assert summary.balance == summary.ledger_sum
        assert summary.balance == 100_000_000 - round(sync["credits_used"] * 1e6) - round(
            done["credits_used"] * 1e6
        )


async def test_failed_generation_releases_the_reservation(settings: Settings) -> None:
    fake = FakeProvider(fail_with="upstream said no: model overloaded")
    async with run_server(settings, {"fake": fake}) as server:
        account = await server.account(credits=50)
        async with server.client(account) as client:
            task = (await client.post(CREATE, json=body(sync=True))).json()
            assert task["status"] == "failed"
            assert task["failed_reason"] == "upstream said no: model overloaded"
            assert task["credits_used"] == 0
            assert (await client.get("/api/remaining_credits/")).json() == {"remaining_credits": 50.0}


async def test_not_enough_credits_is_402_and_nothing_is_created(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account(credits=0.5)
        async with server.client(account) as client:
            response = await client.post(CREATE, json=body(config={"max_output_tokens": 100}))
            assert response.status_code == 402
            assert "credits" in response.json()["error"]
            assert (await client.get(CREATE)).json()["results"] == []


async def test_listing_is_newest_first_paginated_and_filtered(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account()
        ids = []
        async with server.client(account) as client:
            for i in range(7):
                created = await client.post(CREATE, json=body(messages=[{"role": "user", "content": str(i)}]))
                ids.append(created.json()["id"])
            newest_first = list(reversed(ids))
            page = (await client.get(CREATE, params={"limit": 3})).json()
            assert page["previous"] is None
            seen = [t["id"] for t in page["results"]]
            pages = [page]
            while page["next"]:
                page = (await client.get(page["next"])).json()
                pages.append(page)
                seen += [t["id"] for t in page["results"]]
            assert seen == newest_first
            assert [len(p["results"]) for p in pages] == [3, 3, 1]
            back = (await client.get(pages[2]["previous"])).json()
            assert [t["id"] for t in back["results"]] == newest_first[3:6]
            back = (await client.get(back["previous"])).json()
            assert [t["id"] for t in back["results"]] == newest_first[:3]
            assert back["previous"] is None
            for bad in (
                {"limit": 0},
                {"limit": 101},
                {"limit": "x"},
                {"status": "weird"},
                {"cursor": "zzz"},
                {"other": 1},
            ):
                response = await client.get(CREATE, params=bad)
                assert response.status_code == 400, bad
            assert (await client.get(CREATE, params={"status": "done"})).json()["results"] == []
            pending = (await client.get(CREATE, params={"status": "pending", "limit": 100})).json()
            assert len(pending["results"]) == 7 and pending["next"] is None


async def test_a_page_has_20_tasks_unless_limit_says_otherwise(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account(credits=10_000)
        async with server.client(account) as client:
            for _ in range(21):
                assert (await client.post(CREATE, json=body())).status_code == 201
            page = (await client.get(CREATE)).json()
        assert len(page["results"]) == 20 and "limit=20" in page["next"]


async def test_polling_counts_against_the_rate_limit_like_any_call(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account(rate_limit=3)
        async with server.client(account) as client:
            task = (await client.post(CREATE, json=body())).json()
            for _ in range(2):
                assert (await client.get(f"{CREATE}{task['id']}/")).status_code == 200
            refused = await client.get(f"{CREATE}{task['id']}/")
        assert refused.status_code == 429, refused.text


async def test_accounts_never_see_each_others_tasks(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        alice, bob = await server.account(name="alice"), await server.account(name="bob")
        async with server.client(alice) as a, server.client(bob) as b:
            task = (await a.post(CREATE, json=body(sync=True))).json()
            for path in (f"/sse/text_generator/{task['id']}/", f"/api/text_generator/{task['id']}/"):
                assert (await a.get(path)).status_code == 200
                response = await b.get(path)
                assert response.status_code == 404
                assert response.json() == {"error": f"task {task['id']} not found"}
            assert (await b.get(CREATE)).json()["results"] == []
            assert (await b.get("/api/remaining_credits/")).json() == {"remaining_credits": 100.0}


async def test_rate_limit_is_429_with_headers(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        limited = await server.account(rate_limit=3)
        other = await server.account(rate_limit=3)
        async with server.client(limited) as client:
            for i in range(3):
                response = await client.get("/api/remaining_credits/")
                assert response.status_code == 200
                assert response.headers["RateLimit-Limit"] == "3"
                assert response.headers["RateLimit-Remaining"] == str(2 - i)
            response = await client.post(CREATE, json=body())
            assert response.status_code == 429
            assert 1 <= int(response.headers["Retry-After"]) <= 60
            assert response.headers["RateLimit-Remaining"] == "0"
            assert "rate limit" in response.json()["error"]
        async with server.client(other) as client:
            assert (await client.get("/api/remaining_credits/")).status_code == 200


async def test_concurrent_requests_never_overdraw_and_the_ledger_reconciles(settings: Settings) -> None:
    fake = FakeProvider(delay=0.01)
    async with run_server(settings, {"fake": fake}) as server:
        # Each request reserves (input estimate + 100 output tokens) at 0.1 credits per token.
        account = await server.account(credits=150)
        async with server.client(account) as client:
            responses = await asyncio.gather(
                *(client.post(CREATE, json=body(config={"max_output_tokens": 100})) for _ in range(60))
            )
        codes = [r.status_code for r in responses]
        assert set(codes) == {201, 402}
        accepted = [r.json()["id"] for r in responses if r.status_code == 201]
        reserve = (await server.services.storage.tasks.get(accepted[0])).credits_reserved
        assert len(accepted) == 150_000_000 // reserve
        for task_id in accepted:
            await server.wait_for(account, task_id)
        summary = await server.services.storage.accounts.ledger_summary(account.id)
        assert summary.balance >= 0
        assert summary.balance == summary.ledger_sum
        used = 0
        for task_id in accepted:
            used += (await server.services.storage.tasks.get(task_id)).credits_used
        assert summary.balance == 150_000_000 - used


async def test_health_openapi_and_docs(settings: Settings) -> None:
    async with (
        run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server,
        server.client() as client,
    ):
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = (await client.get("/readyz")).json()
        assert ready["status"] == "ready" and ready["checks"]["database"] == "ok"
        spec = (await client.get("/openapi.json")).json()
        request_schema = spec["components"]["schemas"]["TextGenRequest"]
        assert set(request_schema["required"]) == {"model_name", "messages"}
        assert {"sync", "webhook_url", "tools", "tool_config", "config"} <= set(request_schema["properties"])
        for path in (
            "/sse/text_generator/",
            "/sse/text_generator/stream/",
            "/sse/text_generator/{id}/",
            "/api/remaining_credits/",
        ):
            assert path in spec["paths"]
        docs = await client.get("/docs")
        assert docs.status_code == 200 and "TextGenRequest" in docs.text
        assert "/sse/text_generator/stream/" in docs.text


async def test_every_error_has_the_one_shape(settings: Settings) -> None:
    async with run_server(settings, {"fake": FakeProvider()}, run_worker=False) as server:
        account = await server.account(rate_limit=1000)
        async with server.client(account) as client, server.client() as anonymous:
            responses = [
                await anonymous.get(CREATE),
                await client.get("/no/such/path"),
                await client.delete(CREATE),
                await client.get("/sse/text_generator/missing/"),
                await client.post(CREATE, content=b"{"),
                await client.post(CREATE, json=body(model_name="nope")),
                await client.get(CREATE, params={"limit": -1}),
                await client.post("/sse/text_generator/stream/", json=body(sync=True)),
                await client.get("/sse/text_generator/missing/webhooks/"),
                await client.post("/sse/text_generator/missing/webhooks/redeliver/"),
                await anonymous.get("/sse/models/"),
            ]
        for response in responses:
            assert response.status_code in (400, 401, 404, 405), response.text
            assert response.headers["content-type"] == "application/json"
            data = response.json()
            assert list(data) == ["error"] and isinstance(data["error"], str) and data["error"]
            assert response.headers["x-request-id"]
