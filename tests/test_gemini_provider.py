"""The Gemini provider on its own: streaming, retry decisions, error mapping and token bounds."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.genai import errors as genai_errors

from tests.fakes.fake_gemini import Fault
from tests.test_gemini import PNG_1X1, b64, fake_gemini, gemini_settings, mp4
from textgen.catalog import ModelSpec, load_catalog
from textgen.errors import BadRequest, UpstreamError
from textgen.protocol import GenerationInput
from textgen.providers import ProviderRegistry, gemini
from textgen.providers import gemini_mapping as mapping
from textgen.providers.base import StreamChunk
from textgen.providers.gemini import GeminiProvider
from textgen.providers.gemini_retry import (
    RetryPolicy,
    UpstreamFailure,
    classify,
    client_status,
    decide,
    parse_duration,
)

SPEC: ModelSpec = load_catalog()["gemini-2.5-flash"]


def request(**fields: Any) -> GenerationInput:
    body = {"model_name": SPEC.name, "messages": [{"role": "user", "content": "Write a tagline."}], **fields}
    return GenerationInput.model_validate_json(json.dumps(body))


async def collect(provider: GeminiProvider, req: GenerationInput) -> list[StreamChunk]:
    return [chunk async for chunk in provider.stream(SPEC, req, account="a")]


# -- stream() ---------------------------------------------------------------------------------------------


async def test_stream_yields_gemini_native_chunks_with_cumulative_counts(tmp_path: Path) -> None:
    async with fake_gemini() as (fake, url):
        fake.thoughts_tokens = 4
        provider = GeminiProvider(gemini_settings(tmp_path, url))
        try:
            chunks = await collect(provider, request(config={"temperature": 0.2}))
        finally:
            await provider.aclose()
    assert fake.last.stream
    assert fake.last.body["generationConfig"] == {"temperature": 0.2, "maxOutputTokens": 8192}
    words = fake.reply_text.split(" ")
    assert len(chunks) == len(words)
    assert "".join(c.text for c in chunks) == fake.reply_text
    assert [c.output_tokens for c in chunks] == [i + 1 + 4 for i in range(len(words))]
    assert all(c.input_tokens == chunks[0].input_tokens > 0 for c in chunks)
    assert [c.finish_reason for c in chunks] == [None] * (len(words) - 1) + ["STOP"]
    first, last = chunks[0].raw, chunks[-1].raw
    assert first is not None and last is not None
    assert first["candidates"][0]["content"] == {"role": "model", "parts": [{"text": words[0]}]}
    assert last["candidates"][0]["finishReason"] == "STOP"
    assert last["usageMetadata"]["candidatesTokenCount"] == len(words)
    assert last["usageMetadata"]["thoughtsTokenCount"] == 4
    assert last["modelVersion"] == SPEC.name
    assert "sdkHttpResponse" not in last


async def test_stream_function_call_chunk_carries_the_signature(tmp_path: Path) -> None:
    spec = load_catalog()["gemini-3.1-pro-preview"]
    tools = [{"function_declarations": [{"name": "lookup", "parameters": {"type": "object"}}]}]
    body = {"model_name": spec.name, "messages": [{"role": "user", "content": "x"}], "tools": tools}
    async with fake_gemini() as (fake, url):
        provider = GeminiProvider(gemini_settings(tmp_path, url))
        try:
            chunks = [
                c
                async for c in provider.stream(
                    spec, GenerationInput.model_validate_json(json.dumps(body)), account="a"
                )
            ]
        finally:
            await provider.aclose()
    # As Gemini 3 streams a call (stream/s11): the call, unfinished, then an empty text part that finishes.
    chunk, end = chunks
    [call] = chunk.function_calls
    assert call.name == "lookup"
    assert call.thought_signature is not None
    assert base64.b64decode(call.thought_signature) in fake.issued_signatures
    assert chunk.raw is not None
    assert "thoughtSignature" in chunk.raw["candidates"][0]["content"]["parts"][0]
    assert chunk.finish_reason is None
    assert (end.text, end.function_calls, end.finish_reason) == ("", [], "STOP")
    assert end.output_tokens == chunk.output_tokens > 0


async def test_stream_mid_stream_error_raises_after_the_chunks_sent(tmp_path: Path) -> None:
    async with fake_gemini() as (fake, url):
        fake.add_fault(Fault(error_after_chunks=2))
        provider = GeminiProvider(gemini_settings(tmp_path, url))
        received: list[StreamChunk] = []
        try:
            with pytest.raises(UpstreamError) as caught:
                async for chunk in provider.stream(SPEC, request(), account="a"):
                    received.append(chunk)
        finally:
            await provider.aclose()
    assert len(received) == 2
    assert "Gemini answered 500 INTERNAL: fake mid-stream failure" in caught.value.message
    assert len(fake.generate_requests) == 1  # never retried once chunks went out


async def test_stream_dropped_connection_raises_upstream_error(tmp_path: Path) -> None:
    async with fake_gemini() as (fake, url):
        fake.add_fault(Fault(drop_after_chunks=1))
        provider = GeminiProvider(gemini_settings(tmp_path, url))
        try:
            with pytest.raises(UpstreamError) as caught:
                await collect(provider, request())
        finally:
            await provider.aclose()
    assert caught.value.message.startswith("could not reach Gemini"), caught.value.message
    assert caught.value.status_code == 502


@pytest.mark.parametrize(
    ("faults", "status", "message"),
    [
        ([Fault(status=429, retry_delay="0.01s")] * 3, 429, "Gemini answered 429 RESOURCE_EXHAUSTED"),
        (
            [Fault(status=400, message="Bad schema.")],
            400,
            "Gemini answered 400 INVALID_ARGUMENT: Bad schema.",
        ),
        ([Fault(status=503)] * 3, 503, "Gemini answered 503 UNAVAILABLE"),
        ([Fault(status=500)] * 3, 502, "Gemini answered 500 INTERNAL"),
        ([Fault(status=403)], 502, "Gemini answered 403 PERMISSION_DENIED"),
        ([Fault(block_reason="SAFETY")], 400, "Gemini blocked the prompt (SAFETY)"),
    ],
)
async def test_stream_error_before_the_first_chunk_maps_the_status(
    tmp_path: Path, faults: list[Fault], status: int, message: str
) -> None:
    async with fake_gemini() as (fake, url):
        for fault in faults:
            fake.add_fault(fault)
        provider = GeminiProvider(gemini_settings(tmp_path, url))
        try:
            stream = provider.stream(SPEC, request(), account="a")
            with pytest.raises(UpstreamError) as caught:
                await anext(stream)
        finally:
            await provider.aclose()
    assert caught.value.status_code == status
    assert caught.value.message.startswith(message)
    assert len(fake.generate_requests) == len(faults)


async def test_stream_retries_before_the_first_chunk_then_streams(tmp_path: Path) -> None:
    async with fake_gemini() as (fake, url):
        fake.add_fault(Fault(status=503))
        provider = GeminiProvider(gemini_settings(tmp_path, url))
        try:
            chunks = await collect(provider, request())
        finally:
            await provider.aclose()
    assert "".join(c.text for c in chunks) == fake.reply_text
    assert len(fake.generate_requests) == 2


async def test_closing_the_stream_closes_the_upstream_connection(tmp_path: Path) -> None:
    async with fake_gemini(chunks=40, chunk_delay=0.05) as (fake, url):
        provider = GeminiProvider(gemini_settings(tmp_path, url))
        try:
            stream = provider.stream(SPEC, request(), account="a")
            await anext(stream)
            await anext(stream)
            await stream.aclose()
            await asyncio.wait_for(fake.abandoned.wait(), timeout=10)
        finally:
            await provider.aclose()
    assert fake.streams_abandoned == 1
    assert fake.streams_completed == 0


async def test_stream_of_a_large_video_deletes_the_upload_when_closed(tmp_path: Path) -> None:
    video = mp4(2.0, payload=4000)
    req = request(
        messages=[
            {"role": "user", "content": [{"type": "video", "data": b64(video), "mime_type": "video/mp4"}]}
        ]
    )
    async with fake_gemini() as (fake, url):
        provider = GeminiProvider(gemini_settings(tmp_path, url, gemini_inline_request_bytes=1000))
        try:
            stream = provider.stream(SPEC, req, account="a")
            await anext(stream)
            assert len(fake.files) == 1
            [stored] = fake.files.values()
            assert bytes(stored.data) == video
            await stream.aclose()
        finally:
            await provider.aclose()
    assert fake.files == {}
    assert len(fake.deleted_files) == 1


# -- retry decisions (data) -------------------------------------------------------------------------------

POLICY = RetryPolicy(max_attempts=4, budget_seconds=10.0, initial_delay=1.0, max_delay=8.0, jitter=0.5)


@pytest.mark.parametrize("status", [429, 500, 503, 504, None])
def test_retryable_failures_back_off_exponentially_with_jitter(status: int | None) -> None:
    failure = UpstreamFailure(status, "x")
    low = [decide(failure, n, 0.0, POLICY, rand=lambda: 0.0).delay for n in (1, 2, 3)]
    high = [decide(failure, n, 0.0, POLICY, rand=lambda: 1.0).delay for n in (1, 2, 3)]
    assert low == [0.5, 1.0, 2.0]
    assert high == [1.0, 2.0, 4.0]
    assert decide(failure, 1, 0.0, POLICY).retry


@pytest.mark.parametrize("status", [400, 403, 404, 413])
def test_client_errors_are_not_retried(status: int) -> None:
    decision = decide(UpstreamFailure(status, "x"), 1, 0.0, POLICY)
    assert not decision.retry
    assert decision.reason == "not retryable"


def test_retry_info_sets_the_delay_and_the_budget_and_attempts_bound_it() -> None:
    assert decide(UpstreamFailure(429, "x", retry_after=3.0), 1, 0.0, POLICY, rand=lambda: 0).delay == 3.0
    past_budget = decide(UpstreamFailure(429, "x", retry_after=3.0), 1, 8.0, POLICY)
    assert not past_budget.retry
    assert "10 s retry budget" in past_budget.reason
    assert not decide(UpstreamFailure(503, "x"), 4, 0.0, POLICY).retry
    assert decide(UpstreamFailure(503, "x"), 4, 0.0, POLICY).reason == "gave up after 4 attempts"
    capped = decide(UpstreamFailure(503, "x"), 3, 0.0, RetryPolicy(9, 100.0, 5.0, 6.0, 0.0))
    assert capped.delay == 6.0


def test_api_errors_are_classified_with_their_retry_delay() -> None:
    body = {
        "error": {
            "code": 429,
            "message": "Quota exceeded.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "22s"},
            ],
        }
    }
    failure = classify(genai_errors.ClientError(429, body))
    assert failure == UpstreamFailure(429, "Gemini answered 429 RESOURCE_EXHAUSTED: Quota exceeded.", 22.0)
    assert client_status(failure) == 429
    assert classify(ValueError("not upstream")) is None
    assert parse_duration("0.25s") == 0.25
    assert parse_duration("soon") is None


# -- check() and token bounds -------------------------------------------------------------------------------


def test_check_refuses_a_bad_thought_signature(tmp_path: Path) -> None:
    provider = GeminiProvider(gemini_settings(tmp_path, None))
    req = request(
        messages=[
            {"role": "user", "content": "x"},
            {"role": "model", "function_call": {"name": "f", "args": {}, "thought_signature": "not base64!"}},
            {"role": "user", "function_response": {"name": "f", "response": {}}},
        ]
    )
    with pytest.raises(BadRequest, match=r"messages\[1\].function_call.thought_signature"):
        provider.check(SPEC, req)


async def test_the_check_runs_on_the_event_loop_unless_it_must_decode_long_signatures(tmp_path: Path) -> None:
    """Gemini's check is a lookup per part: it skips the hop to a check thread, except for a request that
    sends back more thought signature than the light limit (decoding it is linear, but not microseconds)."""
    provider = GeminiProvider(gemini_settings(tmp_path, None))
    registry = ProviderRegistry({SPEC.name: SPEC}, {SPEC.provider: provider})
    threads: list[str] = []
    real_check = provider.check

    def check(spec: ModelSpec, req: GenerationInput) -> None:
        threads.append(threading.current_thread().name)
        real_check(spec, req)

    provider.check = check  # type: ignore[method-assign]
    provider.available = lambda: True  # type: ignore[method-assign]

    def with_signature(size: int) -> GenerationInput:
        signature = base64.b64encode(bytes(size * 3 // 4)).decode()
        return request(
            messages=[
                {"role": "user", "content": "x"},
                {"role": "model", "function_call": {"name": "f", "args": {}, "thought_signature": signature}},
                {"role": "user", "function_response": {"name": "f", "response": {}}},
            ]
        )

    try:
        await registry.admit(request())
        await registry.admit(with_signature(gemini.LIGHT_CHECK_SIGNATURE_BYTES))
        await registry.admit(with_signature(gemini.LIGHT_CHECK_SIGNATURE_BYTES + 4))
        with pytest.raises(BadRequest, match="thought_signature"):  # refused the same way on either path
            bad = with_signature(gemini.LIGHT_CHECK_SIGNATURE_BYTES + 4)
            bad.messages[1].function_call.thought_signature = "!" * (gemini.LIGHT_CHECK_SIGNATURE_BYTES + 4)  # type: ignore[union-attr]
            await registry.admit(bad)
    finally:
        await registry.aclose()
    main = threading.current_thread().name
    assert threads[:2] == [main, main]
    assert threads[2].startswith("textgen-check") and threads[3].startswith("textgen-check")


def test_input_estimate_counts_media_and_bounds_the_text(tmp_path: Path) -> None:
    provider = GeminiProvider(gemini_settings(tmp_path, None))
    text_only = provider.count_input_tokens(SPEC, request())
    assert text_only >= len("Write a tagline.")
    image = request(
        messages=[{"role": "user", "content": [{"type": "image", "data": PNG_1X1, "mime_type": "image/png"}]}]
    )
    assert provider.count_input_tokens(SPEC, image) >= mapping.IMAGE_MAX_TOKENS_GEMINI3
    video = request(
        messages=[
            {"role": "user", "content": [{"type": "video", "data": b64(mp4(10.0)), "mime_type": "video/mp4"}]}
        ]
    )
    assert provider.count_input_tokens(SPEC, video) >= 10 * 263


def test_media_headers_give_sizes_and_durations() -> None:
    assert mapping.image_size(base64.b64decode(PNG_1X1)) == (1, 1)
    assert mapping.image_tokens(base64.b64decode(PNG_1X1)) == mapping.IMAGE_MAX_TOKENS_GEMINI3
    big_png = b"\x89PNG\r\n\x1a\n" + bytes(8) + (3000).to_bytes(4, "big") + (1600).to_bytes(4, "big")
    assert mapping.image_tokens(big_png) == 4 * 3 * 258
    assert mapping.mp4_duration(mp4(12.5)) == 12.5
    assert mapping.video_tokens(b"\x1a\x45\xdf\xa3" + bytes(125_000)) >= 10 * 263  # unknown container


async def test_the_proxy_from_the_environment_carries_every_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP(S)_PROXY is read once when the session opens (not from ~/.netrc and the environment per call),
    and every call goes through it: Gemini's address here does not resolve, only the proxy can answer."""
    async with fake_gemini() as (fake, url):
        monkeypatch.setenv("HTTP_PROXY", url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        provider = GeminiProvider(gemini_settings(tmp_path, "http://gemini.invalid"))
        try:
            await provider.open()
            monkeypatch.delenv("HTTP_PROXY")  # read at open(): later changes do not matter
            generated = await provider.generate(SPEC, request(), account="a")
            chunks = await collect(provider, request())
        finally:
            await provider.aclose()
    assert generated.text == fake.reply_text
    assert "".join(c.text for c in chunks) == fake.reply_text
    assert fake.last.stream


class _Body:
    def __init__(self) -> None:
        self.exception: BaseException | None = None

    def set_exception(self, exc: BaseException) -> None:
        self.exception = exc


class _Response:
    """What ``StreamReads`` touches of an aiohttp response."""

    def __init__(self) -> None:
        self.connection = None
        self.content = _Body()
        self.closed = asyncio.Event()

    def close(self) -> None:
        self.closed.set()


async def test_only_a_stream_waiting_for_data_is_timed() -> None:
    """A relay waiting for the upstream's next data past the deadline is failed as a read timeout; one whose
    client reads slowly (the relay is not asking for data) is not, however long that lasts."""
    reads = gemini.StreamReads(0.05)
    silent, slow = _Response(), _Response()
    reads.watch(silent)  # type: ignore[arg-type]
    reads.watch(slow)  # type: ignore[arg-type]
    reads.waiting(silent, time.monotonic())  # type: ignore[arg-type]
    await asyncio.wait_for(silent.closed.wait(), 10)
    assert isinstance(silent.content.exception, aiohttp.SocketTimeoutError)
    for _ in range(5):  # several sweeps, each past the deadline
        await asyncio.sleep(0.05)
    assert not slow.closed.is_set() and slow.content.exception is None
    reads.waiting(slow, time.monotonic() - 1)  # type: ignore[arg-type]
    await asyncio.wait_for(slow.closed.wait(), 10)
    reads.forget(slow)  # type: ignore[arg-type]
    reads.cancel()
