"""The recorded Gemini answers served byte for byte to the running service, over real loopback HTTP.

The fake upstream replays each recording (status, content type, body; streams line by line or in odd-sized
pieces); the service answers its client as it would answer with Gemini behind it. Checked: the client's SSE chunks
(each recorded event relayed, the last carrying the credits), the task (status, text, calls, tokens, failed_reason),
the HTTP status of a stream refused before its first chunk, and the credits charged for the recorded usage.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest
from httpx_sse import aconnect_sse

from tests.conftest import Server
from tests.fakes.fake_gemini import FakeGemini, Replay
from tests.fakes.recordings import Exchange, by_name, load, paths
from tests.test_gemini import balance, fake_gemini, gemini_service
from tests.test_gemini_fixtures import Expected, calls_of, expectations
from textgen.providers.gemini_wire import RAW_FIELDS

STREAM = "/sse/text_generator/stream/"
CREATE = "/sse/text_generator/"
CREDITS = 100.0
# List prices, USD per 1M tokens (input, output), and credits per USD: the service's defaults.
PRICES = {"gemini-2.5-flash": (0.30, 2.50), "gemini-3.1-pro-preview": (2.00, 12.00)}
CREDITS_PER_USD = 100


def credits(model: str, input_tokens: int, output_tokens: int) -> float:
    """What the service charges for these counts, from the list prices (micro-credits, rounded up)."""
    in_price, out_price = PRICES[model]
    micro = (input_tokens * in_price + output_tokens * out_price) * CREDITS_PER_USD
    return math.ceil(round(micro, 6)) / 1_000_000


def test_credits_formula_matches_a_worked_example() -> None:
    # stream/s01 on gemini-2.5-flash: 7 prompt tokens at $0.30/M and 10 output tokens at $2.50/M.
    assert credits("gemini-2.5-flash", 7, 10) == 0.00271
    # stream/s09 on gemini-3.1-pro-preview: 9 prompt, 23 + 185 output (thinking billed as output).
    assert credits("gemini-3.1-pro-preview", 9, 23 + 185) == 0.2514


def model_for(exchange: Exchange) -> str:
    """The service's model that stands for the recorded one (prices differ, the wire does not)."""
    versions = [e.get("modelVersion", "") for e in exchange.events()] if b"data:" in exchange.body else []
    if not versions and exchange.status == 200:
        versions = [exchange.json().get("modelVersion", "")]
    return "gemini-3.1-pro-preview" if any(v.startswith("gemini-3") for v in versions) else "gemini-2.5-flash"


def replay_of(exchange: Exchange, piece_size: int | None = None) -> Replay:
    return Replay(exchange.status, exchange.body, exchange.content_type, exchange.headers, piece_size)


def body_for(model: str, **fields: Any) -> dict[str, Any]:
    return {"model_name": model, "messages": [{"role": "user", "content": "Tell me."}], **fields}


def relayed(event: dict[str, Any]) -> dict[str, Any]:
    """A recorded event as the service relays it: Gemini's own fields, unchanged."""
    return {key: event[key] for key in RAW_FIELDS if key in event}


