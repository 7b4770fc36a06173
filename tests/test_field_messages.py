"""A 400 names the request field at fault, down to the place inside a JSON Schema, never an internal rule name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import make_settings, run_server

MODEL = "smollm2-135m-instruct"
HI = [{"role": "user", "content": "hi"}]


def schema_body(schema: Any) -> dict[str, Any]:
    return {"model_name": MODEL, "messages": HI, "config": {"response_json_schema": schema}, "sync": True}


def tool_body(*tools: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_name": MODEL,
        "messages": HI,
        "tools": list(tools),
        "tool_config": {"function_calling_config": {"mode": "ANY"}},
        "sync": True,
    }


def declaration(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"function_declarations": [{"name": name, "parameters": parameters}]}


RANGE = {"type": "integer", "minimum": 5, "maximum": 1}
SCHEMA = "config.response_json_schema"

CASES: list[tuple[dict[str, Any], str]] = [
    (
        schema_body({"type": "object", "properties": {"answer": RANGE}}),
        f"{SCHEMA}: /properties/answer: minimum 5 is greater than maximum 1",
    ),
    (schema_body(RANGE), f"{SCHEMA}: minimum 5 is greater than maximum 1"),
    (
        schema_body({"type": "object", "properties": {"tags": {"type": "array", "items": RANGE}}}),
        f"{SCHEMA}: /properties/tags/items: minimum 5 is greater than maximum 1",
    ),
    (
        schema_body(
            {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1.2, "maximum": 1.8}}}
        ),
        f"{SCHEMA}: /properties/n: no integer lies between minimum 1.2 and maximum 1.8",
    ),
    (
        schema_body({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
        f"{SCHEMA}: /properties/a: $ref '#/$defs/missing' does not resolve (only supported keywords are kept)",
    ),
    (
        {
            **schema_body({"type": "object"}),
            "config": {"response_mime_type": "text/plain", "response_json_schema": {}},
        },
        f"{SCHEMA}: requires response_mime_type 'application/json' (it is 'text/plain')",
    ),
    (
        tool_body(
            declaration("ok", {"type": "object"}),
            declaration("count", {"type": "object", "properties": {"n": RANGE}}),
        ),
        "tools[1].function_declarations[0].parameters: /properties/n: minimum 5 is greater than maximum 1",
    ),
    (
        {
            "model_name": MODEL,
            "messages": [{"role": "user", "content": [{"type": "image", "mime_type": "image/png"}]}],
        },
        "messages[0].content[0].data: Field required",
    ),
    (
        {"model_name": MODEL, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages[0].content[0].text: Field required",
    ),
    (
        {"model_name": MODEL, "messages": [{"role": "user", "content": [{"text": "hi"}]}]},
        "messages[0].content[0].type: Field required",
    ),
]


async def test_each_400_names_the_field_it_is_about(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path, local_model_instances=1), run_worker=False) as server:
        account = await server.account()
        async with server.client(account) as client:
            for body, expected in CASES:
                response = await client.post("/sse/text_generator/", json=body)
                assert response.status_code == 400, (expected, response.text)
                assert response.json() == {"error": expected}
            # Nothing was created by any of them.
            assert (await client.get("/sse/text_generator/")).json()["results"] == []
