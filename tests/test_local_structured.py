"""Structured output on the embedded model: JSON constrained by a grammar built from the schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.conftest import make_settings, run_server
from textgen.structured import SchemaProblem, compile_schema, json_grammar

MODEL = "smollm2-135m-instruct"

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        },
        "required": ["name", "age", "role"],
    },
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "description": "a short title"},
            "tags": {
                "type": "array",
                "items": {"type": "string", "enum": ["a", "b", "c"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "author": {
                "type": "object",
                "properties": {"first": {"type": "string"}, "verified": {"type": "boolean"}},
                "required": ["verified"],
            },
        },
        "required": ["tags", "author"],
        "propertyOrdering": ["author", "tags", "title"],
    },
    {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2}},
                "required": ["x"],
            }
        },
        "type": "array",
        "prefixItems": [{"$ref": "#/$defs/point"}, {"type": ["string", "null"], "format": "date"}],
        "minItems": 2,
        "maxItems": 2,
    },
]


async def test_json_output_validates_against_each_schema(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account()
        async with server.client(account) as client:
            for schema in SCHEMAS:
                body = {
                    "model_name": MODEL,
                    "messages": [{"role": "user", "content": "Give an example record as JSON."}],
                    "config": {
                        "response_json_schema": schema,
                        "max_output_tokens": 80,
                        "temperature": 0.7,
                        "seed": 7,
                    },
                    "sync": True,
                }
                task = (await client.post("/sse/text_generator/", json=body)).json()
                assert task["status"] == "done", (task["failed_reason"], task["response_text"])
                assert task["config"]["response_mime_type"] == "application/json"
                jsonschema.validate(json.loads(task["response_text"]), schema)


async def test_property_ordering_and_json_mime_type_without_schema(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account()
        async with server.client(account) as client:
            body = {
                "model_name": MODEL,
                "messages": [{"role": "user", "content": "Describe a book."}],
                "config": {"response_json_schema": SCHEMAS[1], "max_output_tokens": 80, "temperature": 0},
                "sync": True,
            }
            task = (await client.post("/sse/text_generator/", json=body)).json()
            assert task["status"] == "done", (task["failed_reason"], task["response_text"])
            keys = list(json.loads(task["response_text"]))
            assert keys[:2] == ["author", "tags"]
            body["config"] = {
                "response_mime_type": "application/json",
                "max_output_tokens": 60,
                "temperature": 0,
            }
            task = (await client.post("/sse/text_generator/", json=body)).json()
            if task["status"] == "done":
                assert isinstance(json.loads(task["response_text"]), dict | list)
            else:
                assert "max_output_tokens" in task["failed_reason"]


async def test_truncated_json_fails_the_task_with_a_reason(tmp_path: Path) -> None:
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account()
        async with server.client(account) as client:
            body = {
                "model_name": MODEL,
                "messages": [{"role": "user", "content": "A long story as JSON."}],
                "config": {
                    "response_json_schema": {
                        "type": "object",
                        "properties": {"story": {"type": "string"}},
                        "required": ["story"],
                    },
                    "max_output_tokens": 4,
                },
                "sync": True,
            }
            task = (await client.post("/sse/text_generator/", json=body)).json()
            assert task["status"] == "failed"
            assert "max_output_tokens (4)" in task["failed_reason"]
            # The four tokens were generated: they are charged, unusable as they are.
            assert task["output_tokens"] == 4 and task["credits_used"] > 0


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "strin"}, "not a JSON type"),
        ({"$ref": "https://example.com/schema.json"}, "only references inside the schema"),
        ({"$ref": "#/$defs/missing"}, "does not resolve"),
        ({"type": "integer", "minimum": 10, "maximum": 1}, "greater than maximum"),
        ({"type": "array", "minItems": 5, "maxItems": 2}, "greater than maxItems"),
        ({"type": "string", "enum": []}, "enum"),
        ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "accepts no value"),
    ],
)
async def test_unusable_schema_is_a_400_before_any_task(
    tmp_path: Path, schema: dict[str, Any], problem: str
) -> None:
    async with run_server(make_settings(tmp_path, local_model_instances=1)) as server:
        account = await server.account()
        async with server.client(account) as client:
            response = await client.post(
                "/sse/text_generator/",
                json={
                    "model_name": MODEL,
                    "messages": [{"role": "user", "content": "hi"}],
                    "config": {"response_json_schema": schema},
                    "sync": True,
                },
            )
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert "config.response_json_schema" in error and problem in error
            listed = (await client.get("/sse/text_generator/")).json()
            assert listed["results"] == []


def test_unsupported_keywords_are_ignored() -> None:
    compiled = compile_schema({"type": "string", "pattern": "^a+$", "minLength": 3, "const": "x", "TYPE": 1})
    assert compiled.schema == {"type": "string"}
    assert compiled.validate("bbb") is None
    assert "root ::=" in json_grammar(compiled)
    with pytest.raises(SchemaProblem):
        compile_schema({"type": "object", "properties": []})
