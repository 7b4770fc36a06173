"""Every example request in the guide, read from the guide itself, run against the embedded model over HTTP.

The guide's requests name a Gemini model; here each runs on ``smollm2-135m-instruct`` instead, with its
webhook address pointed at a receiver on loopback. Image and video examples are left out: the embedded
model refuses them with a 400 (tested in test_local_model).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
from httpx_sse import aconnect_sse

from tests.conftest import make_settings, run_server
from tests.test_webhooks import Receiver, serve_receiver

GUIDE = Path(__file__).resolve().parents[2] / "shared" / "spec" / "text-generator-guide.txt"
MODEL = "smollm2-135m-instruct"
RESULT_KEYS = {"id", "status", "response_text", "response_function_calls", "failed_reason", "credits_used"}


def guide_examples() -> list[tuple[str, dict[str, Any]]]:
    """(endpoint path, body) of every ``curl --request POST`` in the guide, in order."""
    text = GUIDE.read_text()
    found = re.findall(r"--url https://api\.creatify\.ai(\S+) \\.*?--data '(.*?)'", text, flags=re.S)
    return [(path, json.loads(body)) for path, body in found]


def has_media(body: dict[str, Any]) -> bool:
    return any(isinstance(m.get("content"), list) for m in body["messages"])


def declared(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d["parameters"] for t in body.get("tools", []) for d in t["function_declarations"]}


async def test_every_text_example_in_the_guide_runs_on_the_embedded_model(tmp_path: Path) -> None:
    examples = guide_examples()
    runnable = [(path, body) for path, body in examples if not has_media(body)]
    # The guide's async, sync, function call, function response and streaming examples.
    assert len(examples) == 6 and len(runnable) == 5
    receiver = Receiver()
    async with (
        serve_receiver(receiver) as receiver_url,
        run_server(make_settings(tmp_path, local_model_instances=1)) as server,
    ):
        account = await server.account(credits=10)
        async with server.client(account) as client:
            for path, body in runnable:
                body = {**body, "model_name": MODEL}
                if "webhook_url" in body:
                    body["webhook_url"] = f"{receiver_url}/hook"
                if path == "/sse/text_generator/stream/":
                    async with aconnect_sse(client, "POST", path, json=body) as source:
                        assert source.response.status_code == 200
                        chunks = [json.loads(sse.data) async for sse in source.aiter_sse()]
                    text = "".join(
                        p.get("text", "") for c in chunks for p in c["candidates"][0]["content"]["parts"]
                    )
                    assert text.strip()
                    assert set(chunks[-1]["creatify"]) == {"id", "credits_used"}
                    task = await server.wait_for(account, chunks[-1]["creatify"]["id"])
                    assert task["status"] == "done" and task["response_text"] == text
                    continue

                response = await client.post(path, json=body)
                assert response.status_code == 201, response.text
                task = response.json()
                assert set(task) >= RESULT_KEYS
                if body.get("sync"):
                    assert task["status"] == "done", task
                else:
                    assert task["status"] == "pending"
                    task = await server.wait_for(account, task["id"])
                    assert task["status"] == "done", task
                assert task["credits_used"] > 0 and task["failed_reason"] == ""

                functions = declared(body)
                last = body["messages"][-1]
                if functions and "function_response" not in last:
                    # The function-calling example asks about the weather under AUTO: a valid call.
                    assert task["response_text"] == ""
                    [call] = task["response_function_calls"]
                    jsonschema.validate(call["args"], functions[call["name"]])
                else:
                    assert task["response_text"].strip()
                    assert task["response_function_calls"] == []
        # The async example's webhook reaches the receiver with the finished result.
        for _ in range(300):
            if receiver.seen:
                break
            await asyncio.sleep(0.05)
    assert len(receiver.seen) == 1
    payload = json.loads(receiver.seen[0].body)
    assert payload["status"] == "done" and payload["response_text"].strip()
