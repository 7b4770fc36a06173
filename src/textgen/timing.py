"""Per-request timing: how much of a request's time was spent waiting on the model provider."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(slots=True)
class RequestTiming:
    upstream_seconds: float = 0.0


current_timing: ContextVar[RequestTiming | None] = ContextVar("textgen_request_timing", default=None)


def add_upstream(seconds: float) -> None:
    timing = current_timing.get()
    if timing is not None:
        timing.upstream_seconds += seconds
