"""Function calling on the embedded model: declarations in the prompt, calls forced valid by a grammar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.conftest import make_settings, run_server
from textgen import limits

MODEL = "smollm2-135m-instruct"
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather for a given location.",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string", "description": "City name"}},
        "required": ["location"],
    },
}
TIME = {
    "name": "get_time",
    "description": "Get the current time in a time zone.",
    "parameters": {
        "type": "object",
        "properties": {
            "zone": {"type": "string", "enum": ["UTC", "PST", "CET"]},
            "format": {"type": "string", "enum": ["12h", "24h"]},
        },
        "required": ["zone", "format"],
    },
}
CONVERT = {
    "name": "convert",
    "description": "Convert an amount between currencies.",
    "parameters": {
        "type": "OBJECT",
        "properties": {"amount": {"type": "NUMBER", "minimum": 0}, "to": {"type": "STRING"}},
        "required": ["amount", "to"],
    },
}
SCHEMAS = {f["name"]: f["parameters"] for f in (WEATHER, TIME)}


def request(
    content: str, tools: list[dict[str, Any]], mode: str | None = None, **config: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model_name": MODEL,
        "messages": [{"role": "user", "content": content}],
        "tools": [{"function_declarations": tools}],
        "config": {"max_output_tokens": 40, **config},
        "sync": True,
    }
    if mode is not None:
        body["tool_config"] = {"function_calling_config": {"mode": mode}}
    return body


async def test_any_with_one_function_always_returns_a_valid_call(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account()
        async with server.client(account) as client:
            for seed, question in enumerate(["What is the weather in Paris?", "Tell me a joke.", "Hello"]):
                body = request(question, [WEATHER], "ANY", temperature=1.0, seed=seed)
                task = (await client.post("/sse/text_generator/", json=body)).json()
                assert task["status"] == "done", (task["failed_reason"], task["response_text"])
                assert task["response_text"] == ""
                [call] = task["response_function_calls"]
                assert call["name"] == "get_weather"
                jsonschema.validate(call["args"], WEATHER["parameters"])


async def test_any_with_several_allowed_functions(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account()
        async with server.client(account) as client:
            seen = set()
            for seed in range(4):
                body = request(
                    "What time is it in Berlin?", [WEATHER, TIME, CONVERT], "ANY", temperature=1.0, seed=seed
                )
                body["tool_config"]["function_calling_config"]["allowed_function_names"] = [
                    "get_weather",
                    "get_time",
                ]
                task = (await client.post("/sse/text_generator/", json=body)).json()
                assert task["status"] == "done", (task["failed_reason"], task["response_text"])
                [call] = task["response_function_calls"]
                assert call["name"] in SCHEMAS
                jsonschema.validate(call["args"], SCHEMAS[call["name"]])
                seen.add(call["name"])
            # OpenAPI-style upper-case types in a declaration are accepted too.
            body = request("Convert 5 dollars to euros.", [CONVERT], "ANY", temperature=0)
            task = (await client.post("/sse/text_generator/", json=body)).json()
            [call] = task["response_function_calls"]
            assert (
                call["name"] == "convert"
                and call["args"]["amount"] >= 0
                and isinstance(call["args"]["to"], str)
            )
            assert seen


def guide_first_turn(question: str, **config: Any) -> dict[str, Any]:
    """The guide's function-calling example (mode AUTO), on the embedded model."""
    body = request(question, [WEATHER], "AUTO", **config)
    body["config"].pop("max_output_tokens")
    return body


async def test_guide_weather_round_trip_under_auto(tmp_path: Path) -> None:
    question = "What is the weather in San Francisco?"
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account()
        async with server.client(account) as client:
            for seed in range(3):
                first = (
                    await client.post("/sse/text_generator/", json=guide_first_turn(question, seed=seed))
                ).json()
                assert first["status"] == "done", first
                assert first["response_text"] == ""
                [call] = first["response_function_calls"]
                assert call["name"] == "get_weather"
                jsonschema.validate(call["args"], WEATHER["parameters"])
            # The guide's follow-up: no tool_config (so AUTO), the call and its result in the conversation.
            follow_up = {
                "model_name": MODEL,
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "model", "function_call": call},
                    {
                        "role": "user",
                        "function_response": {
                            "name": "get_weather",
                            "response": {"temperature": 62, "condition": "Foggy"},
                        },
                    },
                ],
                "tools": [{"function_declarations": [WEATHER]}],
                "config": {"max_output_tokens": 40, "temperature": 0},
                "sync": True,
            }
            second = (await client.post("/sse/text_generator/", json=follow_up)).json()
            assert second["status"] == "done", second
            assert second["response_function_calls"] == []
            assert second["response_text"].strip()
            assert "<tool_call>" not in second["response_text"]
            # The answer is built on the function's result.
            answer = second["response_text"].lower()
            assert "fog" in answer or "62" in answer, answer


