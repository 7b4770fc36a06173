"""Hostile and malformed requests: each gets the documented 4xx with the one error shape, never a 5xx."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import Account, Server, run_server
from tests.fakes.providers import FakeProvider
from tests.reliability.conftest import PLENTY, UNLIMITED, assert_books_balance, reliability_settings

CREATE = "/sse/text_generator/"
STREAM = "/sse/text_generator/stream/"
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
MAX_BODY = 64 * 1024


def body(**overrides: Any) -> dict[str, Any]:
    return {
        "model_name": "fake-model",
        "messages": [{"role": "user", "content": "hi"}],
        "sync": True,
        **overrides,
    }


def image(mime_type: str, data: bytes | str) -> dict[str, Any]:
    encoded = data if isinstance(data, str) else base64.b64encode(data).decode()
    return body(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image", "data": encoded, "mime_type": mime_type},
                ],
            }
        ]
    )


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[Server, Account]]:
    # Gemini is configured but points nowhere: these requests must be refused before reaching a model.
    settings = reliability_settings(tmp_path, "http://127.0.0.1:9", max_body_bytes=MAX_BODY)
    async with run_server(settings, {"fake": FakeProvider()}) as server:
        account = await server.account(credits=PLENTY, rate_limit=UNLIMITED)
        yield server, account
        await assert_books_balance(server.services, account, PLENTY)


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert set(payload) == {"error"} and isinstance(payload["error"], str) and payload["error"]
    for fragment in fragments:
        assert fragment in payload["error"], payload["error"]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


RAW_BODIES = [
    pytest.param(b'{"model_name": "fake-model", "messages": [', "invalid JSON", id="truncated"),
    pytest.param(b"model_name=fake-model", "invalid JSON", id="form-encoded"),
    pytest.param(b"{'model_name': 'fake-model'}", "invalid JSON", id="single-quotes"),
    pytest.param(b'{"model_name": "fake-model",}', "invalid JSON", id="trailing-comma"),
    pytest.param(b"\xff\xfe{\x00}\x00", "invalid JSON", id="utf16-bytes"),
    pytest.param(b"null", "request body", id="null"),
    pytest.param(b"[]", "request body", id="array"),
    pytest.param(b'"text"', "request body", id="string"),
    pytest.param(b"   ", "empty", id="blank"),
    pytest.param(b"", "empty", id="empty"),
    pytest.param(b'{"model_name": "fake-model", "messages": NaN}', "messages", id="nan"),
    pytest.param(
        b'{"model_name": "fake-model", "messages": [{"role": "user", "content": "x"}], "config": '
        b'{"temperature": 1e400}}',
        "config.temperature",
        id="temperature-overflow",
    ),
    pytest.param(
        b'{"model_name": "fake-model", "messages": [{"role": "user", "function_response": '
        b'{"name": "f", "response": {"v": NaN}}}]}',
        "",
        id="nan-in-free-form-object",
    ),
    pytest.param(
        b'{"model_name": "fake-model", "messages": [{"role": "user", "content": "x"}], "tools": '
        b'[{"function_declarations": [{"name": "f", "parameters": {"maximum": Infinity}}]}]}',
        "",
        id="infinity-in-free-form-object",
    ),
    pytest.param(json.dumps(body(messages=nested(20_000))).encode(), "", id="deep-array-as-string"),
    pytest.param(
        ('{"model_name": "fake-model", "messages": ' + nested(20_000) + "}").encode(), "", id="deep-array"
    ),
    pytest.param(
        (
            '{"model_name": "fake-model", "messages": [{"role": "user", "content": "x"}], "config": '
            '{"response_json_schema": ' + nested_object(8_000) + "}}"
        ).encode(),
        "",
        id="deep-object",
    ),
]


@pytest.mark.parametrize(("raw", "fragment"), RAW_BODIES)
async def test_malformed_bodies_are_400(service: tuple[Server, Account], raw: bytes, fragment: str) -> None:
    server, account = service
    async with server.client(account) as client:
        for path in (CREATE, STREAM):
            response = await client.post(path, content=raw, headers={"content-type": "application/json"})
            assert_error(response, 400, fragment)


WRONG_TYPES = [
    pytest.param(body(model_name=5), "model_name", id="model-int"),
    pytest.param(body(messages="hi"), "messages", id="messages-string"),
    pytest.param(body(messages=[["user", "hi"]]), "messages[0]", id="message-list"),
    pytest.param(body(messages=[{"role": "user", "content": 5}]), "messages[0].content", id="content-int"),
    pytest.param(body(sync="yes"), "sync", id="sync-string"),
    pytest.param(body(config=[]), "config", id="config-list"),
    pytest.param(body(config={"temperature": "hot"}), "config.temperature", id="temperature-string"),
    pytest.param(body(config={"max_output_tokens": 1.5}), "config.max_output_tokens", id="tokens-float"),
    pytest.param(body(config={"seed": 2**80}), "config.seed", id="seed-huge"),
    pytest.param(body(tools={"function_declarations": []}), "tools", id="tools-object"),
    pytest.param(body(webhook_url=["http://127.0.0.1/"]), "webhook_url", id="webhook-list"),
    pytest.param(body(webhook_url="http://[::1"), "webhook_url", id="webhook-broken-ipv6"),
    pytest.param(body(webhook_url="http://127.0.0.1:99999/"), "webhook_url", id="webhook-bad-port"),
    pytest.param(body(model_name="x" * 1_000), "model_name", id="model-long"),
    pytest.param(body(model_name="fake-model\x00"), "model_name", id="model-nul"),
    pytest.param(body(unknown_field=1), "unknown_field", id="unknown-field"),
]


@pytest.mark.parametrize(("payload", "fragment"), WRONG_TYPES)
async def test_wrong_types_are_400_naming_the_field(
    service: tuple[Server, Account], payload: dict[str, Any], fragment: str
) -> None:
    server, account = service
    async with server.client(account) as client:
        response = await client.post(CREATE, json=payload)
        assert_error(response, 400, fragment)


MEDIA = [
    pytest.param(image("image/png", "not base64!!"), "base64", id="invalid-base64"),
    pytest.param(image("image/png", "iVBORw0KGgo%%%%"), "base64", id="base64-with-junk"),
    pytest.param(image("image/png", "a"), "base64", id="base64-one-char"),
    pytest.param(image("image/jpeg", PNG_1X1), "image/png", id="png-declared-jpeg"),
    pytest.param(image("image/png", b"just some text, not a picture"), "image", id="text-declared-png"),
    pytest.param(image("text/plain", b"hello"), "mime_type", id="text-mime"),
    pytest.param(image("image/png", ""), "empty", id="empty-data"),
]


@pytest.mark.parametrize(("payload", "fragment"), MEDIA)
async def test_lying_or_broken_media_is_400(
    service: tuple[Server, Account], payload: dict[str, Any], fragment: str
) -> None:
    server, account = service
    async with server.client(account) as client:
        response = await client.post(CREATE, json=payload)
        assert_error(response, 400, fragment)


async def test_oversized_bodies_are_413_declared_or_not(service: tuple[Server, Account]) -> None:
    server, account = service
    big = json.dumps(body(system_instruction="x" * (MAX_BODY + 1))).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    async with server.client(account) as client:
        for path in (CREATE, STREAM):
            assert_error(
                await client.post(path, content=big, headers={"content-type": "application/json"}),
                413,
                "limit",
            )
            # Chunked: no Content-Length to refuse up front; the limit is enforced while reading.
            assert_error(
                await client.post(path, content=chunks(), headers={"content-type": "application/json"}),
                413,
                "limit",
            )


async def test_huge_strings_within_the_body_limit_are_served_or_refused_cleanly(
    service: tuple[Server, Account],
) -> None:
    server, account = service
    async with server.client(account) as client:
        long_text = "word " * ((MAX_BODY - 1024) // 5)
        response = await client.post(CREATE, json=body(messages=[{"role": "user", "content": long_text}]))
        assert response.status_code == 201, response.text[:300]
        assert response.json()["status"] == "done"
        assert_error(
            await client.post(CREATE, json=body(model_name="m" * (MAX_BODY - 1024))), 400, "model_name"
        )


UNICODE = [
    pytest.param("\u05e9\u05dc\u05d5\u05dd \u202eevil\u202c", id="rtl-and-override"),
    pytest.param("emoji \U0001f600\U0001f469\u200d\U0001f4bb and flags \U0001f1fa\U0001f1f8", id="emoji"),
    pytest.param("combining e\u0301\u0301\u0301 and zero width \u200b\ufeff", id="combining"),
    pytest.param("nul \u0000 inside", id="nul"),
    pytest.param("\uffff\ufffe non-characters", id="non-characters"),
]


@pytest.mark.parametrize("text", UNICODE)
async def test_unicode_edge_cases_round_trip(service: tuple[Server, Account], text: str) -> None:
    server, account = service
    async with server.client(account) as client:
        created = await client.post(CREATE, json=body(messages=[{"role": "user", "content": text}]))
        assert created.status_code == 201, created.text
        task = created.json()
        assert task["status"] == "done"
        assert task["messages"][0]["content"] == text
        assert task["response_text"] == f"echo: {text}"
        again = (await client.get(f"{CREATE}{task['id']}/")).json()
        assert again["messages"][0]["content"] == text


@pytest.mark.parametrize(
    "escaped",
    [
        pytest.param('"\\ud800"', id="lone-high"),
        pytest.param('"\\udfff tail"', id="lone-low"),
        pytest.param('"\\udc00\\ud800"', id="reversed-pair"),
    ],
)
async def test_lone_surrogates_are_refused(service: tuple[Server, Account], escaped: str) -> None:
    server, account = service
    prefix = '{"model_name": "fake-model", "sync": true, "messages": [{"role": "user", "content": '
    raw = prefix + escaped + "}]}"
    async with server.client(account) as client:
        for path in (CREATE, STREAM):
            response = await client.post(
                path, content=raw.encode(), headers={"content-type": "application/json"}
            )
            assert_error(response, 400)


async def test_missing_content_type_is_read_as_json(service: tuple[Server, Account]) -> None:
    server, account = service
    async with server.client(account) as client:
        created = await client.post(CREATE, content=json.dumps(body()).encode(), headers={"content-type": ""})
        assert created.status_code == 201, created.text
        refused = await client.post(CREATE, content=b"model_name=fake-model", headers={"content-type": ""})
        assert_error(refused, 400, "invalid JSON")


async def raw_request(url: str, request: bytes) -> bytes:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
        await writer.wait_closed()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


async def test_header_injection_never_authenticates_or_splits_the_response(
    service: tuple[Server, Account],
) -> None:
    server, account = service
    key = account.api_key.encode()
    api_id = account.api_id.encode()
    attempts = [
        # A value carrying CRLF becomes a header of its own: it gains nothing without the key.
        b"X-API-ID: " + api_id + b"\r\nX-API-KEY: tgk_guessed",
        # Conflicting duplicates: the first one counts, and it is wrong.
        b"X-API-ID: tg_other\r\nX-API-ID: " + api_id + b"\r\nX-API-KEY: " + key,
        # A bare CR or LF inside a value, or a NUL: the HTTP parser refuses the request.
        b"X-API-ID: " + api_id + b"\rX-Injected: 1\r\nX-API-KEY: " + key,
        b"X-API-ID: " + api_id + b"\x00\r\nX-API-KEY: " + key,
        # Header folding (obsolete line continuation) must not glue a key onto the id.
        b"X-API-ID: " + api_id + b"\r\n X-API-KEY: " + key,
        # Non-ASCII bytes.
        b"X-API-ID: \xff\xfe" + api_id + b"\r\nX-API-KEY: " + key,
    ]
    seen = []
    for headers in attempts:
        request = (
            b"GET /api/remaining_credits/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            + headers
            + b"\r\n\r\n"
        )
        raw = await raw_request(server.url, request)
        status = status_of(raw)
        seen.append(status)
        assert status in (400, 401), raw[:300]
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert b"X-Injected" not in head
        if status == 401:
            assert set(json.loads(payload)) == {"error"}
    assert seen[:2] == [401, 401], seen
    # Values from the client are never echoed into response headers.
    raw = await raw_request(
        server.url,
        b"GET /sse/text_generator/x%0d%0aSet-Cookie:%20a=b/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        b"X-API-ID: " + api_id + b"\r\nX-API-KEY: " + key + b"\r\n\r\n",
    )
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert status_of(raw) == 404 and b"set-cookie" not in head.lower()
    assert set(json.loads(payload)) == {"error"}
