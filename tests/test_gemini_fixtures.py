"""What textgen reads from every recorded Gemini answer in ``shared/reference/gemini-fixtures``.

Every file of ``generate/``, ``stream/`` and ``errors/`` goes through the reader of ``providers/gemini_wire.py``
(and the failure classification of ``gemini_retry``) as the provider uses them. Two kinds of checks:

- by rule, for every file (a new recording is read without being listed): the text is the non-thought text parts,
  the usage is the chunk's own ``usageMetadata``, a stream reads the same whatever the bytes' split, an error gives
  its code, status, message and ``RetryInfo`` delay;
- by value, from ``EXPECTED``: what textgen makes of each recording, written out (a recording without an entry
  fails ``test_every_recording_has_an_expected_outcome``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fakes.recordings import KINDS, Exchange, Recording, load, paths, recordings
from textgen.errors import UpstreamError
from textgen.providers import gemini_wire as wire
from textgen.providers.base import FunctionCall, Generation, StreamChunk
from textgen.providers.gemini_retry import classify, client_status, parse_duration, to_error


@dataclass(frozen=True)
class Call:
    name: str
    args: dict[str, Any]
    signature: str | None = None  # the start of the recorded thoughtSignature


@dataclass(frozen=True)
class Expected:
    """What textgen makes of one recorded answer (of a stream: of all its chunks)."""

    text: str = ""  # the answer's start, thought parts excluded
    length: int | None = None  # its whole length (None: ``text`` is all of it)
    thoughts: int = 0  # thought parts in the recording, kept out of the text
    calls: tuple[Call, ...] = ()
    input_tokens: int = 0  # promptTokenCount of the (last) usageMetadata
    output_tokens: int = 0  # candidatesTokenCount + thoughtsTokenCount of it
    finish: str | None = "STOP"
    chunks: int | None = None  # streams: the chunks read before the end (or the error)
    error: str | None = None  # the start of the failure's message
    status: int | None = None  # the HTTP status a client refused before any chunk would see
    retryable: bool = False
    retry_after: float | None = None


def failed(error: str, status: int, *, chunks: int | None = None, **fields: Any) -> Expected:
    return Expected(error=error, status=status, chunks=chunks, finish=None, **fields)


def stopped(reason: str, explained: str) -> str:
    return f"Gemini stopped the response with finish reason {reason}: {explained}"


GENERATE: dict[str, Expected | tuple[Expected, ...]] = {
    "g01": Expected(
        "Google's headquarters, also known as the Googleplex, is located in **Mountain View, California**.\n",
        input_tokens=7,
        output_tokens=22,
    ),
    # Gemini 3 signs a text answer on its text part: not a function call, so nothing to send back.
    "g02": Expected(
        "There are **3** r's in strawberry.\n\nHere is the breakdown: st**r**awbe**rr**y.",
        input_tokens=9,
        output_tokens=28 + 244,
    ),
    "g03": Expected('There are **3** "r"s in strawberry.', length=79, input_tokens=9, output_tokens=29 + 282),
    "g04": Expected("Mountain View", thoughts=1, input_tokens=14, output_tokens=2 + 24),
    # Only a thought part before MAX_TOKENS, and no candidatesTokenCount at all.
    "g05": Expected("", thoughts=1, input_tokens=17, output_tokens=19, finish="MAX_TOKENS"),
    "g06": Expected(
        calls=(Call("weather", {"location": "San Francisco"}, "EskgCsYgAb4+9vtF"),),
        input_tokens=29,
        output_tokens=15 + 893,
    ),
    "g07": Expected(
        thoughts=1, calls=(Call("now", {}, "CtQOAVSoXO74PmYr"),), input_tokens=38, output_tokens=8 + 501
    ),
    # Two parallel calls: the signature is on the first only.
    "g08": (
        Expected(
            calls=(
                Call("print", {"color": "blue", "text": "hello"}, "CtQEAdHtim++AM2q"),
                Call("beep", {}),
            ),
            input_tokens=85,
            output_tokens=26 + 155,
        ),
        Expected("ok, done\n", input_tokens=171, output_tokens=3),
    ),
    "g09": Expected(
        calls=(
            Call("print", {"color": "blue", "text": "hello"}),
            Call("beep", {}),
            Call("controlLight", {"brightness": 50, "colorTemperature": "warm"}),
        ),
        input_tokens=96,
        output_tokens=13,
    ),
    "g10": failed(stopped("SAFETY", "the response was flagged by Gemini's safety filters"), 400),
    "g11": failed(stopped("RECITATION", "the response too closely resembled existing material"), 400),
    # OTHER without content, but with Gemini's own explanation: it is the reason given.
    "g12": failed(
        "Gemini stopped the response with finish reason OTHER: Model failed to generate content due to internal "
        "error.",
        502,
    ),
    "g13": failed(
        stopped("MALFORMED_FUNCTION_CALL", "the model produced a function call that does not parse"), 502
    ),
    "g14": failed("Gemini blocked the prompt (SAFETY)", 400),
    # No candidates and a promptFeedback without blockReason: still a refusal of the prompt, with its message.
    "g15": failed("Gemini blocked the prompt: Message", 400),
    "g16": failed("Gemini blocked the prompt (SAFETY)", 400),
    # Structured output arrives as a JSON string in the text part.
    "g17": Expected(
        '{"simpleString":"Hello","stringDatatime":', length=552, input_tokens=5, output_tokens=177 + 331
    ),
    "g18": Expected(
        "The sky is blue because of something called **Rayleigh Scattering**.",
        length=618,
        input_tokens=7,
        output_tokens=149 + 48,
        finish="MAX_TOKENS",
    ),
    # Cached tokens are counted inside promptTokenCount.
    "g19": Expected(
        "This is a transcript of the air-to-ground voice transmission",
        length=1941,
        input_tokens=323388,
        output_tokens=397,
    ),
    "g20": Expected(
        "Red Riding Hood is looking for **directions** in the forest.",
        input_tokens=12013,
        output_tokens=15 + 73,
    ),
    "g21": Expected(
        "This clip is an audio recording of President Kennedy", length=199, input_tokens=754, output_tokens=49
    ),
    # 2024: no usageMetadata at all.
    "g22": Expected(calls=(Call("find_theaters", {"movie": "Barbie", "location": "Mountain View, CA"}),)),
}

STREAM: dict[str, Expected | tuple[Expected, ...]] = {
    "s01": Expected("The capital of Wyoming is **Cheyenne**.\n", input_tokens=7, output_tokens=10, chunks=3),
    "s02": Expected(
        "Okay, let's dive into the world of cats and dogs!",
        length=8845,
        input_tokens=10,
        output_tokens=1996,
        chunks=36,
    ),
    "s03": Expected(
        "The sky is blue because tiny gas molecules",
        length=263,
        thoughts=3,
        input_tokens=10,
        output_tokens=48 + 540,
        chunks=5,
    ),
    "s04": Expected(
        thoughts=2,
        calls=(Call("now", {}, "CiIBVKhc7vB+vaaq"),),
        input_tokens=38,
        output_tokens=6 + 168,
        chunks=3,
    ),
    "s05": failed("Gemini blocked the prompt (SAFETY)", 400, chunks=0),
    # The last chunk has no content, only RECITATION: the eight texts before it were read.
    "s06": failed(
        stopped("RECITATION", "the response too closely resembled existing material"),
        400,
        chunks=8,
        text="text1text2text3text4text5text6text7text8",
        input_tokens=9,
    ),
    # One chunk has content without parts; the last has an image (not text).
    "s07": Expected(
        "Here's a cute cartoon kitten playing with a ball of yarn for you! ",
        input_tokens=16,
        output_tokens=1307,
        chunks=7,
    ),
    "s08": Expected("Hello world!", chunks=2),
    # Gemini 3 ends a text stream with an empty text part that carries only the signature.
    "s09": Expected(
        'There are **3** "r"s in strawberry.\n\nst**r**awbe**rr**y',
        input_tokens=9,
        output_tokens=23 + 185,
        chunks=3,
    ),
    "s10": Expected(
        'There are **3** "r"s in strawberry.', length=79, input_tokens=9, output_tokens=29 + 256, chunks=3
    ),
    # Gemini 3 sends the call unfinished, then an empty text part with STOP.
    "s11": Expected(
        calls=(Call("weather", {"location": "San Francisco"}, "EqUCCqICAb4+9vsh"),),
        input_tokens=29,
        output_tokens=15 + 45,
        chunks=2,
    ),
    # The last chunk counts 6 prompt tokens where the others said 7: the last is the one that counts.
    "s12": Expected(
        "The sky is blue due to a phenomenon called **Rayleigh scattering**.",
        length=1879,
        input_tokens=6,
        output_tokens=377,
        chunks=11,
    ),
    "s13": Expected(
        "The sky is blue primarily due to a phenomenon called **Rayleigh Scattering**.",
        length=653,
        input_tokens=7,
        output_tokens=153 + 45,
        finish="MAX_TOKENS",
        chunks=3,
    ),
    # HTTP 404 with an event-stream type over a plain JSON body.
    "s14": failed(
        "Gemini answered 404 NOT_FOUND: models/custom-gemini-2.0-flash is not found for API version v1beta",
        502,
        chunks=0,
    ),
    # After HTTP 200 and two events, a raw pretty-printed JSON error.
    "s15": failed(
        "Gemini answered 503 UNAVAILABLE: The model is overloaded. Please try again later.",
        503,
        chunks=2,
        text="Okay",
        input_tokens=2301,
        output_tokens=1,
        retryable=True,
    ),
    "s16": failed(
        "Gemini answered 499 CANCELLED: The operation was cancelled.", 502, chunks=2, text="First Second "
    ),
    "s17": (
        Expected(
            calls=(Call("customDivide", {"denominator": 2, "numerator": 100}),),
            input_tokens=21,
            output_tokens=6,
            chunks=1,
        ),
        Expected(
            calls=(Call("customDivide", {"denominator": 2, "numerator": 50}),),
            input_tokens=38,
            output_tokens=6,
            chunks=1,
        ),
    ),
}


def answered(code: int, status: str, message: str, client: int, retry_after: float | None = None) -> Expected:
    retryable = code in (429, 500, 503, 504)
    return failed(
        f"Gemini answered {code} {status}: {message}", client, retryable=retryable, retry_after=retry_after
    )


QUOTA = "You exceeded your current quota, please check your plan"
ERRORS: dict[str, Expected | tuple[Expected, ...]] = {
    # A wrong or expired key is this service's fault, not the client's: not a 400 for the client.
    "e01": answered(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", 502),
    "e02": answered(400, "INVALID_ARGUMENT", "API key expired. Please renew the API key.", 502),
    "e03": answered(
        400, "INVALID_ARGUMENT", 'Invalid JSON payload received. Unknown name "includeThoughts"', 400
    ),
    "e04": answered(400, "INVALID_ARGUMENT", "Request contains an invalid argument.", 400),
    # Where this service runs, not what the client asked.
    "e05": answered(400, "FAILED_PRECONDITION", "User location is not supported for the API use.", 502),
    "e06": answered(400, "INVALID_ARGUMENT", "The thinking budget (52428) is invalid.", 400),
    "e07": answered(403, "PERMISSION_DENIED", "Generative Language API has not been used in project", 502),
    "e08": answered(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers", 502),
    "e08b": answered(403, "PERMISSION_DENIED", "Your API key was reported as leaked.", 502),
    "e08c": answered(403, "PERMISSION_DENIED", "Requests from referer <empty> are blocked.", 502),
    "e09": answered(404, "NOT_FOUND", "models/gemini-5.0-flash is not found for API version v1", 502),
    "e10": answered(429, "RESOURCE_EXHAUSTED", QUOTA, 429, retry_after=26.0),
    # RetryInfo says 29s; the message's "Please retry in 29.083414095s." is prose.
    "e11": answered(429, "RESOURCE_EXHAUSTED", QUOTA, 429, retry_after=29.0),
    "e11b": answered(429, "RESOURCE_EXHAUSTED", QUOTA, 429, retry_after=41.0),
    "e12": answered(429, "RESOURCE_EXHAUSTED", QUOTA, 429),
    "e13": answered(429, "RESOURCE_EXHAUSTED", "Quota exceeded for quota metric", 429),
    "e14": answered(429, "RESOURCE_EXHAUSTED", QUOTA, 429, retry_after=34.4),
    "e15": answered(500, "INTERNAL", "An internal error has occurred.", 502),
    "e16": answered(503, "UNAVAILABLE", "The model is overloaded. Please try again later.", 503),
    "e17": answered(503, "UNAVAILABLE", "This model is currently experiencing high demand.", 503),
    "e18": answered(
        400, "INVALID_ARGUMENT", "The GenerateContentRequest proto is invalid:\n  * tools[0]", 400
    ),
    "e19": answered(400, "INVALID_ARGUMENT", "Function call is missing a thought_signature", 400),
}
EXPECTED = {"generate": GENERATE, "stream": STREAM, "errors": ERRORS}


def expectations(recording: Recording) -> tuple[Expected, ...]:
    found = EXPECTED[recording.kind].get(recording.name)
    if found is None:
        pytest.fail(f"{recording.path.name}: add what textgen makes of it to EXPECTED")
    listed = found if isinstance(found, tuple) else (found,)
    assert len(listed) == len(recording.exchanges), "one expectation per recorded answer"
    return listed


def params(*kinds: str) -> list[Any]:
    return [
        pytest.param(path, id=f"{path.parent.name}/{path.name}") for kind in kinds for path in paths(kind)
    ]


# -- what the provider does with the bytes -------------------------------------------------------------


@dataclass
class Read:
    """What textgen read from one recorded answer: chunks (a unary answer reads as one), then maybe an error."""

    chunks: list[StreamChunk]
    generation: Generation | None = None
    error: UpstreamError | None = None
    api_error: wire.GeminiAPIError | None = None  # the upstream error, before classification


def client_error(exc: Exception) -> tuple[UpstreamError, wire.GeminiAPIError | None]:
    """The exception the provider raises for ``exc`` (as ``gemini.py`` converts it)."""
    if isinstance(exc, UpstreamError):
        return exc, None
    failure = classify(exc)
    assert failure is not None, f"{exc!r} is not classified as an upstream failure"
    assert isinstance(exc, wire.GeminiAPIError)
    return to_error(failure), exc


def read_unary(exchange: Exchange) -> Read:
    try:
        if exchange.status != 200:
            raise wire.api_error(exchange.status, exchange.body)
        response = wire.decode_response(exchange.body)
        generation = wire.to_generation(response)
    except Exception as exc:
        error, api = client_error(exc)
        return Read([], error=error, api_error=api)
    return Read([], generation=generation)


def read_stream(exchange: Exchange, pieces: list[bytes] | None = None) -> Read:
    """The chunks of a stream as the provider yields them, from the body cut into ``pieces``."""
    read = Read([])
    try:
        if exchange.status != 200:
            raise wire.api_error(exchange.status, exchange.body)
        parser = wire.SSEParser()
        for piece in pieces if pieces is not None else [exchange.body]:
            read.chunks.extend(wire.to_chunk(event) for event in parser.feed(piece))
        read.chunks.extend(wire.to_chunk(event) for event in parser.close())
        parser.raise_deferred()
    except Exception as exc:
        read.error, read.api_error = client_error(exc)
    return read


def splits(body: bytes) -> dict[str, list[bytes]]:
    """The body cut as a network might deliver it, including between the CR and the LF of a line end."""
    return {
        "whole": [body],
        "bytes": [body[i : i + 1] for i in range(len(body))],
        "lines": body.splitlines(keepends=True),
        "after-cr": [piece + b"\r" for piece in body.split(b"\r")[:-1]] + [body.split(b"\r")[-1]],
        "odd": [body[i : i + 7] for i in range(0, len(body), 7)],
    }


# -- reading a recording by rule ---------------------------------------------------------------------


def candidate_of(response: dict[str, Any]) -> dict[str, Any]:
    candidates = response.get("candidates") or [{}]
    first: dict[str, Any] = candidates[0]
    return first


def parts_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = (candidate_of(response).get("content") or {}).get("parts") or []
    return parts


def text_of(response: dict[str, Any]) -> str:
    return "".join(p["text"] for p in parts_of(response) if "text" in p and not p.get("thought"))


def calls_of(response: dict[str, Any]) -> list[FunctionCall]:
    return [
        FunctionCall(
            p["functionCall"]["name"], p["functionCall"].get("args", {}), None, p.get("thoughtSignature")
        )
        for p in parts_of(response)
        if "functionCall" in p
    ]


def usage_of(response: dict[str, Any]) -> tuple[int, int]:
    usage = response.get("usageMetadata") or {}
    return (
        usage.get("promptTokenCount", 0),
        usage.get("candidatesTokenCount", 0) + usage.get("thoughtsTokenCount", 0),
    )


def thoughts_of(responses: list[dict[str, Any]]) -> int:
    return sum(1 for response in responses for part in parts_of(response) if part.get("thought"))


# -- every recording has an expected outcome --------------------------------------------------------------


@pytest.mark.parametrize("path", params(*KINDS))
def test_every_recording_has_an_expected_outcome(path: Any) -> None:
    recording = load(path)
    assert expectations(recording)
    assert all(exchange.body for exchange in recording.exchanges)


def test_the_fixtures_are_all_there() -> None:
    """The counts of the fixtures' index: a recording that goes missing is noticed."""
    assert [len(paths(kind)) for kind in KINDS] == [22, 17, 22]
    assert sum(len(r.exchanges) for kind in KINDS for r in recordings(kind)) == 22 + 17 + 22 + 2


