"""The task worker: claims pending tasks (and tasks whose lease expired) for providers with room, and runs them.

Each provider says how many generations it runs at once (``Provider.capacity``); sync requests and streams
hold slots of the same ``Capacity``. The worker claims, in one statement per provider, at most as many tasks
as that provider has free slots, so a burst for one provider never holds back another's and a process
never leases tasks it cannot start (another process may run them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

from textgen.capacity import Capacity, Slot
from textgen.claimloop import ClaimLoop
from textgen.errors import StorageUnavailable
from textgen.lifecycle import Lifecycle
from textgen.storage.queue import TaskQueue
from textgen.storage.rows import TaskRow

log = logging.getLogger("textgen.worker")

# Tasks of a model no provider serves (the catalog changed) are claimed now and then, and fail at once.
_ORPHAN_BATCH = 16


def new_worker_id(kind: str = "w") -> str:
    return f"{kind}-{socket.gethostname()[:20]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Worker(ClaimLoop[TaskRow]):
    def __init__(
        self,
        queue: TaskQueue,
        lifecycle: Lifecycle,
        *,
        models: dict[str, list[str]],
        max_tasks: int | None,
        batch: int,
        max_attempts: int,
        poll_seconds: float,
        wake: asyncio.Event,
        claim_interval: float = 0.0,
        hints: Callable[[], set[str]] | None = None,
    ) -> None:
        """``models``: the models of each provider; ``max_tasks`` optionally caps the queued tasks this
        process runs at once, whatever the providers' room; ``batch`` is the most tasks one claim takes."""
        self.capacity_of: Capacity = lifecycle.capacity
        total = sum(self.capacity_of.limits.values())
        super().__init__(
            name="task",
            capacity=min(total, max_tasks) if max_tasks else total,
            poll_seconds=poll_seconds,
            wake=wake,
            log=log,
            claim_interval=claim_interval,
        )
        self.queue = queue
        self.lifecycle = lifecycle
        self.worker_id = lifecycle.worker_id
        self.models = models
        self.batch = batch
        self.max_attempts = max_attempts
        self._known_models = sorted(name for names in models.values() for name in names)
        self._slots: dict[str, Slot] = {}
        self._orphans_at = 0.0
        # Which providers wake-ups named since the last claim ("" for any), and since when a provider's last
        # claim found nothing more to take: such a provider is asked again only when a wake-up names it
        # (or any provider), or once a poll interval has passed.
        self._hints = hints or (lambda: {""})
        self._quiet: dict[str, float] = {}

    @property
    def concurrency(self) -> int:
        return self.capacity

    def room(self) -> int:
        free = sum(self.capacity_of.room(provider) for provider in self.models)
        return min(free, self.capacity - self.inflight)

    async def claim(self, room: int) -> list[TaskRow]:
        claimed: list[TaskRow] = []
        drained = True
        hints = self._hints()
        now = time.monotonic()
        for provider, names in self.models.items():
            quiet = self._quiet.get(provider)
            if quiet is not None and now - quiet < self.poll_seconds and not hints & {"", provider}:
                continue  # nothing was left last time, and nothing was queued for it since
            want = min(self.capacity_of.room(provider), room - len(claimed), self.batch)
            if want <= 0:
                drained = False  # no room for this provider: a finished generation makes some
                continue
            tasks = await self.queue.claim_batch(
                self.worker_id, self.lifecycle.lease_seconds, limit=want, models=names
            )
            if len(tasks) < want:
                self._quiet[provider] = now
            else:
                drained = False
                self._quiet.pop(provider, None)
            for task in tasks:
                self._slots[task.id] = self.capacity_of.take(provider)
            claimed += tasks
        self.drained = drained
        # Wake when a sync request or a stream frees a slot of a provider that had none.
        self.capacity_of.wanted = any(self.capacity_of.room(provider) == 0 for provider in self.models)
        if room > len(claimed) and now - self._orphans_at >= self.poll_seconds:
            self._orphans_at = now
            try:
                claimed += await self.queue.claim_batch(
                    self.worker_id,
                    self.lifecycle.lease_seconds,
                    limit=min(_ORPHAN_BATCH, room - len(claimed)),
                    other_models=self._known_models,
                )
            except StorageUnavailable:
                if not claimed:
                    raise
        return claimed

    def key(self, item: TaskRow) -> str:
        return item.id

    async def handle(self, item: TaskRow) -> TaskRow | None:
        slot = self._slots.pop(item.id, None)
        try:
            return await self.lifecycle.resume(item, slot, self.max_attempts)
        finally:
            if slot is not None:
                slot.give_back()

    async def give_back(self, keys: list[str]) -> None:
        for task_id in keys:
            slot = self._slots.pop(task_id, None)
            if slot is not None:
                slot.give_back()
            await self.lifecycle.release(task_id)
            log.info("task %s released back to the queue on shutdown", task_id)
