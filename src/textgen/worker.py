"""The task worker: claims pending tasks (and tasks whose lease expired) and runs them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid

from textgen.errors import StorageUnavailable
from textgen.runner import Runner
from textgen.storage.store import Store, TaskRow

log = logging.getLogger("textgen.worker")


def new_worker_id(kind: str = "w") -> str:
    return f"{kind}-{socket.gethostname()[:20]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Worker:
    def __init__(
        self,
        store: Store,
        runner: Runner,
        *,
        worker_id: str,
        concurrency: int,
        poll_seconds: float,
        lease_seconds: float,
    ) -> None:
        self.store = store
        self.runner = runner
        self.worker_id = worker_id
        self.concurrency = concurrency
        self.poll_seconds = poll_seconds
        self.lease_seconds = lease_seconds
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: dict[str, asyncio.Task[TaskRow | None]] = {}
        self.completed = 0

    def notify(self) -> None:
        """Wake the claim loop (a task was just queued)."""
        self._wake.set()

    async def run(self, *, burst: bool = False) -> None:
        """Claim and run tasks until stopped; with ``burst``, return once the queue is empty."""
        slots = asyncio.Semaphore(self.concurrency)
        while not self._stopping:
            await slots.acquire()
            if self._stopping:
                slots.release()
                break
            try:
                task = await self.store.claim_task(self.worker_id, self.lease_seconds)
            except StorageUnavailable as exc:
                slots.release()
                log.warning("worker: cannot claim (%s); retrying", exc)
                await self._sleep()
                continue
            if task is None:
                slots.release()
                if burst:
                    if not self._inflight:
                        break
                    await asyncio.wait(list(self._inflight.values()), return_when=asyncio.FIRST_COMPLETED)
                    continue
                await self._sleep()
                continue
            if self._stopping:
                # stop() began while this claim was in flight; it does not wait for this task, so give it back.
                slots.release()
                await self.runner.release(task.id, self.worker_id)
                break
            running = asyncio.create_task(self.runner.run(task, self.worker_id), name=f"task-{task.id}")
            self._inflight[task.id] = running
            running.add_done_callback(functools.partial(self._done, task.id, slots=slots))
        if burst and self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    def _done(self, task_id: str, task: asyncio.Task[TaskRow | None], *, slots: asyncio.Semaphore) -> None:
        self._inflight.pop(task_id, None)
        slots.release()
        self.completed += 1
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s: runner crashed", task_id, exc_info=task.exception())
        self._wake.set()

    async def _sleep(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
        self._wake.clear()

    async def stop(self, grace_seconds: float) -> None:
        """Stop claiming; let in-flight tasks finish within ``grace_seconds``, then give the rest back."""
        self._stopping = True
        self._wake.set()
        if not self._inflight:
            return
        pending = list(self._inflight.items())
        _, still = await asyncio.wait([t for _, t in pending], timeout=grace_seconds)
        for task_id, task in pending:
            if task in still:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await self.runner.release(task_id, self.worker_id)
                log.info("task %s released back to the queue on shutdown", task_id)