# -- generateContent ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", params("generate"))
def test_generate_recording_reads_as_expected(path: Any) -> None:
    recording = load(path)
    for exchange, expected in zip(recording.exchanges, expectations(recording), strict=True):
        read = read_unary(exchange)
        response = exchange.json()
        if expected.error is not None:
            assert read.error is not None, read.generation
            assert read.error.message.startswith(expected.error), read.error.message
            assert read.error.status_code == expected.status
            assert not read.error.retryable
            continue
        assert read.error is None, read.error.message
        generation = read.generation
        assert generation is not None
        # by value
        assert generation.text.startswith(expected.text)
        assert len(generation.text) == (
            expected.length if expected.length is not None else len(expected.text)
        )
        assert thoughts_of([response]) == expected.thoughts
        assert [(c.name, c.args) for c in generation.function_calls] == [
            (c.name, c.args) for c in expected.calls
        ]
        for call, wanted in zip(generation.function_calls, expected.calls, strict=True):
            if wanted.signature is None:
                assert call.thought_signature is None
            else:
                assert call.thought_signature is not None and call.thought_signature.startswith(
                    wanted.signature
                )
        assert (generation.input_tokens, generation.output_tokens) == (
            expected.input_tokens,
            expected.output_tokens,
        )
        assert generation.finish_reason == expected.finish
        # by rule
        assert generation.text == text_of(response)
        assert generation.function_calls == calls_of(response)
        assert (generation.input_tokens, generation.output_tokens) == usage_of(response)
        assert generation.finish_reason == candidate_of(response)["finishReason"]
        assert generation.model_version == response.get("modelVersion", "")


