"""The guide's examples against the embedded model, through HTTP."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import make_settings, run_server

GUIDE_BODY = {
    "model_name": "smollm2-135m-instruct",
    "messages": [{"role": "user", "content": "Write a short tagline for an AI video tool."}],
    "system_instruction": "You are a creative marketing copywriter.",
    "config": {"temperature": 0.8, "max_output_tokens": 48},
}


async def test_sync_example_returns_real_text_and_settles_credits(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path)) as server:
        account = await server.account(credits=10)
        async with server.client(account) as client:
            response = await client.post("/sse/text_generator/", json={**GUIDE_BODY, "sync": True})
            assert response.status_code == 201, response.text
            task = response.json()
            assert task["status"] == "done", task
            assert task["response_text"].strip()
            # A multi-token prompt evaluated by llama.cpp (the build flags matter here).
            assert task["input_tokens"] > 20
            assert 0 < task["output_tokens"] <= 48
            assert task["credits_used"] > 0
            balance = (await client.get("/api/remaining_credits/")).json()["remaining_credits"]
            assert abs(balance - (10 - task["credits_used"])) < 1e-9
            polled = (await client.get(f"/api/text_generator/{task['id']}/")).json()
            assert polled["response_text"] == task["response_text"]


async def test_async_example_is_pending_then_done(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path)) as server:
        account = await server.account()
        async with server.client(account) as client:
            response = await client.post("/sse/text_generator/", json=GUIDE_BODY)
            assert response.status_code == 201
            created = response.json()
            assert created["status"] == "pending"
            assert created["credits_used"] == 0
        done = await server.wait_for(account, created["id"])
        assert done["status"] == "done"
        assert done["response_text"].strip()
        assert done["system_instruction"] == GUIDE_BODY["system_instruction"]
        assert done["config"]["temperature"] == 0.8


async def test_seed_and_stop_sequences_are_honoured(tmp_path: Path) -> None:
    body = {
        "model_name": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Tell me a story about a dragon."}],
        "config": {"temperature": 1.0, "seed": 1234, "max_output_tokens": 30},
        "sync": True,
    }
    async with run_server(make_settings(tmp_path)) as server:
        account = await server.account()
        async with server.client(account) as client:
            first = (await client.post("/sse/text_generator/", json=body)).json()
            second = (await client.post("/sse/text_generator/", json=body)).json()
            assert first["response_text"] == second["response_text"]
            text = first["response_text"]
            assert len(text) > 10
            stop = text[5:8]
            stopped_body = {**body, "config": {**body["config"], "stop_sequences": [stop]}}
            stopped = (await client.post("/sse/text_generator/", json=stopped_body)).json()
            assert stop not in stopped["response_text"]
            assert stopped["response_text"] == text[: text.index(stop)]
            short = {**body, "config": {**body["config"], "max_output_tokens": 3}}
            assert (await client.post("/sse/text_generator/", json=short)).json()["output_tokens"] == 3


async def test_image_input_to_text_only_model_is_refused(tmp_path: Path) -> None:
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    async with run_server(make_settings(tmp_path)) as server:
        account = await server.account()
        async with server.client(account) as client:
            response = await client.post(
                "/sse/text_generator/",
                json={
                    "model_name": "smollm2-135m-instruct",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image", "data": png, "mime_type": "image/png"},
                                {"type": "text", "text": "Describe this."},
                            ],
                        }
                    ],
                },
            )
            assert response.status_code == 400
            assert "does not accept image" in response.json()["error"]
