"""The fake Gemini upstream's own answers, compared with the recorded ones (the recordings win).

Each check asks the fake over loopback HTTP for the kind of answer a recording shows and compares what comes back
on the wire: framing, field names and their places, usage in every chunk, where signatures and finish reasons sit,
error bodies and their details, status codes and content types.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.conftest import serve_app
from tests.fakes.fake_gemini import FakeGemini, Fault, sse_event
from tests.fakes.recordings import Exchange, by_name, recordings

BODY = {"contents": [{"role": "user", "parts": [{"text": "Why is the sky blue?"}]}]}
TOOLS = {
    "tools": [
        {
            "functionDeclarations": [
                {
                    "name": "weather",
                    "parametersJsonSchema": {
                        "type": "object",
                        "properties": {"location": {"type": "string"}},
                    },
                }
            ]
        }
    ]
}
CAMEL = re.compile(r"^(@type|[a-z][a-zA-Z0-9]*)$")
# Values that belong to the caller or to a detail's free-form metadata, not to Gemini's schema.
_OPAQUE = {"args", "metadata", "quotaDimensions"}


@asynccontextmanager
async def fake_client(**kwargs: Any) -> AsyncIterator[tuple[FakeGemini, httpx.AsyncClient]]:
    fake = FakeGemini(**kwargs)
    async with (
        serve_app(fake.app) as url,
        httpx.AsyncClient(base_url=url, headers={"x-goog-api-key": "test-key"}) as client,
    ):
        yield fake, client


async def ask(
    client: httpx.AsyncClient,
    model: str,
    *,
    stream: bool = False,
    body: dict[str, Any] | None = None,
    **kw: Any,
) -> httpx.Response:
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return await client.post(f"/v1beta/models/{model}:{method}", json=body or BODY, **kw)


def exchange_of(response: httpx.Response) -> Exchange:
    return Exchange(response.status_code, response.headers["content-type"], response.content)


def key_paths(value: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every field's path (``candidates[].content.parts[].text``), list items merged."""
    found: set[tuple[str, ...]] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            found.add((*prefix, key))
            if key not in _OPAQUE:
                found |= key_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for item in value:
            found |= key_paths(item, (*prefix, "[]"))
    return found


def recorded_paths(kind: str) -> set[tuple[str, ...]]:
    """The union of the field paths of every recorded answer of this kind (stream events or unary bodies)."""
    found: set[tuple[str, ...]] = set()
    for recording in recordings(kind):
        for exchange in recording.exchanges:
            if exchange.status != 200:
                continue
            for answer in exchange.events() if kind == "stream" else [exchange.json()]:
                found |= key_paths(answer)
    return found


def assert_recorded_shape(answer: dict[str, Any], kind: str) -> None:
    paths = key_paths(answer)
    assert all(CAMEL.match(part) for path in paths for part in path if part != "[]"), paths
    invented = paths - recorded_paths(kind)
    assert not invented, f"fields Gemini was not recorded sending: {sorted(invented)}"