async def test_auto_and_validated_call_only_when_the_request_needs_it(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account()
        async with server.client(account) as client:
            for mode in ("AUTO", "VALIDATED"):
                body = request("What is the weather in Rome?", [WEATHER], mode, temperature=1.0, seed=1)
                task = (await client.post("/sse/text_generator/", json=body)).json()
                assert task["status"] == "done", (task["failed_reason"], task["response_text"])
                [call] = task["response_function_calls"]
                assert call["name"] == "get_weather" and task["response_text"] == ""
                jsonschema.validate(call["args"], WEATHER["parameters"])

                body = request("Tell me a joke about cats.", [WEATHER], mode, temperature=1.0, seed=1)
                task = (await client.post("/sse/text_generator/", json=body)).json()
                assert task["status"] == "done", (task["failed_reason"], task["response_text"])
                assert task["response_function_calls"] == []
                assert task["response_text"].strip() and "<tool_call>" not in task["response_text"]

            # With several functions it calls the one the request is about.
            body = request("What time is it in Berlin?", [WEATHER, TIME, CONVERT], "AUTO", temperature=0)
            task = (await client.post("/sse/text_generator/", json=body)).json()
            [call] = task["response_function_calls"]
            assert call["name"] == "get_time"
            jsonschema.validate(call["args"], TIME["parameters"])
            # A function without a description is judged by its name.
            nameless = {"name": "get_weather", "parameters": WEATHER["parameters"]}
            for question, calls in (("What is the weather in Rome?", 1), ("Tell me a joke about cats.", 0)):
                body = request(question, [nameless], "AUTO", temperature=0)
                task = (await client.post("/sse/text_generator/", json=body)).json()
                assert len(task["response_function_calls"]) == calls, task
            # VALIDATED with allowed_function_names: only an allowed function can be called.
            body = request("What is the weather in Oslo?", [WEATHER, TIME], "VALIDATED", temperature=0)
            body["tool_config"]["function_calling_config"]["allowed_function_names"] = ["get_time"]
            task = (await client.post("/sse/text_generator/", json=body)).json()
            assert task["status"] == "done", task
            assert all(c["name"] == "get_time" for c in task["response_function_calls"])

            for seed in range(3):
                body = request("Call get_weather for Oslo.", [WEATHER], "NONE", temperature=1.0, seed=seed)
                task = (await client.post("/sse/text_generator/", json=body)).json()
                assert task["status"] == "done", (task["failed_reason"], task["response_text"])
                assert task["response_function_calls"] == []
                assert task["response_text"]


async def test_auto_with_a_json_schema_gives_valid_json_or_a_call(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "legs": {"type": "integer", "minimum": 0}},
        "required": ["name", "legs"],
    }
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account()
        async with server.client(account) as client:
            answers = {}
            for question in ("Describe a spider as JSON.", "What is the weather in Lisbon?"):
                body = request(
                    question, [WEATHER], "AUTO", temperature=0.7, seed=3, response_json_schema=schema
                )
                body["config"]["max_output_tokens"] = 120
                task = (await client.post("/sse/text_generator/", json=body)).json()
                assert task["status"] == "done", (task["failed_reason"], task["response_text"])
                answers[question] = task
            text = answers["Describe a spider as JSON."]
            assert text["response_function_calls"] == []
            jsonschema.validate(json.loads(text["response_text"]), schema)
            call = answers["What is the weather in Lisbon?"]
            assert call["response_text"] == ""
            [made] = call["response_function_calls"]
            jsonschema.validate(made["args"], WEATHER["parameters"])


