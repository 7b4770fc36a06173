"""The task worker: claims pending tasks (and tasks whose lease expired) and runs them."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from textgen.claimloop import ClaimLoop
from textgen.lifecycle import Lifecycle
from textgen.storage.queue import TaskQueue
from textgen.storage.rows import TaskRow

log = logging.getLogger("textgen.worker")


def new_worker_id(kind: str = "w") -> str:
    return f"{kind}-{socket.gethostname()[:20]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Worker(ClaimLoop[TaskRow]):
    def __init__(
        self,
        queue: TaskQueue,
        lifecycle: Lifecycle,
        *,
        concurrency: int,
        poll_seconds: float,
        wake: asyncio.Event,
    ) -> None:
        super().__init__(name="task", capacity=concurrency, poll_seconds=poll_seconds, wake=wake, log=log)
        self.queue = queue
        self.lifecycle = lifecycle
        self.worker_id = lifecycle.worker_id

    @property
    def concurrency(self) -> int:
        return self.capacity

    async def claim(self, room: int) -> list[TaskRow]:
        task = await self.queue.claim(self.worker_id, self.lifecycle.lease_seconds)
        return [task] if task is not None else []

    def key(self, item: TaskRow) -> str:
        return item.id

    async def handle(self, item: TaskRow) -> TaskRow | None:
        return await self.lifecycle.run(item)

    async def give_back(self, keys: list[str]) -> None:
        for task_id in keys:
            await self.lifecycle.release(task_id)
            log.info("task %s released back to the queue on shutdown", task_id)