def parts(answer: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = answer["candidates"][0]["content"]["parts"]
    return found


# -- streams ------------------------------------------------------------------------------------------


async def test_stream_framing_and_spacing_are_gemini_s() -> None:
    """stream/s01-s07: ``data: <json>`` CRLF CRLF, nothing else, ESF spacing; the stream just ends."""
    recorded = by_name("s03").exchange
    async with fake_client(chunks=4) as (_, client):
        response = await ask(client, "gemini-2.5-flash", stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["content-disposition"] == "attachment"
    body = response.content
    events = exchange_of(response).events()
    assert len(events) == 4
    assert body == b"".join(sse_event(event) for event in events)  # byte for byte as Gemini frames them
    for data in (body, recorded.body):
        assert data.endswith(b"}\r\n\r\n") and b"[DONE]" not in data and b"event:" not in data
        assert b'{"candidates": [{"content": {"parts": [{"text": ' in data
        assert data.replace(b"\r\n", b"").count(b"\n") == 0


@pytest.mark.parametrize("model", ["gemini-2.5-flash", "gemini-3-flash-preview"])
async def test_stream_chunks_carry_the_running_usage_and_finish_last(model: str) -> None:
    """stream/s03, s09, s13: usageMetadata in every chunk (counts that only grow); finishReason on the last."""
    async with fake_client(chunks=3) as (fake, client):
        fake.thoughts_tokens = 7
        events = exchange_of(await ask(client, model, stream=True)).events()
    for event in events:
        assert_recorded_shape(event, "stream")
        usage = event["usageMetadata"]
        assert usage["totalTokenCount"] == (
            usage["promptTokenCount"] + usage["candidatesTokenCount"] + usage["thoughtsTokenCount"]
        )
        assert usage["promptTokensDetails"] == [{"modality": "TEXT", "tokenCount": usage["promptTokenCount"]}]
        assert event["modelVersion"] == model and event["responseId"] == events[0]["responseId"]
    counts = [e["usageMetadata"]["candidatesTokenCount"] for e in events]
    assert counts == sorted(counts)
    finishes = [e["candidates"][0].get("finishReason") for e in events]
    assert finishes == [None] * (len(events) - 1) + ["STOP"]
    for recorded in ("s03", "s09", "s13"):
        recorded_events = by_name(recorded).exchange.events()
        assert all("usageMetadata" in e for e in recorded_events)
        assert [e["candidates"][0].get("finishReason") for e in recorded_events][:-1] == [None] * (
            len(recorded_events) - 1
        )


async def test_gemini_3_text_stream_ends_with_an_empty_signed_part() -> None:
    """stream/s09, s10: the last chunk is ``{"text": "", "thoughtSignature": ...}`` with STOP."""
    async with fake_client(chunks=2) as (_, client):
        events = exchange_of(await ask(client, "gemini-3-flash-preview", stream=True)).events()
    recorded = by_name("s09").exchange.events()
    for stream in (events, recorded):
        [last_part] = parts(stream[-1])
        assert set(last_part) == {"text", "thoughtSignature"} and last_part["text"] == ""
        assert stream[-1]["candidates"][0]["finishReason"] == "STOP"
        assert all("thoughtSignature" not in part for event in stream[:-1] for part in parts(event))


async def test_gemini_3_call_stream_is_the_signed_call_then_an_empty_finishing_part() -> None:
    """stream/s11: the call (signature beside functionCall, not in it) unfinished, then ``{"text": ""}`` STOP."""
    async with fake_client() as (_, client):
        events = exchange_of(
            await ask(client, "gemini-3-flash-preview", stream=True, body={**BODY, **TOOLS})
        ).events()
    recorded = by_name("s11").exchange.events()
    for stream in (events, recorded):
        call, end = stream
        [part] = parts(call)
        assert set(part) == {"functionCall", "thoughtSignature"}
        assert set(part["functionCall"]) == {"name", "args"}
        assert "finishReason" not in call["candidates"][0]
        assert parts(end) == [{"text": ""}] and end["candidates"][0]["finishReason"] == "STOP"
        assert end["usageMetadata"]["candidatesTokenCount"] == call["usageMetadata"]["candidatesTokenCount"]
    assert events[0]["candidates"][0]["content"]["parts"][0]["functionCall"] == {
        "name": "weather",
        "args": {"location": "San Francisco"},
    }


async def test_gemini_2_5_call_stream_is_one_signed_chunk_that_finishes() -> None:
    """stream/s04: a 2.5 model signs the call too, and that chunk carries STOP."""
    async with fake_client() as (_, client):
        events = exchange_of(
            await ask(client, "gemini-2.5-flash", stream=True, body={**BODY, **TOOLS})
        ).events()
    recorded = by_name("s04").exchange.events()
    for call in (events[-1], recorded[-1]):
        [part] = parts(call)
        assert set(part) == {"functionCall", "thoughtSignature"}
        assert call["candidates"][0]["finishReason"] == "STOP"
    assert len(events) == 1


async def test_mid_stream_error_is_a_raw_json_tail_after_http_200() -> None:
    """stream/s15: after the events, the error as pretty-printed JSON (not an event), then the body ends."""
    async with fake_client(chunks=4) as (fake, client):
        fake.add_fault(Fault(error_after_chunks=2, error_status=503))
        response = await ask(client, "gemini-2.5-flash", stream=True)
    recorded = by_name("s15").exchange
    assert response.status_code == recorded.status == 200
    fake_answer = exchange_of(response)
    assert len(fake_answer.events()) == 2
    for answer in (fake_answer, recorded):
        tail = answer.tail()
        assert tail is not None and set(tail["error"]) == {"code", "message", "status"}
        assert tail["error"]["code"] == 503 and tail["error"]["status"] == "UNAVAILABLE"
        head, _, rest = answer.body.partition(b"\n{\n")
        assert head.endswith(b"}\r\n\r") or head.endswith(
            b"}\n"
        )  # the last event's blank line, then the tail
        assert rest.endswith(b"\n}\n") and b"data:" not in rest
        assert json.loads(b"{\n" + rest) == tail


# -- generateContent ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "recorded"), [("gemini-2.5-flash", "g04"), ("gemini-3-flash-preview", "g02")], ids=["2.5", "3"]
)
async def test_unary_text_answer_has_the_recorded_shape(model: str, recorded: str) -> None:
    async with fake_client() as (fake, client):
        fake.thoughts_tokens = 3
        response = await ask(client, model)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json; charset=UTF-8"
    assert response.content == (json.dumps(response.json(), indent=2) + "\n").encode()  # pretty, like Gemini
    answer = response.json()
    assert_recorded_shape(answer, "generate")
    reference = by_name(recorded).exchange.json()
    assert set(answer) == set(reference) == {"candidates", "usageMetadata", "modelVersion", "responseId"}
    assert (
        set(answer["candidates"][0])
        == set(reference["candidates"][0])
        == {"content", "finishReason", "index"}
    )
    signed = [part for part in parts(answer) if "thoughtSignature" in part]
    recorded_signed = [part for part in parts(reference) if "thoughtSignature" in part]
    assert len(signed) == len(recorded_signed)  # Gemini 3 signs its text part; 2.5 does not
    assert all(set(part) == {"text", "thoughtSignature"} for part in signed)


async def test_unary_call_answer_has_the_recorded_shape() -> None:
    """generate/g06: the signed call part, finishReason STOP with finishMessage."""
    async with fake_client() as (_, client):
        answer = (await ask(client, "gemini-3-flash-preview", body={**BODY, **TOOLS})).json()
    reference = by_name("g06").exchange.json()
    assert_recorded_shape(answer, "generate")
    for response in (answer, reference):
        [part] = parts(response)
        assert set(part) == {"functionCall", "thoughtSignature"}
        candidate = response["candidates"][0]
        assert candidate["finishReason"] == "STOP"
        assert candidate["finishMessage"] == "Model generated function call(s)."


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_blocked_prompt_has_only_prompt_feedback(stream: bool) -> None:
    """generate/g14, stream/s05: HTTP 200, promptFeedback with blockReason and ratings; no candidates, no usage."""
    async with fake_client() as (fake, client):
        fake.add_fault(Fault(block_reason="SAFETY"))
        response = await ask(client, "gemini-2.5-flash", stream=stream)
    assert response.status_code == 200
    answer = exchange_of(response).events()[0] if stream else response.json()
    reference = by_name("s05").exchange.events()[0] if stream else by_name("g14").exchange.json()
    for blocked in (answer, reference):
        assert set(blocked) == {"promptFeedback"}
        assert set(blocked["promptFeedback"]) == {"blockReason", "safetyRatings"}
        assert {r["category"] for r in blocked["promptFeedback"]["safetyRatings"]} == {
            r["category"] for r in reference["promptFeedback"]["safetyRatings"]
        }


# -- errors -------------------------------------------------------------------------------------------


def error_shape(exchange: Exchange) -> tuple[int, str, list[str]]:
    error = exchange.json()["error"]
    assert exchange.body == (json.dumps(exchange.json(), indent=2, ensure_ascii=False) + "\n").encode()
    return error["code"], error["status"], [detail["@type"] for detail in error.get("details", [])]


async def test_wrong_key_is_400_api_key_invalid() -> None:
    async with fake_client() as (_, client):
        response = await ask(client, "gemini-2.5-flash", headers={"x-goog-api-key": "wrong"})
    recorded = by_name("e01").exchange
    answer = exchange_of(response)
    assert answer.content_type == "application/json; charset=UTF-8"
    code, status, kinds = error_shape(recorded)
    assert error_shape(answer) == (code, status, kinds[:2])  # ErrorInfo, LocalizedMessage; not the DebugInfo
    assert answer.json()["error"]["message"] == recorded.json()["error"]["message"]
    assert answer.json()["error"]["details"][0] == recorded.json()["error"]["details"][0]


async def test_missing_key_is_403_permission_denied() -> None:
    fake = FakeGemini()
    async with serve_app(fake.app) as url, httpx.AsyncClient(base_url=url) as client:
        response = await ask(client, "gemini-2.5-flash")
    recorded = by_name("e08").exchange
    assert error_shape(exchange_of(response)) == error_shape(recorded)
    assert response.json() == recorded.json()


async def test_quota_error_lists_help_quota_failure_and_retry_info_in_the_2026_order() -> None:
    async with fake_client() as (fake, client):
        fake.fail(429, message="You exceeded your current quota.", retry_delay="29.5s")
        response = await ask(client, "gemini-2.5-flash")
    recorded = by_name("e11").exchange
    assert error_shape(exchange_of(response)) == error_shape(recorded)
    [retry] = [d for d in response.json()["error"]["details"] if d["@type"].endswith("RetryInfo")]
    assert retry == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "29.5s"}
    [violation] = response.json()["error"]["details"][1]["violations"]
    assert set(violation) <= set(recorded.json()["error"]["details"][1]["violations"][0]) | {"quotaValue"}


