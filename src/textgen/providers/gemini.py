"""Gemini models through the official google-genai SDK (one shared async client per process).

Every request field is mapped by ``gemini_mapping``; failures are classified and retried by ``gemini_retry``.
The SDK's own retries stay off (they ignore RetryInfo and the budget), and so do its automatic function
calling and continuation: one request here is one generation upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

import httpx2
from google import genai
from google.genai import types

from textgen.catalog import ModelSpec
from textgen.errors import UpstreamError
from textgen.protocol import GenerationInput
from textgen.providers import gemini_mapping as mapping
from textgen.providers.base import Generation, Progress, StreamChunk
from textgen.providers.gemini_retry import RetryPolicy, classify, decide, to_error
from textgen.settings import Settings

log = logging.getLogger("textgen.gemini")

T = TypeVar("T")


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
        self._client: genai.Client | None = None
        self._http: httpx2.AsyncClient | None = None
        # Upstream responses opened by the task starting a stream, so that closing the stream can close
        # its HTTP response at once (the SDK's nested generators would only close it when garbage collected).
        self._opening: dict[asyncio.Task[object], list[httpx2.Response]] = {}

    # -- the Provider protocol ------------------------------------------------------------

    async def open(self) -> None:
        """Nothing to prepare: the HTTP client is made on first use."""

    def available(self) -> bool:
        return bool(self.settings.gemini_api_key)

    def check(self, spec: ModelSpec, request: GenerationInput) -> None:
        mapping.check_request(request)

    def count_input_tokens(self, spec: ModelSpec, request: GenerationInput) -> int:
        return mapping.estimate_input_tokens(request)

    async def generate(
        self, spec: ModelSpec, request: GenerationInput, *, account: str, progress: Progress | None = None
    ) -> Generation:
        client = self.client
        async with self._uploaded_media(request) as files:
            contents = mapping.build_contents(request, files)
            config = mapping.build_config(request)
            response = await self._with_retries(
                lambda: client.aio.models.generate_content(
                    model=spec.upstream_name,
                    contents=contents,
                    config=config,  # type: ignore[arg-type]
                )
            )
            return mapping.to_generation(response)

    async def stream(
        self, spec: ModelSpec, request: GenerationInput, *, account: str
    ) -> AsyncGenerator[StreamChunk, None]:
        client = self.client
        async with self._uploaded_media(request) as files:
            contents = mapping.build_contents(request, files)
            config = mapping.build_config(request)

            opened: list[httpx2.Response] = []

            async def first_chunk() -> tuple[
                AsyncIterator[types.GenerateContentResponse], StreamChunk | None
            ]:
                # The SDK sends the request at the first step, so HTTP errors surface here and can be retried.
                upstream = await client.aio.models.generate_content_stream(
                    model=spec.upstream_name,
                    contents=contents,
                    config=config,  # type: ignore[arg-type]
                )
                task = asyncio.current_task()
                if task is not None:
                    self._opening[task] = opened
                try:
                    first = await anext(upstream)
                except StopAsyncIteration:
                    return upstream, None
                except BaseException:
                    await _close(upstream, opened)
                    raise
                finally:
                    if task is not None:
                        self._opening.pop(task, None)
                return upstream, mapping.to_chunk(first)

            upstream, chunk = await self._with_retries(first_chunk)
            try:
                if chunk is None:
                    raise UpstreamError("Gemini ended the stream without sending anything")
                yield chunk
                while True:
                    try:
                        response = await anext(upstream)
                    except StopAsyncIteration:
                        return
                    except Exception as exc:
                        failure = classify(exc)
                        if failure is None:
                            raise
                        raise to_error(failure) from exc
                    yield mapping.to_chunk(response)
            finally:
                await _close(upstream, opened)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        http, self._http = self._http, None
        if client is not None:
            await client.aio.aclose()
        if http is not None:
            await http.aclose()

    # -- internals ------------------------------------------------------------

    @property
    def client(self) -> genai.Client:
        if self._client is None:
            if not self.settings.gemini_api_key:
                raise UpstreamError("no Gemini API key is configured (GEMINI_API_KEY)", status_code=503)
            self._http = httpx2.AsyncClient(
                limits=httpx2.Limits(max_connections=None, max_keepalive_connections=512),
                event_hooks={"response": [self._on_response]},
            )
            self._client = genai.Client(
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
                    httpx_async_client=self._http,
                ),
            )
        return self._client

    async def _on_response(self, response: httpx2.Response) -> None:
        task = asyncio.current_task()
        opened = self._opening.get(task) if task is not None else None
        if opened is not None:
            opened.append(response)

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

    @contextlib.asynccontextmanager
    async def _uploaded_media(
        self, request: GenerationInput
    ) -> AsyncIterator[dict[tuple[int, int], mapping.FileRef]]:
        """Upload the videos that do not fit inline, wait until they are processed, delete them after."""
        plan = mapping.plan_uploads(request, self.settings.gemini_inline_request_bytes)
        files: dict[tuple[int, int], mapping.FileRef] = {}
        names: list[str] = []
        try:
            for i, j, part in plan:
                uploaded = await self._upload(part.data, mapping.gemini_mime(part.mime_type), names)
                files[(i, j)] = mapping.FileRef(uri=uploaded.uri or "", mime_type=uploaded.mime_type or "")
            yield files
        finally:
            for name in names:
                try:
                    await asyncio.shield(self.client.aio.files.delete(name=name))
                except Exception as exc:  # a leftover file expires upstream after 48 h
                    log.warning("could not delete Gemini file %s: %s", name, exc)

    async def _upload(self, data: str, mime_type: str, names: list[str]) -> types.File:
        from textgen.media import decode_base64

        client = self.client
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


async def _close(
    upstream: AsyncIterator[types.GenerateContentResponse], opened: list[httpx2.Response]
) -> None:
    for response in opened:
        with contextlib.suppress(Exception):
            await response.aclose()
    aclose = getattr(upstream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