def test_structured_output_is_the_json_string_of_the_text_part() -> None:
    [recording] = [r for r in recordings("generate") if r.name == "g17"]
    generation = read_unary(recording.exchange).generation
    assert generation is not None
    answer = json.loads(generation.text)
    assert answer["simpleString"] == "Hello"
    assert answer["integerInt64"] == 123456789012345
    assert answer["inner"] == {"innerString": "required inner string", "innerNumber": 100}


def test_thought_parts_are_read_but_left_out_of_the_text() -> None:
    [recording] = [r for r in recordings("generate") if r.name == "g04"]
    [thought, answer] = parts_of(recording.exchange.json())
    assert thought["thought"] is True and thought["text"].startswith(
        "**Thinking About Google's Headquarters**"
    )
    generation = read_unary(recording.exchange).generation
    assert generation is not None
    assert generation.text == answer["text"] == "Mountain View"
    assert "Thinking" not in generation.text


# -- streamGenerateContent?alt=sse ------------------------------------------------------------------------


@pytest.mark.parametrize("path", params("stream"))
def test_stream_recording_reads_the_same_however_the_bytes_arrive(path: Any) -> None:
    for exchange in load(path).exchanges:
        whole = read_stream(exchange)
        for name, pieces in splits(exchange.body).items():
            assert b"".join(pieces) == exchange.body
            read = read_stream(exchange, pieces)
            assert [c.raw for c in read.chunks] == [c.raw for c in whole.chunks], name
            assert (read.error.message if read.error else None) == (
                whole.error.message if whole.error else None
            )