async def test_overloaded_error_has_no_details() -> None:
    async with fake_client() as (fake, client):
        fake.fail(503, message="The model is overloaded. Please try again later.")
        response = await ask(client, "gemini-2.5-flash")
    recorded = by_name("e16").exchange
    assert error_shape(exchange_of(response)) == error_shape(recorded)
    assert response.json() == recorded.json()


async def test_error_on_a_streaming_request_is_json_typed_event_stream() -> None:
    """stream/s14: the status is kept; the body is the pretty JSON error, under text/event-stream, no ``data:``."""
    async with fake_client() as (fake, client):
        fake.fail(404, message="models/custom-gemini-2.0-flash is not found for API version v1beta")
        response = await ask(client, "gemini-2.5-flash", stream=True)
    recorded = by_name("s14").exchange
    assert (response.status_code, response.headers["content-type"]) == (
        recorded.status,
        recorded.content_type,
    )
    assert not response.content.startswith(b"data:")
    assert error_shape(exchange_of(response))[:2] == error_shape(recorded)[:2]


async def test_unknown_field_is_refused_as_gemini_refuses_it() -> None:
    """errors/e03: the same request mistake gets the same body, byte for byte."""
    body = {**BODY, "generationConfig": {"includeThoughts": True}}
    async with fake_client() as (_, client):
        response = await ask(client, "gemini-2.5-flash", body=body)
    assert response.status_code == 400
    assert response.content == by_name("e03").exchange.body


async def test_limits_are_refused_as_gemini_refuses_them() -> None:
    """errors/e18: more than 512 function declarations; the documented 5 stop sequences."""
    declarations = [{"name": f"f{i}"} for i in range(513)]
    async with fake_client() as (_, client):
        many = await ask(
            client, "gemini-2.5-flash", body={**BODY, "tools": [{"functionDeclarations": declarations}]}
        )
        stops = await ask(
            client, "gemini-2.5-flash", body={**BODY, "generationConfig": {"stopSequences": list("abcdef")}}
        )
        five = await ask(
            client, "gemini-2.5-flash", body={**BODY, "generationConfig": {"stopSequences": list("abcde")}}
        )
    assert many.status_code == 400 and many.json() == by_name("e18").exchange.json()
    assert stops.status_code == 400 and "stop_sequences" in stops.json()["error"]["message"]
    assert five.status_code == 200
