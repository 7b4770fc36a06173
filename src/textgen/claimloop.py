"""The loop shared by the task worker and the webhook sender: claim while there is room, run, sleep.

Each item claimed runs as its own asyncio task; when nothing is claimable the loop sleeps until woken (work
was queued, an item finished) or until its next poll. Stopping lets what runs finish within a grace period,
cancels the rest and hands it back to the subclass.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Generic, TypeVar

from textgen.errors import StorageUnavailable

T = TypeVar("T")


class ClaimLoop(Generic[T]):
    def __init__(
        self,
        *,
        name: str,
        capacity: int,
        poll_seconds: float,
        wake: asyncio.Event,
        log: logging.Logger,
        claim_interval: float = 0.0,
    ) -> None:
        self.name = name
        # The least time between two claims: wake-ups within it (on PostgreSQL every process hears of every
        # task and delivery queued) share one claim instead of each running its own.
        self.claim_interval = claim_interval
        self._last_claim = -float("inf")
        self.capacity = capacity
        self.poll_seconds = poll_seconds
        self._wake = wake
        self._log = log
        self._stopping = False
        self._inflight: dict[str, asyncio.Task[object]] = {}
        self.completed = 0
        # Set by ``claim`` when it found less work than it had room for, and nothing it passed over: until
        # work is queued again (a wake-up) or the next poll, a finished item need not trigger another claim.
        self.drained = False
        self.claims = 0  # claim statements run (for tests and metrics)

    # ---- what a subclass provides ---------------------------------------------------------------

    async def claim(self, room: int) -> list[T]:
        """Take up to ``room`` items of work (each leased or locked to this process), and set ``drained``
        when there was no more to take."""
        raise NotImplementedError

    def key(self, item: T) -> str:
        raise NotImplementedError

    async def handle(self, item: T) -> object:
        raise NotImplementedError

    async def give_back(self, keys: list[str]) -> None:
        """Return claimed work that will not be finished here (stopping) to the queue."""
        raise NotImplementedError

    def room(self) -> int:
        """How many more items this process can take now."""
        return self.capacity - len(self._inflight)

    def poll_timeout(self) -> float:
        """How long to sleep when nothing is claimable (at most the poll interval)."""
        return self.poll_seconds

    # ---- the loop -------------------------------------------------------------------------------

    def notify(self) -> None:
        """Wake the loop (work was just queued in this process)."""
        self._wake.set()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def run(self, *, burst: bool = False) -> None:
        """Claim and run until stopped; with ``burst``, return once nothing is claimable or running."""
        self._stopping = False
        loop = asyncio.get_running_loop()
        while not self._stopping:
            pause = self._last_claim + self.claim_interval - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            self._wake.clear()
            room = self.room()
            claimed: list[T] = []
            if room > 0:
                try:
                    self.claims += 1
                    self._last_claim = loop.time()
                    claimed = await self.claim(room)
                except StorageUnavailable as exc:
                    self._log.warning("%s: cannot claim (%s); retrying", self.name, exc)
            if self._stopping:
                # stop() began while this claim was in flight; it does not wait for these, so give them back.
                if claimed:
                    await self.give_back([self.key(item) for item in claimed])
                break
            for item in claimed:
                key = self.key(item)
                running = asyncio.create_task(self.handle(item), name=f"{self.name}-{key}")
                self._inflight[key] = running
                running.add_done_callback(functools.partial(self._done, key))
            if claimed and self.room() > 0:
                continue  # more may be claimable at once
            if burst and not claimed:
                if not self._inflight:
                    return
                await asyncio.wait(list(self._inflight.values()), return_when=asyncio.FIRST_COMPLETED)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(self.poll_timeout(), 0.0))

    def _done(self, key: str, task: asyncio.Task[object]) -> None:
        self._inflight.pop(key, None)
        self.completed += 1
        if not task.cancelled() and task.exception() is not None:
            self._log.error("%s %s: crashed", self.name, key, exc_info=task.exception())
        if not self.drained:  # the queue had more than there was room for: take the next now
            self._wake.set()

    async def stop(self, grace_seconds: float) -> None:
        """Stop claiming; let what runs finish within ``grace_seconds``, then give the rest back."""
        self._stopping = True
        self._wake.set()
        if not self._inflight:
            return
        pending = dict(self._inflight)
        _, unfinished = await asyncio.wait(list(pending.values()), timeout=grace_seconds)
        for running in unfinished:
            running.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        keys = [key for key, running in pending.items() if running in unfinished]
        if keys:
            await self.give_back(keys)