def task_calls(expected: Expected, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``response_function_calls`` as the task shows the expected calls (whole signatures from the events)."""
    recorded = [call for event in events for call in calls_of(event)]
    assert [c.name for c in recorded] == [c.name for c in expected.calls]
    return [call.as_json() for call in recorded]


async def stream(
    server: Server, account: Any, body: dict[str, Any]
) -> tuple[int, list[tuple[str, Any]], Any]:
    """The status and SSE events (kind, data) of one stream request; on a refusal, its JSON body instead."""
    async with server.client(account) as client, aconnect_sse(client, "POST", STREAM, json=body) as source:
        response = source.response
        if response.status_code != 200:
            await response.aread()
            return response.status_code, [], response
        events = [(sse.event, json.loads(sse.data)) async for sse in source.aiter_sse()]
        return 200, events, response


def stream_params() -> list[Any]:
    out = [pytest.param(path, None, id=path.name) for path in paths("stream")]
    # The same bytes again in 5-byte pieces: events cut anywhere, CRLF pairs split.
    for name in ("s01", "s09", "s15"):
        out.append(pytest.param(by_name(name).path, 5, id=f"{name}-in-5-byte-pieces"))
    return out


@pytest.mark.parametrize(("path", "piece_size"), stream_params())
async def test_stream_recording_through_the_service(
    tmp_path: Path, path: Path, piece_size: int | None
) -> None:
    recording = load(path)
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=CREDITS)
        charged = 0.0
        for exchange, expected in zip(recording.exchanges, expectations(recording), strict=True):
            fake.replay(replay_of(exchange, piece_size))
            model = model_for(exchange)
            status, events, response = await stream(server, account, body_for(model))
            assert fake.last.stream and fake.last.model == model
            if expected.chunks == 0:  # refused before the first chunk: an HTTP status and a JSON error
                assert status == expected.status
                assert response.json()["error"].startswith(expected.error)
                assert len(fake.generate_requests) == 1  # not retried
                continue
            assert status == 200
            recorded = exchange.events()
            kinds = [kind for kind, _ in events]
            datas = [data for _, data in events]
            if expected.error is None:
                assert kinds == ["message"] * len(recorded)
                last = datas[-1].pop("creatify")
                assert datas == [relayed(event) for event in recorded]
                task = await server.wait_for(account, last["id"])
                assert task["status"] == "done", task
                text = task["response_text"]
                assert text.startswith(expected.text)
                assert len(text) == (expected.length if expected.length is not None else len(expected.text))
                assert task["response_function_calls"] == task_calls(expected, recorded)
                assert task["output_tokens"] == expected.output_tokens
                assert task["credits_used"] == last["credits_used"]
                assert task["credits_used"] == credits(model, task["input_tokens"], task["output_tokens"])
                charged += task["credits_used"]
            else:
                # Every chunk Gemini sent before the failure is relayed, then an error event ends the stream.
                assert kinds == ["message"] * expected.chunks + ["error"]
                assert datas[:-1] == [relayed(event) for event in recorded[: expected.chunks]]
                error = datas[-1]
                assert error["error"]["message"].startswith(expected.error)
                assert error["error"]["code"] == expected.status
                task = await server.wait_for(account, error["creatify"]["id"])
                assert task["status"] == "failed"
                assert task["failed_reason"].startswith(expected.error)
                assert task["credits_used"] == error["creatify"]["credits_used"]
                charged += task["credits_used"]
        assert await balance(server, account) == pytest.approx(CREDITS - charged)


@pytest.mark.parametrize(
    "name",
    [
        "s01",
        "s03",
        "s09",
        "s11",
        "s13",
        "s12",
    ],
)
async def test_stream_task_is_charged_for_the_last_chunks_usage(tmp_path: Path, name: str) -> None:
    """Every chunk repeats the running usage; the last one's counts are the generation's (never a sum)."""
    recording = by_name(name)
    [expected] = expectations(recording)
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=CREDITS)
        fake.replay(replay_of(recording.exchange))
        model = model_for(recording.exchange)
        _, events, _ = await stream(server, account, body_for(model))
        task = await server.wait_for(account, events[-1][1]["creatify"]["id"])
        assert (task["input_tokens"], task["output_tokens"]) == (
            expected.input_tokens,
            expected.output_tokens,
        )
        assert task["credits_used"] == credits(model, expected.input_tokens, expected.output_tokens)


# -- generateContent, sync and async ------------------------------------------------------------------


async def run_generate(
    server: Server, fake: FakeGemini, account: Any, exchange: Exchange, sync: bool, **fields: Any
) -> dict[str, Any]:
    fake.replay(replay_of(exchange))
    body = body_for(model_for(exchange), sync=sync, **fields)
    async with server.client(account) as client:
        response = await client.post(CREATE, json=body)
    assert response.status_code == 201, response.text
    task: dict[str, Any] = response.json()
    if not sync:
        assert task["status"] == "pending"
        task = await server.wait_for(account, task["id"])
    assert not fake.last.stream
    return task


def check_generation(task: dict[str, Any], expected: Expected, exchange: Exchange) -> None:
    model = model_for(exchange)
    if expected.error is not None:
        assert task["status"] == "failed", task
        assert task["failed_reason"].startswith(expected.error), task["failed_reason"]
        # Charged for the usage Gemini reported (it bills blocked and failed answers), never more than reserved.
        assert task["credits_used"] <= credits(model, task["input_tokens"], task["output_tokens"])
        if task["input_tokens"] + task["output_tokens"] == 0:
            assert task["credits_used"] == 0
        return
    assert task["status"] == "done", task
    assert task["response_text"].startswith(expected.text)
    assert len(task["response_text"]) == (
        expected.length if expected.length is not None else len(expected.text)
    )
    assert task["response_function_calls"] == task_calls(expected, [exchange.json()])
    assert (task["input_tokens"], task["output_tokens"]) == (expected.input_tokens, expected.output_tokens)
    # What the usage costs, unless that is more than the request reserved (the cap: never more than reserved).
    assert 0 < task["credits_used"] <= credits(model, expected.input_tokens, expected.output_tokens)


GENERATE_SELECTION = [
    "g01",
    "g02",
    "g05",
    "g06",
    "g09",
    "g10",
    "g11",
    "g12",
    "g13",
    "g14",
    "g15",
    "g17",
    "g19",
]


def generate_params() -> list[Any]:
    sync = [pytest.param(name, True, id=f"{name}-sync") for name in GENERATE_SELECTION]
    return sync + [pytest.param(name, False, id=f"{name}-async") for name in ("g01", "g06", "g10", "g14")]


@pytest.mark.parametrize(("name", "sync"), generate_params())
async def test_generate_recording_through_the_service(tmp_path: Path, name: str, sync: bool) -> None:
    recording = by_name(name)
    [expected] = expectations(recording)
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=CREDITS)
        task = await run_generate(server, fake, account, recording.exchange, sync)
        check_generation(task, expected, recording.exchange)
        assert len(fake.generate_requests) == 1
        assert await balance(server, account) == pytest.approx(CREDITS - task["credits_used"])


async def test_unary_answer_gzip_encoded_as_recorded(tmp_path: Path) -> None:
    """The recorded unary answers came with Content-Encoding: gzip (generate/g17's headers): read the same."""
    recording = by_name("g17")
    [expected] = expectations(recording)
    exchange = recording.exchange
    assert json.loads(recording.path.read_text())["interactions"][0]["response"]["headers"][
        "Content-Encoding"
    ] == ("gzip")
    compressed = Replay(
        200, gzip.compress(exchange.body), exchange.content_type, {"content-encoding": "gzip"}
    )
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=CREDITS)
        fake.replay(compressed)
        async with server.client(account) as client:
            response = await client.post(CREATE, json=body_for("gemini-2.5-flash", sync=True))
        task = response.json()
        check_generation(task, expected, exchange)
        assert "gzip" in fake.last.headers.get("accept-encoding", "")


async def test_parallel_calls_round_trip_with_the_signature_on_the_first_only(tmp_path: Path) -> None:
    """generate/g08: two calls, only the first signed; the follow-up sends the history back as received."""
    recording = by_name("g08")
    first_answer, second_answer = recording.exchanges
    first_expected, second_expected = expectations(recording)
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=CREDITS)
        first = await run_generate(server, fake, account, first_answer, sync=True)
        check_generation(first, first_expected, first_answer)
        printed, beeped = first["response_function_calls"]
        assert "thought_signature" in printed and "thought_signature" not in beeped
        history = [
            {"role": "user", "content": "Tell me."},
            {"role": "model", "function_call": printed},
            {"role": "model", "function_call": beeped},
            {"role": "user", "function_response": {"name": "print", "response": {"ok": True}}},
            {"role": "user", "function_response": {"name": "beep", "response": {"ok": True}}},
        ]
        second = await run_generate(server, fake, account, second_answer, sync=True, messages=history)
        check_generation(second, second_expected, second_answer)
        sent = fake.last.raw["contents"]
        recorded_parts = first_answer.json()["candidates"][0]["content"]["parts"]
        assert sent[1]["parts"] == [recorded_parts[0]]  # the signature goes back, unchanged
        assert sent[2]["parts"] == [recorded_parts[1]]