@pytest.mark.parametrize("path", params("stream"))
def test_stream_recording_reads_as_expected(path: Any) -> None:
    recording = load(path)
    for exchange, expected in zip(recording.exchanges, expectations(recording), strict=True):
        read = read_stream(exchange)
        chunks = read.chunks
        events = exchange.events() if exchange.status == 200 else []
        assert len(chunks) == expected.chunks
        # by value: the whole answer
        text = "".join(c.text for c in chunks)
        assert text.startswith(expected.text)
        assert len(text) == (expected.length if expected.length is not None else len(expected.text))
        assert thoughts_of(events) == expected.thoughts
        calls = [call for chunk in chunks for call in chunk.function_calls]
        assert [(c.name, c.args) for c in calls] == [(c.name, c.args) for c in expected.calls]
        for call, wanted in zip(calls, expected.calls, strict=True):
            if wanted.signature is None:
                assert call.thought_signature is None
            else:
                assert call.thought_signature is not None and call.thought_signature.startswith(
                    wanted.signature
                )
        last = chunks[-1] if chunks else StreamChunk()
        assert (last.input_tokens, last.output_tokens) == (expected.input_tokens, expected.output_tokens)
        if expected.error is None:
            assert read.error is None, read.error.message
            assert last.finish_reason == expected.finish
            assert all(c.finish_reason is None for c in chunks[:-1])
        else:
            assert read.error is not None
            assert read.error.message.startswith(expected.error), read.error.message
            assert read.error.status_code == expected.status
            assert read.error.retryable == expected.retryable
        # by rule: each chunk is its event, usage included (every chunk carries the running counts)
        for chunk, event in zip(chunks, events, strict=False):
            assert chunk.text == text_of(event)
            assert chunk.function_calls == calls_of(event)
            assert (chunk.input_tokens, chunk.output_tokens) == usage_of(event)
            assert chunk.finish_reason == candidate_of(event).get("finishReason")
            assert chunk.raw == {key: event[key] for key in wire.RAW_FIELDS if key in event}