async def test_unusable_parameter_schema_is_a_400(tmp_path: Path) -> None:
    bad = {**WEATHER, "parameters": {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}}
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account()
        async with server.client(account) as client:
            response = await client.post("/sse/text_generator/", json=request("hi", [bad], "ANY"))
            assert response.status_code == 400
            assert "tools[0].function_declarations[0].parameters" in response.json()["error"]
            response = await client.post(
                "/sse/text_generator/",
                json=request("hi", [{**WEATHER, "parameters": {"type": "string"}}], "ANY"),
            )
            assert response.status_code == 400
            assert "object schema" in response.json()["error"]


def many(n: int) -> list[dict[str, Any]]:
    """``n`` declarations the request is not about."""
    return [
        {"name": f"lookup_{i}", "description": f"Look up record number {i} in the parts inventory."}
        for i in range(n)
    ]


async def test_auto_scores_at_most_the_cap_and_bills_every_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small cap and no time budget, so every pass is counted exactly, however slow the machine.
    cap = 3
    monkeypatch.setattr(limits, "LOCAL_MAX_SCORED_FUNCTIONS", cap)
    monkeypatch.setattr(limits, "LOCAL_SCORING_SECONDS", 1e6)
    joke = "Tell me a joke about cats."
    settings = make_settings(tmp_path, local_model_instances=1, local_threads=1)
    async with run_server(settings) as server:
        engine = server.services.registry.providers["local"].engines[0]
        heavy, other = await server.account(name="heavy"), await server.account(name="other")
        async with server.client(heavy) as client:
            # One past the cap: a 400 before any task exists or any pass runs; nothing is reserved.
            for mode in ("AUTO", "VALIDATED"):
                response = await client.post("/sse/text_generator/", json=request(joke, many(cap + 1), mode))
                assert response.status_code == 400, response.text
                assert response.json()["error"].startswith(
                    f"tools: under mode {mode} the local model chooses among at most {cap} functions, "
                    f"not {cap + 1}"
                )
            assert (await client.get("/sse/text_generator/")).json()["results"] == []
            assert engine.passes == 0
            # Naming at most the cap among them is served.
            body = request(joke, many(cap + 1), "VALIDATED", max_output_tokens=4)
            names = [d["name"] for d in many(cap)]
            body["tool_config"]["function_calling_config"]["allowed_function_names"] = names
            assert (await client.post("/sse/text_generator/", json=body)).json()["status"] == "done"
            assert engine.passes == cap + 1

            # At the cap, async, while another account waits with a sync request on the one instance.
            body = {**request(joke, many(cap), "AUTO", temperature=0, max_output_tokens=4), "sync": False}
            passes, scored = engine.passes, engine.scored_tokens
            created = (await client.post("/sse/text_generator/", json=body)).json()
            async with server.client(other) as other_client:
                small = {**request("Say hi.", [], None, max_output_tokens=4), "tools": []}
                answered = (await other_client.post("/sse/text_generator/", json=small)).json()
            assert answered["status"] == "done", answered
            task = await server.wait_for(heavy, created["id"], within=300)
        assert task["status"] == "done", task
        # The other account waited for at most the cap's passes (one per function and one more)...
        assert engine.passes - passes == cap + 1
        scored = engine.scored_tokens - scored
        assert scored > cap
        # ...and they are billed to the request that needed them, as prompt tokens.
        if task["response_function_calls"]:
            [call] = task["response_function_calls"]
            same = request(joke, many(cap), "ANY", temperature=0, max_output_tokens=4)
            same["tool_config"]["function_calling_config"]["allowed_function_names"] = [call["name"]]
        else:
            same = request(joke, many(cap), "NONE", temperature=0, max_output_tokens=4)
        async with server.client(heavy) as client:
            unscored = (await client.post("/sse/text_generator/", json=same)).json()
        assert task["input_tokens"] == unscored["input_tokens"] + scored
        spec = server.services.registry.catalog[MODEL]
        charged = server.services.tasks.pricing.cost(spec, task["input_tokens"], task["output_tokens"])
        assert task["credits_used"] == charged / 1_000_000

        # Past the scoring time budget the functions not reached are not scored (here: none is).
        monkeypatch.setattr(limits, "LOCAL_SCORING_SECONDS", 0.0)
        body = request("What is the weather in Rome?", [WEATHER], "AUTO", temperature=0, max_output_tokens=4)
        passes = engine.passes
        async with server.client(heavy) as client:
            task = (await client.post("/sse/text_generator/", json=body)).json()
        assert engine.passes - passes == 1
        assert task["status"] == "done" and task["response_function_calls"] == [], task