async def test_function_call_stream_of_two_requests(tmp_path: Path) -> None:
    """stream/s17 holds two streamed exchanges; each request gets its own, in order."""
    recording = by_name("s17")
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url) as server:
        account = await server.account(credits=CREDITS)
        fake.replay(*(replay_of(exchange) for exchange in recording.exchanges))
        numerators = []
        for _ in recording.exchanges:
            _, events, _ = await stream(server, account, body_for("gemini-2.5-flash"))
            task = await server.wait_for(account, events[-1][1]["creatify"]["id"])
            [call] = task["response_function_calls"]
            numerators.append(call["args"]["numerator"])
        assert numerators == [100, 50]


# -- errors ------------------------------------------------------------------------------------------------

FAST = {"gemini_max_attempts": 3, "gemini_retry_budget_seconds": 10.0}


def error_params() -> list[Any]:
    return [pytest.param(path, id=path.name) for path in paths("errors")]


@pytest.mark.parametrize("path", error_params())
async def test_error_recording_fails_the_sync_task(tmp_path: Path, path: Path) -> None:
    recording = load(path)
    [expected] = expectations(recording)
    exchange = recording.exchange
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url, **FAST) as server:
        account = await server.account(credits=CREDITS)
        for _ in range(2):
            fake.replay(replay_of(exchange))  # the same answer to every attempt
        task = await run_generate(server, fake, account, by_name("g01").exchange, sync=True)
        attempts = len(fake.generate_requests)
        if not expected.retryable:
            assert attempts == 1
            check_generation(task, expected, exchange)
        elif expected.retry_after is not None and expected.retry_after > 10:
            # RetryInfo asks for longer than the retry budget: given up at once, saying why.
            assert attempts == 1
            check_generation(task, expected, exchange)
            assert task["failed_reason"].endswith(
                "(gave up after 1 attempts: the next try would pass the 10 s retry budget)"
            )
        else:
            # Retried: the third attempt got the recorded answer of generate/g01.
            assert attempts == 3
            assert task["status"] == "done", task
        assert await balance(server, account) == pytest.approx(CREDITS - task["credits_used"])


