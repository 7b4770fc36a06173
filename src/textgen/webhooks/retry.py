"""The retry schedule as data: after each attempt, a decision to deliver again later or to give up."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float  # seconds until the next attempt


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


Decision = Retry | GiveUp


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """``delays[n]`` is the wait before attempt ``n + 1`` (``delays[0]``, usually 0, before the first).

    A delivery gets ``len(delays)`` attempts. Each wait is spread by ``jitter`` (a fraction, both ways)
    so receivers that come back up are not hit by every sender at once; a ``Retry-After`` answer can
    lengthen the wait up to the schedule's longest delay, never shorten it.
    """

    delays: tuple[float, ...]
    jitter: float = 0.1

    @classmethod
    def parse(cls, text: str, jitter: float = 0.1) -> RetrySchedule:
        delays = tuple(float(x) for x in text.split(",") if x.strip())
        if not delays or any(d < 0 for d in delays):
            raise ValueError("a webhook schedule needs at least one delay, none negative")
        return cls(delays=delays, jitter=jitter)

    @property
    def first_delay(self) -> float:
        return self.delays[0]

    def decide(
        self,
        attempt: int,
        status_code: int | None,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> Decision | None:
        """After failed attempt number ``attempt`` (1-based), what next; None means it was delivered."""
        if status_code is not None and 200 <= status_code < 300:
            return None
        if status_code == 410:
            return GiveUp("the receiver answered 410 Gone; no more attempts")
        if attempt >= len(self.delays):
            return GiveUp(f"gave up after {attempt} attempts")
        scheduled = self.delays[attempt]
        spread = (rng or random).uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        delay = scheduled * (1 + spread)
        if retry_after is not None:
            delay = max(delay, min(retry_after, max(self.delays)))
        return Retry(delay=delay)
