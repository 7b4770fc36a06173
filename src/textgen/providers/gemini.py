"""Gemini models over REST: ``generateContent`` and ``streamGenerateContent?alt=sse`` from one aiohttp session.

Requests are built as plain dicts by ``gemini_mapping`` and answers read as plain dicts by ``gemini_wire``; failures
are classified and retried by ``gemini_retry``. One request here is one generation upstream. The google-genai SDK
is used only for the File API (videos too large to send inline), through a client made on first upload.
aiohttp was chosen over httpx by measurement (``python -m bench.http_client``, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import aiohttp.helpers
import httpx2
import yarl
from google import genai
from google.genai import types

from textgen import jsoncodec
from textgen.catalog import ModelSpec
from textgen.errors import TokenUsage, UpstreamError
from textgen.protocol import GenerationInput
from textgen.providers import gemini_mapping as mapping
from textgen.providers import gemini_wire as wire
from textgen.providers.base import Generation, Progress, StreamChunk
from textgen.providers.gemini_retry import RetryPolicy, classify, decide, to_error
from textgen.settings import Settings

log = logging.getLogger("textgen.gemini")

T = TypeVar("T")
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
# Thought signatures up to this many base64 characters are decoded on the event loop (about 20 µs).
LIGHT_CHECK_SIGNATURE_BYTES = 64 * 1024


class StreamReads:
    """The read deadline of every open stream, checked by one task a few times per deadline, instead of the
    timer aiohttp cancels and sets again for every piece of a body it receives (``sock_read``): with a
    thousand streams that timer showed as a twentieth of the relay's time. A stream that waits ``seconds``
    for its next data fails as aiohttp's own read timeout does; a stream not waiting (its client reads
    slowly, so the relay is not asking for more) is not timed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._waiting: dict[aiohttp.ClientResponse, float | None] = {}  # open streams: waiting since
        self._sweeper: asyncio.Task[None] | None = None

    def watch(self, response: aiohttp.ClientResponse) -> None:
        """Take over ``response``'s read deadline (its headers came under aiohttp's own)."""
        if response.connection is not None and response.connection.protocol is not None:
            response.connection.protocol.read_timeout = None  # its timer is dropped at the next read
        self._waiting[response] = None
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="textgen-stream-reads")

    def waiting(self, response: aiohttp.ClientResponse, since: float | None) -> None:
        """``response``'s relay waits for data from ``since`` (a ``time.monotonic()``), or no longer (None)."""
        self._waiting[response] = since

    def forget(self, response: aiohttp.ClientResponse) -> None:
        self._waiting.pop(response, None)

    async def _sweep(self) -> None:
        interval = min(max(self.seconds / 4, 0.01), 1.0)
        while self._waiting:
            await asyncio.sleep(interval)
            expired = time.monotonic() - self.seconds
            for response, since in list(self._waiting.items()):
                if since is not None and since < expired:
                    del self._waiting[response]
                    response.content.set_exception(
                        aiohttp.SocketTimeoutError("Timeout on reading data from socket")
                    )
                    response.close()

    def cancel(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()


class GeminiProvider:
    name = "gemini"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = RetryPolicy(
            max_attempts=settings.gemini_max_attempts,
            budget_seconds=settings.gemini_retry_budget_seconds,
            initial_delay=settings.gemini_retry_initial_delay_seconds,
            max_delay=settings.gemini_retry_max_delay_seconds,
        )
        base = (settings.gemini_base_url or DEFAULT_BASE_URL).rstrip("/")
        self._models_url = f"{base}/{settings.gemini_api_version}/models/"
        self._session: aiohttp.ClientSession | None = None
        # The proxy for Gemini's address from HTTPS_PROXY / NO_PROXY, read once (a session that trusts the
        # environment reads ~/.netrc and the variables again on every request).
        self._proxy: tuple[yarl.URL | None, aiohttp.BasicAuth | None] = (None, None)
        self._files: genai.Client | None = None
        self._files_http: httpx2.AsyncClient | None = None
        self._reads = StreamReads(settings.gemini_timeout_seconds)

    # -- the Provider protocol ------------------------------------------------------------

    async def open(self) -> None:
        """Open the one HTTP session every call shares (nothing to open without a key)."""
        if self.settings.gemini_api_key and self._session is None:
            self._session = self._new_session()

    def available(self) -> bool:
        return bool(self.settings.gemini_api_key)

    def capacity(self) -> int:
        """Calls wait on the network, not on this process: hundreds run at once."""
        return self.settings.gemini_concurrency

    def check(self, spec: ModelSpec, request: GenerationInput) -> None:
        mapping.check_request(request)

    def light_check(self, request: GenerationInput) -> bool:
        # The check decodes the thought signatures sent back; everything else it does is a lookup per part.
        return mapping.signature_bytes(request) <= LIGHT_CHECK_SIGNATURE_BYTES

    def count_input_tokens(self, spec: ModelSpec, request: GenerationInput) -> int:
        return mapping.estimate_input_tokens(request)

    async def generate(
        self, spec: ModelSpec, request: GenerationInput, *, account: str, progress: Progress | None = None
    ) -> Generation:
        session = self.session
        proxy, proxy_auth = self._proxy
        url = f"{self._models_url}{spec.upstream_name}:generateContent"
        async with self._uploaded_media(request) as files:
            payload = _encode(mapping.build_body(request, files, spec.default_output_tokens))

            async def attempt() -> dict[str, Any]:
                async with session.post(url, data=payload, proxy=proxy, proxy_auth=proxy_auth) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise wire.api_error(response.status, body, response.headers.get("retry-after"))
                return wire.decode_response(body)

            return _read(wire.to_generation, await self._with_retries(attempt))

    async def stream(
        self, spec: ModelSpec, request: GenerationInput, *, account: str
    ) -> AsyncGenerator[StreamChunk, None]:
        session = self.session
        proxy, proxy_auth = self._proxy
        url = f"{self._models_url}{spec.upstream_name}:streamGenerateContent?alt=sse"
        async with self._uploaded_media(request) as files:
            payload = _encode(mapping.build_body(request, files, spec.default_output_tokens))

            async def first_chunk() -> tuple[
                aiohttp.ClientResponse, AsyncGenerator[dict[str, Any], None], StreamChunk
            ]:
                # Retried as a whole until the first event: until then an error is still an HTTP status.
                response = await session.post(url, data=payload, proxy=proxy, proxy_auth=proxy_auth)
                events = _events(response, self._reads)
                try:
                    if response.status != 200:
                        body = await response.read()
                        raise wire.api_error(response.status, body, response.headers.get("retry-after"))
                    first = await anext(events, None)
                    if first is None:
                        raise UpstreamError("Gemini ended the stream without sending anything")
                    return response, events, _read(wire.to_chunk, first)
                except BaseException:
                    await _close(response, events)
                    raise

            response, events, chunk = await self._with_retries(first_chunk)
            try:
                yield chunk
                while True:
                    try:
                        event = await anext(events)
                    except StopAsyncIteration:
                        return
                    except UpstreamError:
                        raise
                    except Exception as exc:  # after the first chunk: never retried
                        failure = classify(exc)
                        if failure is None:
                            raise
                        raise to_error(failure) from exc
                    yield _read(wire.to_chunk, event)
            finally:
                await _close(response, events)

    async def aclose(self) -> None:
        self._reads.cancel()
        session, self._session = self._session, None
        files, self._files = self._files, None
        files_http, self._files_http = self._files_http, None
        if session is not None:
            await session.close()
        if files is not None:
            await files.aio.aclose()
        if files_http is not None:
            await files_http.aclose()

    # -- internals ------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        if not self.settings.gemini_api_key:
            raise UpstreamError("no Gemini API key is configured (GEMINI_API_KEY)", status_code=503)
        if self._session is None:  # used without open(): made on first use, in the running loop
            self._session = self._new_session()
        return self._session

    def _new_session(self) -> aiohttp.ClientSession:
        timeout = self.settings.gemini_timeout_seconds
        try:  # HTTPS_PROXY and NO_PROXY apply, as they did with the SDK
            self._proxy = aiohttp.helpers.get_env_proxy_for_url(yarl.URL(self._models_url))
        except LookupError:
            self._proxy = (None, None)
        return aiohttp.ClientSession(
            # No pool limit: the callers bound concurrency; idle connections are kept for reuse.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            headers={
                "x-goog-api-key": self.settings.gemini_api_key or "",
                "content-type": "application/json",
            },
            # Per connection attempt and per read, as a stream may last longer than any one read.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
            auto_decompress=True,
            trust_env=False,  # the proxy is read once above
        )

    async def _with_retries(self, attempt: Callable[[], Awaitable[T]]) -> T:
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                return await attempt()
            except UpstreamError:
                raise
            except Exception as exc:
                failure = classify(exc)
                if failure is None:
                    raise
                decision = decide(failure, attempts, time.monotonic() - started, self.policy)
                if not decision.retry:
                    raise to_error(failure, decision) from exc
                log.info(
                    "Gemini attempt %d failed (%s); retrying in %.2f s",
                    attempts,
                    failure.description,
                    decision.delay,
                )
                await asyncio.sleep(decision.delay)

    # -- the File API (google-genai) ------------------------------------------------------------

    @property
    def files_client(self) -> genai.Client:
        if self._files is None:
            if not self.settings.gemini_api_key:
                raise UpstreamError("no Gemini API key is configured (GEMINI_API_KEY)", status_code=503)
            self._files_http = httpx2.AsyncClient()
            self._files = genai.Client(
                api_key=self.settings.gemini_api_key,
                vertexai=False,
                # Explicit, so that GOOGLE_GENAI_* variables cannot swap the client for a record/replay one.
                debug_config=genai.client.DebugConfig(
                    client_mode=None, replays_directory=None, replay_id=None
                ),
                http_options=types.HttpOptions(
                    base_url=self.settings.gemini_base_url,
                    api_version=self.settings.gemini_api_version,
                    timeout=int(self.settings.gemini_timeout_seconds * 1000),
                    # Its own httpx2 client: with aiohttp installed the SDK would otherwise build an aiohttp
                    # session of its own, by a subclass that aiohttp deprecates.
                    httpx_async_client=self._files_http,
                ),
            )
        return self._files

    @contextlib.asynccontextmanager
    async def _uploaded_media(
        self, request: GenerationInput
    ) -> AsyncIterator[dict[tuple[int, int], mapping.FileRef]]:
        """Upload the videos that do not fit inline, wait until they are processed, delete them after."""
        plan = mapping.plan_uploads(request, self.settings.gemini_inline_request_bytes)
        files: dict[tuple[int, int], mapping.FileRef] = {}
        if not plan:
            yield files
            return
        names: list[str] = []
        try:
            for i, j, part in plan:
                uploaded = await self._upload(part.data, mapping.gemini_mime(part.mime_type), names)
                files[(i, j)] = mapping.FileRef(uri=uploaded.uri or "", mime_type=uploaded.mime_type or "")
            yield files
        finally:
            for name in names:
                try:
                    await asyncio.shield(self.files_client.aio.files.delete(name=name))
                except Exception as exc:  # a leftover file expires upstream after 48 h
                    log.warning("could not delete Gemini file %s: %s", name, exc)

    async def _upload(self, data: str, mime_type: str, names: list[str]) -> types.File:
        from textgen.media import decode_base64

        client = self.files_client
        blob = decode_base64(data)
        uploaded = await self._with_retries(
            lambda: client.aio.files.upload(
                file=io.BytesIO(blob), config=types.UploadFileConfig(mime_type=mime_type)
            )
        )
        if uploaded.name:
            names.append(uploaded.name)
        deadline = time.monotonic() + self.settings.gemini_file_active_timeout_seconds
        while uploaded.state != types.FileState.ACTIVE:
            if uploaded.state == types.FileState.FAILED:
                detail = uploaded.error.message if uploaded.error else "no detail"
                raise UpstreamError(f"Gemini could not process the uploaded video: {detail}", status_code=400)
            if time.monotonic() > deadline:
                raise UpstreamError(
                    "the uploaded video was not ready after "
                    f"{self.settings.gemini_file_active_timeout_seconds:g} s of processing",
                    status_code=504,
                )
            await asyncio.sleep(self.settings.gemini_file_poll_seconds)
            uploaded = await self._with_retries(
                functools.partial(client.aio.files.get, name=uploaded.name or "")
            )
        return uploaded