@pytest.mark.parametrize(
    ("name", "status", "retry_after"),
    [
        ("e01", 502, None),  # a wrong key: this service's fault
        ("e03", 400, None),
        ("e05", 502, None),
        ("e07", 502, None),
        ("e09", 502, None),
        ("e10", 429, "26"),
        ("e14", 429, "35"),  # RetryInfo 34.4s, rounded up
        ("e16", 503, "1"),  # retried to the last attempt, then no delay to tell
        ("e19", 400, None),
    ],
)
async def test_error_recording_refuses_the_stream_with_a_status(
    tmp_path: Path, name: str, status: int, retry_after: str | None
) -> None:
    recording = by_name(name)
    [expected] = expectations(recording)
    # Served as Gemini serves an error on a streaming request: the same JSON, typed text/event-stream.
    exchange = recording.exchange
    replay = Replay(exchange.status, exchange.body, "text/event-stream")
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url, **FAST) as server:
        account = await server.account(credits=CREDITS)
        for _ in range(3):
            fake.replay(replay)
        code, _, response = await stream(server, account, body_for("gemini-2.5-flash"))
        assert code == status == expected.status
        assert response.json()["error"].startswith(expected.error)
        assert response.headers.get("retry-after") == retry_after
        assert await balance(server, account) == CREDITS


@pytest.mark.parametrize(
    ("delay", "attempts", "retry_after"),
    [
        ("0.5s", 2, None),  # waited half a second, then the next answer
        ("1.5s", 1, "2"),  # past the 1.2 s budget: not 1 s, which would fit
        ("37.123456s", 1, "38"),
    ],
)
async def test_fractional_retry_delay_decides_the_retry(
    tmp_path: Path, delay: str, attempts: int, retry_after: str | None
) -> None:
    recording = by_name("e11")
    body = recording.exchange.json()
    [retry] = [d for d in body["error"]["details"] if d["@type"].endswith("RetryInfo")]
    retry["retryDelay"] = delay
    replay = Replay(429, json.dumps(body, indent=2).encode() + b"\n", "text/event-stream")
    async with (
        fake_gemini() as (fake, url),
        gemini_service(tmp_path, url, gemini_max_attempts=3, gemini_retry_budget_seconds=1.2) as server,
    ):
        account = await server.account(credits=CREDITS)
        fake.replay(replay)
        code, events, response = await stream(server, account, body_for("gemini-2.5-flash"))
        assert len(fake.generate_requests) == attempts
        if attempts == 2:
            assert code == 200 and events[-1][0] == "message"
        else:
            assert code == 429
            assert response.headers["retry-after"] == retry_after
            assert response.json()["error"].endswith("the next try would pass the 1.2 s retry budget)")


async def test_recorded_500_then_a_recorded_answer(tmp_path: Path) -> None:
    """errors/e15 is retried; the next attempt's recorded answer (generate/g01) is the task's."""
    async with fake_gemini() as (fake, url), gemini_service(tmp_path, url, **FAST) as server:
        account = await server.account(credits=CREDITS)
        fake.replay(replay_of(by_name("e15").exchange))
        task = await run_generate(server, fake, account, by_name("g01").exchange, sync=True)
        assert len(fake.generate_requests) == 2
        [expected] = expectations(by_name("g01"))
        check_generation(task, expected, by_name("g01").exchange)