def test_crlf_framing_is_what_gemini_sends() -> None:
    [recording] = [r for r in recordings("stream") if r.name == "s01"]
    body = recording.exchange.body
    assert body.count(b"\r\n\r\n") == 3 and body.replace(b"\r\n", b"").count(b"\n") == 0
    chunks = read_stream(recording.exchange).chunks
    assert [c.text for c in chunks] == ["The", " capital of Wyoming", " is **Cheyenne**.\n"]


def test_usage_in_every_chunk_is_the_running_total_not_a_part() -> None:
    [recording] = [r for r in recordings("stream") if r.name == "s03"]
    chunks = read_stream(recording.exchange).chunks
    # Thinking first (its count grows), then the answer's own count grows.
    assert [c.output_tokens for c in chunks] == [70, 318, 540, 22 + 540, 48 + 540]
    assert [c.input_tokens for c in chunks] == [10] * 5
    assert sum(c.output_tokens for c in chunks) != chunks[-1].output_tokens


def test_last_chunk_with_only_a_thought_signature_adds_nothing() -> None:
    [recording] = [r for r in recordings("stream") if r.name == "s09"]
    chunks = read_stream(recording.exchange).chunks
    last = chunks[-1]
    assert last.raw is not None
    [part] = last.raw["candidates"][0]["content"]["parts"]
    assert part["text"] == "" and part["thoughtSignature"].startswith("EqsFCqgFAb4+9vvt")
    assert (last.text, last.function_calls, last.finish_reason) == ("", [], "STOP")
    assert (last.input_tokens, last.output_tokens) == (chunks[-2].input_tokens, chunks[-2].output_tokens)


