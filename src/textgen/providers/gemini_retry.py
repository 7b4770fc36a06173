"""Gemini upstream failures: what each one means, whether to try again, and what the client is told."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx2
from google.genai import errors as genai_errors

from textgen.errors import UpstreamError
from textgen.providers.gemini_wire import GeminiAPIError
from textgen.retry_after import parse_retry_after

RETRYABLE_STATUSES = frozenset({429, 500, 503, 504})
# What the client of this service sees for an upstream status (anything else: 502 Bad Gateway).
_CLIENT_STATUS = {400: 400, 413: 413, 429: 429, 503: 503, 504: 504}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
# aiohttp carries generateContent; httpx2 is the google-genai SDK's transport (the File API).
_TRANSPORT_ERRORS = (aiohttp.ClientError, httpx2.TransportError, ConnectionError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    budget_seconds: float
    initial_delay: float = 1.0
    max_delay: float = 30.0
    jitter: float = 0.5  # the share of each backoff that is randomised


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """One failed attempt, reduced to what the retry decision and the error message need."""

    status: int | None  # HTTP status; None when no answer came (connection error, timeout)
    description: str
    retry_after: float | None = None  # seconds, from RetryInfo.retryDelay or Retry-After
    # A 400 about this service rather than the request: its key (API_KEY_INVALID) or where it runs
    # (FAILED_PRECONDITION). Its client is not told that its request was bad.
    gateway_fault: bool = False


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    delay: float = 0.0
    reason: str = ""


def decide(
    failure: UpstreamFailure,
    attempts: int,
    elapsed: float,
    policy: RetryPolicy,
    rand: Callable[[], float] = random.random,
) -> RetryDecision:
    """Whether to try again after ``attempts`` attempts that took ``elapsed`` seconds, and after how long."""
    if failure.status is not None and failure.status not in RETRYABLE_STATUSES:
        return RetryDecision(False, reason="not retryable")
    if attempts >= policy.max_attempts:
        return RetryDecision(False, reason=f"gave up after {attempts} attempts")
    backoff = min(policy.max_delay, policy.initial_delay * 2 ** (attempts - 1))
    delay = backoff * (1 - policy.jitter) + backoff * policy.jitter * rand()
    if failure.retry_after is not None:
        delay = max(delay, failure.retry_after)
    if elapsed + delay > policy.budget_seconds:
        return RetryDecision(
            False,
            reason=f"gave up after {attempts} attempts: the next try would pass the "
            f"{policy.budget_seconds:g} s retry budget",
        )
    return RetryDecision(True, delay=delay)


def parse_duration(value: Any) -> float | None:
    """A protobuf JSON Duration such as ``"22s"`` or ``"0.5s"``, in seconds."""
    if not isinstance(value, str):
        return None
    match = _DURATION.match(value)
    return float(match.group(1)) if match else None


def classify(exc: BaseException) -> UpstreamFailure | None:
    """Turn an upstream answer or a transport exception into a failure; None for other exceptions."""
    if isinstance(exc, GeminiAPIError):
        return _failure(exc.code, exc.status, exc.message, exc.details, exc.retry_after_header)
    if isinstance(exc, genai_errors.APIError):
        return _sdk_failure(exc)
    if isinstance(exc, (httpx2.TimeoutException, TimeoutError)):
        return UpstreamFailure(None, f"Gemini did not answer in time ({type(exc).__name__})")
    if isinstance(exc, _TRANSPORT_ERRORS):
        detail = str(exc) or type(exc).__name__
        return UpstreamFailure(None, f"could not reach Gemini: {detail}")
    return None


def _failure(
    code: int, status: str, message: str, details: list[Any], retry_after_header: str | None
) -> UpstreamFailure:
    """One error answer: its RetryInfo.retryDelay (a Duration such as "38.601s") wins over Retry-After."""
    retry_after = None
    gateway_fault = status == "FAILED_PRECONDITION"
    for detail in details:
        if not isinstance(detail, dict):
            continue
        kind = str(detail.get("@type", ""))
        if kind.endswith("google.rpc.RetryInfo"):
            retry_after = parse_duration(detail.get("retryDelay"))
        elif kind.endswith("google.rpc.ErrorInfo") and detail.get("reason") == "API_KEY_INVALID":
            gateway_fault = True  # a wrong or expired key is a 400 INVALID_ARGUMENT too
    if retry_after is None:
        retry_after = parse_retry_after(retry_after_header)
    named = f" {status}" if status else ""
    description = f"Gemini answered {code}{named}: {message or '(no message)'}"
    return UpstreamFailure(code, description, retry_after, gateway_fault)


def _sdk_failure(exc: genai_errors.APIError) -> UpstreamFailure:
    """An error of the SDK's File API calls."""
    details = exc.details.get("error", exc.details) if isinstance(exc.details, dict) else {}
    listed = details.get("details") if isinstance(details, dict) else None
    headers = getattr(getattr(exc, "response", None), "headers", None)
    return _failure(
        int(exc.code) if exc.code else 0,
        exc.status or "",
        exc.message or "",
        listed if isinstance(listed, list) else [],
        headers.get("retry-after") if headers is not None else None,
    )


def client_status(failure: UpstreamFailure) -> int:
    """The HTTP status this service answers with for an upstream failure."""
    if failure.status is None:
        return 504 if "in time" in failure.description else 502
    if failure.gateway_fault:
        return 502
    return _CLIENT_STATUS.get(failure.status, 502)


def to_error(failure: UpstreamFailure, decision: RetryDecision | None = None) -> UpstreamError:
    """The exception that fails the task (or answers the stream request) for a final failure."""
    message = failure.description
    if decision is not None and decision.reason and decision.reason != "not retryable":
        message = f"{message} ({decision.reason})"
    return UpstreamError(
        message,
        status_code=client_status(failure),
        retryable=failure.status is None or failure.status in RETRYABLE_STATUSES,
        retry_after=failure.retry_after,
    )
