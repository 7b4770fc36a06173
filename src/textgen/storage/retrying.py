"""Retrying a storage operation through a short database outage."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from textgen.errors import StorageUnavailable

T = TypeVar("T")


async def retrying(
    operation: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    on_retry: Callable[[StorageUnavailable, int], object],
    first_delay: float = 0.2,
    max_delay: float = 5.0,
) -> T:
    """Run ``operation``, retrying ``StorageUnavailable`` with doubling delays; the last failure is raised."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return await operation()
        except StorageUnavailable as exc:
            if attempt == attempts:
                raise
            on_retry(exc, attempt)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")
