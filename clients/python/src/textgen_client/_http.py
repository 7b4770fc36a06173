"""What the sync and async clients share: paths, request bodies, error mapping and retry decisions.

Nothing here performs I/O, so both clients make the same decisions from the same code.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from textgen_client.errors import APIError, error_for
from textgen_client.models import Task

__version__ = "0.1.0"

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Sync generations may run for minutes (the server's own limit is 600 s); streams send a keep-alive every 15 s.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=660.0)
DEFAULT_MAX_RETRIES = 2
DEFAULT_MAX_RETRY_WAIT = 60.0
MAX_IDEMPOTENCY_KEY_LENGTH = 255

TASKS_PATH = "/sse/text_generator/"
STREAM_PATH = "/sse/text_generator/stream/"
CREDITS_PATH = "/api/remaining_credits/"
REPLAYED_HEADER = "idempotency-replayed"

Messages = str | Sequence[Mapping[str, Any]]
"""A prompt (one user message) or the API's list of messages."""


def task_path(task_id: str, suffix: str = "") -> str:
    return f"{TASKS_PATH}{quote(task_id, safe='')}/{suffix}"


def task_id_of(task: Task | str) -> str:
    return task.id if isinstance(task, Task) else task


def create_body(
    model: str,
    messages: Messages,
    *,
    system_instruction: str | None,
    config: Mapping[str, Any] | None,
    tools: Sequence[Mapping[str, Any]] | None,
    tool_config: Mapping[str, Any] | None,
    extra_body: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The JSON body of a create or stream request; fields left as None are not sent."""
    body: dict[str, Any] = {
        "model_name": model,
        "messages": [{"role": "user", "content": messages}]
        if isinstance(messages, str)
        else [dict(m) for m in messages],
    }
    if system_instruction is not None:
        body["system_instruction"] = system_instruction
    if config is not None:
        body["config"] = dict(config)
    if tools is not None:
        body["tools"] = [dict(t) for t in tools]
    if tool_config is not None:
        body["tool_config"] = dict(tool_config)
    body.update(extra_body or {})
    return body


def idempotency_headers(key: str | None) -> dict[str, str]:
    if key is None:
        return {}
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise ValueError(f"idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters")
    return {"Idempotency-Key": key}


def auth_headers(api_id: str, api_key: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    return {
        "X-API-ID": api_id,
        "X-API-KEY": api_key,
        "User-Agent": f"textgen-client/{__version__}",
        "Accept": "application/json",
        **(extra or {}),
    }


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After value, delta seconds or an HTTP date, as seconds from now (None if absent or invalid)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter: about 0.5 s, 1 s, 2 s ... at most 8 s."""
    base: float = min(8.0, 0.5 * 2.0**attempt)
    return base * (0.5 + random.random() / 2)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try a request again. ``attempt`` counts the retries already made (0 before the first)."""

    max_retries: int = DEFAULT_MAX_RETRIES
    max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT

    def after_response(self, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before retrying this answer, or None to return (or raise) it."""
        if response.status_code not in (429, 503) or attempt >= self.max_retries:
            return None
        delay = parse_retry_after(response.headers.get("retry-after"))
        if delay is None:
            delay = _backoff(attempt)
        # A wait longer than the caller allows is not a retry but a failure to report (with its retry_after).
        return delay if delay <= self.max_retry_wait else None

    def after_error(self, attempt: int, exc: httpx.TransportError, *, replayable: bool) -> float | None:
        """Seconds to wait before retrying after a transport error, or None to raise it.

        A connection that was never established sent nothing, so any request may be retried; after that a
        retry could repeat a side effect, so only reads and requests carrying an Idempotency-Key are retried.
        """
        if attempt >= self.max_retries:
            return None
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) or replayable:
            return _backoff(attempt)
        return None


def decode_json(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content) if response.content else None
    except ValueError:
        return None


def error_from(response: httpx.Response) -> APIError:
    """The typed exception for an error answer whose body has been read."""
    body = decode_json(response)
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message = body["error"]
    elif isinstance(body, dict) and isinstance(body.get("detail"), str):
        message = body["detail"]
    else:
        message = response.text[:500] or response.reason_phrase
    return error_for(
        response.status_code,
        message,
        response.headers,
        body,
        parse_retry_after(response.headers.get("retry-after")),
    )


def check(response: httpx.Response) -> Any:
    """The JSON body of a successful answer; raises the typed error of any other."""
    if response.is_success:
        return decode_json(response)
    raise error_from(response)


def task_from(response: httpx.Response) -> Task:
    body = check(response)
    if not isinstance(body, dict) or "id" not in body:
        raise APIError("the answer is not a task object", status_code=response.status_code, body=body)
    replayed = response.headers.get(REPLAYED_HEADER, "").lower() == "true"
    return Task.from_json(body, replayed=replayed)


def list_params(status: str | None, page_size: int | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if page_size is not None:
        params["limit"] = str(page_size)
    if status is not None:
        params["status"] = status
    return params


def page_of(response: httpx.Response) -> tuple[list[Task], dict[str, str] | None]:
    """The tasks of one list page and the query of the next page (None on the last).

    Only the ``next`` link's query is followed, against the client's own base URL: a server behind a proxy
    may not know the address its clients reach it by.
    """
    body = check(response)
    if not isinstance(body, dict) or not isinstance(body.get("results"), list):
        raise APIError("the answer is not a task list", status_code=response.status_code, body=body)
    tasks = [Task.from_json(item) for item in body["results"] if isinstance(item, dict)]
    next_url = body.get("next")
    if not isinstance(next_url, str) or not next_url:
        return tasks, None
    return tasks, dict(httpx.URL(next_url).params)


def credits_from(response: httpx.Response) -> float:
    body = check(response)
    if not isinstance(body, dict) or "remaining_credits" not in body:
        raise APIError("the answer has no remaining_credits", status_code=response.status_code, body=body)
    return float(body["remaining_credits"])


@dataclass(frozen=True, slots=True)
class PollSchedule:
    """``wait`` polls at ``initial`` seconds, then each interval ``factor`` times longer, up to ``maximum``."""

    initial: float = 0.5
    factor: float = 1.5
    maximum: float = 5.0

    def next(self, interval: float) -> float:
        return min(self.maximum, interval * self.factor)


DEFAULT_POLL = PollSchedule()