def test_candidate_without_content_and_content_without_parts() -> None:
    [s07] = [r for r in recordings("stream") if r.name == "s07"]
    chunks = read_stream(s07.exchange).chunks
    no_parts = chunks[5]
    assert no_parts.raw is not None and no_parts.raw["candidates"][0]["content"] == {"role": "model"}
    assert (no_parts.text, no_parts.function_calls, no_parts.finish_reason) == ("", [], None)
    assert no_parts.output_tokens == 17
    [s06] = [r for r in recordings("stream") if r.name == "s06"]
    assert "content" not in s06.exchange.events()[-1]["candidates"][0]


def test_error_after_http_200_is_a_raw_json_tail_raised_after_the_events() -> None:
    [recording] = [r for r in recordings("stream") if r.name == "s15"]
    exchange = recording.exchange
    assert exchange.status == 200 and exchange.tail() == {
        "error": {
            "code": 503,
            "message": "The model is overloaded. Please try again later.",
            "status": "UNAVAILABLE",
        }
    }
    parser = wire.SSEParser()
    events = parser.feed(exchange.body)
    assert [text_of(e) for e in events] == ["Okay", ""]  # the events before it come out first
    with pytest.raises(wire.GeminiAPIError) as caught:  # at the end of the body
        parser.close()
    assert (caught.value.code, caught.value.status) == (503, "UNAVAILABLE")


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", params("errors"))
def test_error_recording_reads_as_expected(path: Any) -> None:
    recording = load(path)
    [expected] = expectations(recording)
    exchange = recording.exchange
    error = exchange.json()["error"]
    for read in (read_unary(exchange), read_stream(exchange)):  # a streaming request keeps the status
        assert read.api_error is not None and read.error is not None
        # by rule
        assert read.api_error.code == exchange.status == error["code"]
        assert read.api_error.status == error["status"]
        assert read.api_error.message == error["message"]
        assert read.api_error.details == error.get("details", [])
        # by value
        assert read.error.message.startswith(expected.error or ""), read.error.message
        assert read.error.status_code == expected.status
        assert read.error.retryable == expected.retryable
        assert read.error.retry_after == expected.retry_after


