"""Per-account request rate limits (the ``limits`` library; Redis-backed when configured)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string
from redis import asyncio as aioredis

from textgen.errors import RateLimited

log = logging.getLogger("textgen.ratelimit")


@dataclass(frozen=True, slots=True)
class Quota:
    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }


class RateLimiter:
    """A one-minute sliding window per account (O(1) per hit: two counters, not one entry per request).

    Falls back to a per-process window if Redis fails.
    """

    def __init__(self, redis_url: str | None = None, *, retry_seconds: float = 1.0) -> None:
        self._local = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._shared: SlidingWindowCounterRateLimiter | None = None
        self.degraded_reason: str | None = None
        # While Redis is down, try it again at most this often, so requests do not each wait on it.
        self._retry_seconds = retry_seconds
        self._retry_at = 0.0
        self._pool: aioredis.ConnectionPool | None = None
        if redis_url:
            uri = redis_url.replace("redis://", "async+redis://", 1).replace(
                "rediss://", "async+rediss://", 1
            )
            # Our own pool, so aclose() can close its connections.
            self._pool = aioredis.ConnectionPool.from_url(
                redis_url, socket_timeout=0.5, socket_connect_timeout=0.5
            )
            # redis-py is the installed client; limits defaults to coredis, which is not a dependency.
            # (limits passes connection_pool through to redis-py; its annotation only lists scalars.)
            storage = storage_from_string(
                uri,
                implementation="redispy",
                connection_pool=self._pool,  # type: ignore[arg-type]
            )
            assert isinstance(storage, Storage)
            self._shared = SlidingWindowCounterRateLimiter(storage)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()

    @property
    def shared(self) -> bool:
        """Whether limits are meant to be shared through Redis."""
        return self._shared is not None

    async def ping(self) -> None:
        """Raise unless the configured Redis answers a PING (nothing to check without one)."""
        if self._pool is not None:
            await aioredis.Redis(connection_pool=self._pool).ping()

    @property
    def backend(self) -> str:
        if self._shared is None:
            return "memory"
        return "memory (redis unreachable)" if self.degraded_reason else "redis"

    async def hit(self, account_key: str, per_minute: int) -> Quota:
        """Count one request; raise RateLimited (with Retry-After) when over the limit."""
        item = RateLimitItemPerMinute(per_minute)
        allowed, remaining, reset_time = await self._window(item, account_key, count=True)
        return self._decide(allowed, item.amount, remaining, reset_time)

    async def count(self, key: str, per_minute: int) -> None:
        """Count one event (a failed authentication, say) in ``key``'s window, refusing nothing."""
        await self._window(RateLimitItemPerMinute(per_minute), key, count=True)

    async def full(self, key: str, per_minute: int) -> int | None:
        """Seconds until ``key``'s window has room again, or None when it has room now (counts nothing)."""
        allowed, _, reset_time = await self._window(RateLimitItemPerMinute(per_minute), key, count=False)
        return None if allowed else max(1, math.ceil(reset_time - time.time()))

    async def _window(self, item: RateLimitItem, key: str, *, count: bool) -> tuple[bool, int, float]:
        """Hit (or only test) ``key``'s window: (allowed, remaining, reset time), on Redis when it answers."""

        async def use(limiter: SlidingWindowCounterRateLimiter) -> tuple[bool, int, float]:
            allowed = await (limiter.hit(item, key) if count else limiter.test(item, key))
            stats = await limiter.get_window_stats(item, key)
            return allowed, stats.remaining, stats.reset_time

        if self._shared is not None and time.monotonic() >= self._retry_at:
            try:
                result = await use(self._shared)
            except Exception as exc:  # any storage failure: keep serving on the local window
                if self.degraded_reason is None:
                    log.error("rate limits: redis unreachable (%s); using per-process limits", exc)
                self.degraded_reason = f"{type(exc).__name__}: {exc}"
                self._retry_at = time.monotonic() + self._retry_seconds
            else:
                if self.degraded_reason:
                    log.warning("rate limits: redis reachable again, shared limits restored")
                    self.degraded_reason = None
                # Decided by the caller: a 429 is the shared limit working, not Redis failing.
                return result
        return await use(self._local)

    @staticmethod
    def _decide(allowed: bool, limit: int, remaining: int, reset_time: float) -> Quota:
        reset = max(1, math.ceil(reset_time - time.time()))
        quota = Quota(limit=limit, remaining=max(0, remaining), reset_seconds=reset)
        if not allowed:
            raise RateLimited(
                f"rate limit exceeded: {limit} requests per minute",
                headers={**quota.headers(), "Retry-After": str(reset)},
            )
        return quota
