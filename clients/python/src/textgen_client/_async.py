"""The asyncio client: the same methods as ``Client``, awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import httpx

from textgen_client import _http
from textgen_client._http import Messages, PollSchedule, RetryPolicy
from textgen_client._sse import TASK_ID_HEADER, SSEDecoder, StreamState
from textgen_client.errors import APIConnectionError, WaitTimeout
from textgen_client.models import StreamEnd, StreamEvent, Task


class AsyncClient:
    """An asyncio client of a textgen server (or of the hosted Creatify API: pass its ``base_url``).

    Answers of 429 and 503 are retried up to ``max_retries`` times, each after the server's Retry-After (when it
    is no longer than ``max_retry_wait`` seconds; else the error is raised at once with its ``retry_after``).
    """

    def __init__(
        self,
        api_id: str,
        api_key: str,
        *,
        base_url: str = _http.DEFAULT_BASE_URL,
        timeout: float | httpx.Timeout = _http.DEFAULT_TIMEOUT,
        max_retries: int = _http.DEFAULT_MAX_RETRIES,
        max_retry_wait: float = _http.DEFAULT_MAX_RETRY_WAIT,
        poll: PollSchedule = _http.DEFAULT_POLL,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(max_retries, max_retry_wait)
        self.poll = poll
        self._headers = _http.auth_headers(api_id, api_key, headers)
        self._owned = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self.tasks = AsyncTasks(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (unless it was passed in as ``http_client``)."""
        if self._owned:
            await self._http.aclose()

    async def generate(
        self,
        model: str,
        messages: Messages,
        *,
        system_instruction: str | None = None,
        config: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_config: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Task:
        """Generate in sync mode: the returned task is finished (``done``, or ``failed`` with its reason)."""
        body = _http.create_body(
            model,
            messages,
            system_instruction=system_instruction,
            config=config,
            tools=tools,
            tool_config=tool_config,
            extra_body={**(extra_body or {}), "sync": True},
        )
        return await self._create(body, idempotency_key)

    async def submit(
        self,
        model: str,
        messages: Messages,
        *,
        system_instruction: str | None = None,
        config: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_config: Mapping[str, Any] | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Task:
        """Create an async task and return it at once (``pending``); ``wait`` for it or take the webhook."""
        extra = {**(extra_body or {})}
        if webhook_url is not None:
            extra["webhook_url"] = webhook_url
        body = _http.create_body(
            model,
            messages,
            system_instruction=system_instruction,
            config=config,
            tools=tools,
            tool_config=tool_config,
            extra_body=extra,
        )
        return await self._create(body, idempotency_key)

    async def wait(self, task: Task | str, *, timeout: float | None = None) -> Task:  # noqa: ASYNC109 (WaitTimeout carries the last state, asyncio.timeout would not)
        """Poll the task until it is finished; raise ``WaitTimeout`` if ``timeout`` seconds pass first."""
        current = task if isinstance(task, Task) else await self.get(task)
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = self.poll.initial
        while not current.finished:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(current, timeout or 0.0)
                await asyncio.sleep(min(interval, remaining))
            else:
                await asyncio.sleep(interval)
            interval = self.poll.next(interval)
            current = await self.get(current.id)
        return current

    def stream(
        self,
        model: str,
        messages: Messages,
        *,
        system_instruction: str | None = None,
        config: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_config: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> AsyncStream:
        """A streamed generation: iterate it for ``TextDelta`` and ``FunctionCall`` events, then a ``StreamEnd``.

        The request is sent when the stream is entered (``async with``) or first iterated.
        """
        body = _http.create_body(
            model,
            messages,
            system_instruction=system_instruction,
            config=config,
            tools=tools,
            tool_config=tool_config,
            extra_body=extra_body,
        )
        return AsyncStream(self, body, _http.idempotency_headers(idempotency_key))

    async def get(self, task: Task | str) -> Task:
        """The task's current state."""
        return _http.task_from(await self._request("GET", _http.task_path(_http.task_id_of(task))))

    async def cancel(self, task: Task | str) -> Task:
        """Cancel a pending or running task; it ends ``failed`` with ``failed_reason`` "cancelled".

        Raises ``ConflictError`` if the task had already finished, ``NotFoundError`` if it is not yours.
        """
        path = _http.task_path(_http.task_id_of(task), "cancel/")
        return _http.task_from(await self._request("POST", path, replayable=True))

    async def remaining_credits(self) -> float:
        return _http.credits_from(await self._request("GET", _http.CREDITS_PATH))

    async def _create(self, body: dict[str, Any], idempotency_key: str | None) -> Task:
        headers = _http.idempotency_headers(idempotency_key)
        response = await self._request(
            "POST", _http.TASKS_PATH, json=body, headers=headers, replayable=idempotency_key is not None
        )
        return _http.task_from(response)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        replayable: bool | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """Send with retries; the answer of a ``stream`` request is returned unread (the caller closes it)."""
        request = self._http.build_request(
            method,
            self.base_url + path,
            json=json,
            params=params,
            headers={**self._headers, **(headers or {})},
        )
        replay = method == "GET" if replayable is None else replayable
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self.retry.after_error(attempt, exc, replayable=replay)
                if delay is None:
                    raise APIConnectionError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            else:
                delay = self.retry.after_response(attempt, response)
                if delay is None:
                    if stream and not response.is_success:
                        await response.aread()
                        await response.aclose()
                    return response
                await response.aclose()
            await asyncio.sleep(delay)
            attempt += 1


class AsyncTasks:
    """The account's tasks."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self, *, status: str | None = None, page_size: int | None = None) -> AsyncIterator[Task]:
        """Every task, newest first, fetching one page of ``page_size`` at a time as you iterate."""
        params: dict[str, str] | None = _http.list_params(status, page_size)
        while params is not None:
            response = await self._client._request("GET", _http.TASKS_PATH, params=params)
            tasks, params = _http.page_of(response)
            for task in tasks:
                yield task

    async def get(self, task: Task | str) -> Task:
        return await self._client.get(task)

    async def cancel(self, task: Task | str) -> Task:
        return await self._client.cancel(task)


class AsyncStream:
    """One streamed generation. ``task_id`` is known from the response headers on (or from the last chunk on a
    server that does not send them); ``end`` is the ``StreamEnd`` once it has arrived."""

    def __init__(self, client: AsyncClient, body: dict[str, Any], headers: dict[str, str]) -> None:
        self._client = client
        self._body = body
        self._headers = {**headers, "Accept": "text/event-stream"}
        self._response: httpx.Response | None = None
        self._state = StreamState()
        self._events: AsyncIterator[StreamEvent] | None = None

    @property
    def task_id(self) -> str | None:
        return self._state.task_id

    @property
    def end(self) -> StreamEnd | None:
        return self._state.end

    @property
    def headers(self) -> httpx.Headers:
        """The response headers (rate-limit quota, request id); available once the stream is open."""
        if self._response is None:
            raise RuntimeError("the stream is not open yet: enter it with async with, or iterate it")
        return self._response.headers

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; a generation still running is then stopped and charged for what it produced."""
        if self._response is not None:
            await self._response.aclose()

    async def _open(self) -> httpx.Response:
        if self._response is None:
            response = await self._client._request(
                "POST",
                _http.STREAM_PATH,
                json=self._body,
                headers=self._headers,
                replayable="Idempotency-Key" in self._headers,
                stream=True,
            )
            if not response.is_success:
                raise _http.error_from(response)
            self._state.task_id = response.headers.get(TASK_ID_HEADER)
            self._response = response
        return self._response

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        if self._events is None:
            self._events = self._read()
        return self._events

    async def _read(self) -> AsyncIterator[StreamEvent]:
        response = await self._open()
        decoder = SSEDecoder()
        try:
            async for line in response.aiter_lines():
                item = decoder.feed(line)
                if item is not None:
                    for event in self._state.feed(item):
                        yield event
                if self._state.end is not None:
                    return
        except httpx.TransportError as exc:
            raise self._state.interrupted(f"{type(exc).__name__}: {exc}") from exc
        finally:
            await self.aclose()
        raise self._state.interrupted("the connection closed")

    async def final(self) -> StreamEnd:
        """Consume the rest of the stream and return its ``StreamEnd``."""
        async for _ in self:
            pass
        if self._state.end is None:
            raise self._state.interrupted("the stream was closed")
        return self._state.end