def with_retry_delay(name: str, delay: Any) -> Exchange:
    [recording] = [r for r in recordings("errors") if r.name == name]
    body = recording.exchange.json()
    for detail in body["error"]["details"]:
        if detail["@type"].endswith("RetryInfo"):
            detail["retryDelay"] = delay
    return Exchange(429, recording.exchange.content_type, json.dumps(body).encode())


@pytest.mark.parametrize("name", ["e10", "e11", "e14"])
@pytest.mark.parametrize(
    ("delay", "seconds"),
    [
        ("1.5s", 1.5),
        ("37.123456s", 37.123456),
        ("38.601s", 38.601),
        ("29.083414095s", 29.083414095),
        ("0.5s", 0.5),
        ("0s", 0.0),
        ("22s", 22.0),
    ],
)
def test_fractional_retry_delay_is_read_in_any_details_order(name: str, delay: str, seconds: float) -> None:
    read = read_unary(with_retry_delay(name, delay))
    assert read.error is not None
    assert read.error.retry_after == pytest.approx(seconds, abs=1e-9)
    assert read.error.status_code == 429 and read.error.retryable
    assert parse_duration(delay) == pytest.approx(seconds, abs=1e-9)


@pytest.mark.parametrize("delay", ["soon", "1.5", "", "-2s", "1.5 s", "s", 5, None, {"seconds": 3}])
def test_unreadable_retry_delay_falls_back_to_the_retry_after_header(delay: Any) -> None:
    exchange = with_retry_delay("e10", delay)
    error = wire.api_error(429, exchange.body, retry_after_header="7")
    failure = classify(error)
    assert failure is not None and failure.retry_after == 7.0
    assert classify(wire.api_error(429, exchange.body)).retry_after is None  # type: ignore[union-attr]