def _read(convert: Callable[[dict[str, Any]], T], response: dict[str, Any]) -> T:
    """``convert`` an answer; one Gemini refused itself (a blocked prompt, a SAFETY finish) keeps the usage
    Gemini reported with it, as Gemini bills those tokens."""
    try:
        return convert(response)
    except UpstreamError as exc:
        if exc.usage is None and _refused(response) and isinstance(response.get("usageMetadata"), dict):
            exc.usage = TokenUsage(*wire.usage_tokens(response))
        raise


def _refused(response: dict[str, Any]) -> bool:
    """Whether Gemini blocked the prompt or stopped the answer with a failing finish reason (as opposed to
    an answer that could not be read)."""
    feedback = response.get("promptFeedback")
    if isinstance(feedback, dict) and (feedback.get("blockReason") or feedback.get("blockReasonMessage")):
        return True
    candidates = response.get("candidates")
    if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
        reason = candidates[0].get("finishReason")
        return bool(reason) and reason not in wire.OK_FINISH_REASONS
    return False


def _encode(body: dict[str, Any]) -> bytes:
    return jsoncodec.dumps(body)


async def _events(
    response: aiohttp.ClientResponse, reads: StreamReads
) -> AsyncGenerator[dict[str, Any], None]:
    """The events of an SSE body as they arrive; the raw JSON error tail, if any, raises at the end."""
    parser = wire.SSEParser()
    reads.watch(response)
    try:
        while True:
            reads.waiting(response, time.monotonic())
            data = await response.content.readany()
            reads.waiting(response, None)
            if not data:
                break
            for event in parser.feed(data):
                yield event
    finally:
        reads.forget(response)
    for event in parser.close():
        yield event
    parser.raise_deferred()


async def _close(response: aiohttp.ClientResponse, events: AsyncGenerator[dict[str, Any], None]) -> None:
    # Closing (not releasing) drops the connection at once: an abandoned stream ends upstream too.
    response.close()
    with contextlib.suppress(Exception):
        await events.aclose()