def test_retry_info_wins_over_the_retry_after_header() -> None:
    [recording] = [r for r in recordings("errors") if r.name == "e10"]
    failure = classify(wire.api_error(429, recording.exchange.body, retry_after_header="60"))
    assert failure is not None and failure.retry_after == 26.0
    assert client_status(failure) == 429


def test_a_wrong_key_is_told_apart_from_a_bad_request() -> None:
    """Both are 400 INVALID_ARGUMENT; ErrorInfo.reason API_KEY_INVALID says it is the key (errors/e01)."""
    [e01] = [r for r in recordings("errors") if r.name == "e01"]
    [e04] = [r for r in recordings("errors") if r.name == "e04"]
    key, request = read_unary(e01.exchange), read_unary(e04.exchange)
    assert key.api_error is not None and request.api_error is not None
    assert (key.api_error.code, key.api_error.status) == (request.api_error.code, request.api_error.status)
    assert key.error is not None and request.error is not None
    assert (key.error.status_code, request.error.status_code) == (502, 400)


def test_an_answer_without_candidates_or_feedback_fails_rather_than_succeeding_empty() -> None:
    [recording] = [r for r in recordings("generate") if r.name == "g13"]
    body = recording.exchange.json()
    del body["candidates"]  # usage only: nothing was generated, and nothing says why
    read = read_unary(Exchange(200, recording.exchange.content_type, json.dumps(body).encode()))
    assert read.error is not None
    assert read.error.message == "Gemini answered without a candidate (no text, no function call)"
    assert read.error.status_code == 502
    # In a stream such a chunk is only empty: the stream's other chunks carry the answer.
    chunk = wire.to_chunk(body)
    assert (chunk.text, chunk.function_calls, chunk.finish_reason, chunk.input_tokens) == ("", [], None, 2595)


def test_a_block_reason_with_its_message() -> None:
    [recording] = [r for r in recordings("generate") if r.name == "g14"]
    body = recording.exchange.json()
    body["promptFeedback"]["blockReasonMessage"] = "The prompt was blocked."
    read = read_unary(Exchange(200, recording.exchange.content_type, json.dumps(body).encode()))
    assert read.error is not None and read.error.status_code == 400
    assert read.error.message == "Gemini blocked the prompt (SAFETY): The prompt was blocked."
