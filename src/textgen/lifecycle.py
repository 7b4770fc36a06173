"""One generation under a lease, whatever its mode.

Sync, queued and streamed generations all run here: the task is leased to this process, one heartbeat per
process renews all its leases in one statement, the upstream is timed, whatever the provider raises becomes an
``Outcome``, and the outcome is settled exactly once (the lease makes a second settlement impossible).
``Lifecycle.run`` drives a whole generation (sync and queued); a stream drives its own ``Lease`` chunk by chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable

from textgen import metrics
from textgen.capacity import Capacity, Slot
from textgen.catalog import ModelSpec, Pricing
from textgen.errors import StorageUnavailable, TextgenError, UpstreamError
from textgen.notify import Wakeups
from textgen.protocol import GenerationInput
from textgen.providers import Generation, ProviderRegistry
from textgen.providers.base import Progress
from textgen.states import CANCELLED_REASON, TaskMode, TaskStatus
from textgen.storage.queue import TaskQueue
from textgen.storage.retrying import retrying
from textgen.storage.rows import Outcome, TaskRow
from textgen.timing import add_upstream

log = logging.getLogger("textgen.lifecycle")

INTERRUPTED_STREAM = "interrupted: the server stopped while this task was streaming"
INTERRUPTED_SYNC = (
    "interrupted: the server stopped while this sync request was running; its client got an error"
)
LEASE_LOST = "lease lost"


def generation_timed_out(seconds: float) -> str:
    return f"timed out after {seconds:g} s: the generation time limit (TEXTGEN_GENERATION_TIMEOUT_SECONDS)"


def generation_input(task: TaskRow) -> GenerationInput:
    return GenerationInput.model_validate({**task.request, "model_name": task.model_name}, strict=False)


class Lease:
    """A generation in progress under this process's lease: its heartbeat, its timing, its settlement."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        task: TaskRow,
        spec: ModelSpec,
        on_lost: Callable[[], object] | None,
        slot: Slot | None = None,
    ) -> None:
        self.task = task
        self._lifecycle = lifecycle
        # The provider slot this generation holds until it stops (the worker took it when it claimed).
        self._slot = slot or lifecycle.capacity.take(spec.provider)
        self._watch = metrics.generation_started(spec.name, spec.provider)
        self._on_lost = on_lost
        self.lost = False  # another worker has taken the task over
        self.settled = False
        self.cancel_requested = False
        # Why the generation is being stopped: a cancel, or the generation time limit.
        self.stop_reason = CANCELLED_REASON
        self.timed_out = False
        # How to stop this generation when it is cancelled (set by whoever drives it).
        self.on_cancel: Callable[[], object] | None = None
        limit = lifecycle.generation_timeout
        self._time_limit = asyncio.get_running_loop().call_later(limit, self._time_up, limit)
        lifecycle.running[task.id] = self
        lifecycle.keep_leases()

    def request_cancel(self, reason: str = CANCELLED_REASON) -> None:
        """Stop the generation (once), because someone cancelled the task or for ``reason``; its driver
        settles it failed with ``stop_reason``, charged for what it produced."""
        if self.cancel_requested or self.settled:
            return
        self.cancel_requested = True
        self.stop_reason = reason
        if self.on_cancel is not None:
            self.on_cancel()

    def _time_up(self, seconds: float) -> None:
        if self.cancel_requested or self.settled:
            return
        log.warning("task %s: generation still running after %g s; stopping it", self.task.id, seconds)
        self.timed_out = True
        self.request_cancel(generation_timed_out(seconds))

    def lose(self) -> None:
        """Another worker has taken the task over: stop generating (``on_lost``); nothing will be settled."""
        if self.lost or self.settled:
            return
        self.lost = True
        log.warning("task %s: lease lost; abandoning generation", self.task.id)
        if self._on_lost is not None:
            self._on_lost()

    def first_chunk(self) -> None:
        self._watch.first_chunk()

    def elapsed(self) -> float:
        return self._watch.elapsed()

    def stop(self) -> float:
        """Stop renewing the lease and the clock (idempotent); the generation's time so far, in seconds."""
        self._time_limit.cancel()
        self._slot.give_back()
        if self._lifecycle.running.get(self.task.id) is self:
            del self._lifecycle.running[self.task.id]
        return self._watch.done()

    async def settle(self, outcome: Outcome) -> TaskRow | None:
        """Record ``outcome`` and settle credits; None when the lease was lost (nothing changes then)."""
        self.settled = True
        self.stop()
        return await self._lifecycle.finish(self.task, outcome)


class Lifecycle:
    def __init__(
        self,
        queue: TaskQueue,
        registry: ProviderRegistry,
        pricing: Pricing,
        wakeups: Wakeups,
        capacity: Capacity,
        *,
        worker_id: str,
        lease_seconds: float,
        generation_timeout: float = 600.0,
    ) -> None:
        self.queue = queue
        self.registry = registry
        self.capacity = capacity
        self.pricing = pricing
        self.wakeups = wakeups
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.generation_timeout = generation_timeout  # a generation running longer is stopped
        self.running: dict[str, Lease] = {}  # the generations this process runs, by task id
        self._keeper: asyncio.Task[None] | None = None

    def keep_leases(self) -> None:
        """Make sure the heartbeat runs while this process holds a lease."""
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(self._heartbeat(), name="textgen-leases")

    async def _heartbeat(self) -> None:
        """Every third of the lease, renew every lease this process holds in one statement (not one task and
        one write per generation); a lease another worker took is lost, a task someone asked to cancel is
        stopped (a fallback: the cancel channel is faster). Ends when no lease is held."""
        interval = max(self.lease_seconds / 3, 0.05)
        while self.running:
            await asyncio.sleep(interval)
            leases = [lease for lease in self.running.values() if not lease.lost]
            if not leases:
                continue
            try:
                held = await self.queue.renew_leases(
                    [lease.task.id for lease in leases], self.worker_id, self.lease_seconds
                )
            except StorageUnavailable as exc:
                log.warning("lease renewal of %d tasks failed (%s); will retry", len(leases), exc)
                continue
            except Exception:  # the one heartbeat of every lease must outlive any one failure
                log.exception("lease renewal of %d tasks failed; will retry", len(leases))
                continue
            for lease in leases:
                if lease.settled or self.running.get(lease.task.id) is not lease:
                    continue  # it ended while the renewal ran
                cancel_requested = held.get(lease.task.id)
                try:
                    if cancel_requested is None:
                        lease.lose()
                    elif cancel_requested:
                        lease.request_cancel()
                except Exception:
                    log.exception("task %s: stopping it after its lease renewal failed", lease.task.id)

    async def aclose(self) -> None:
        """Stop the heartbeat (shutdown: whatever still runs is released or abandoned to its lease)."""
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)

    def cancel_local(self, task_id: str, reason: str = CANCELLED_REASON) -> bool:
        """Stop ``task_id`` if this process runs it (a cancel request, from here or from another process, or
        ``reason``): it fails with that reason, charged for what it produced."""
        lease = self.running.get(task_id)
        if lease is None:
            return False
        lease.request_cancel(reason)
        return True

    def stopped(self, task: TaskRow, produced: Generation, reason: str) -> Outcome:
        """The outcome of a generation stopped before its end: failed, charged for what it produced."""
        outcome = self.outcome(task.model_name, produced, status=TaskStatus.FAILED)
        outcome.failed_reason = reason
        return outcome

    def lease(
        self,
        task: TaskRow,
        spec: ModelSpec,
        on_lost: Callable[[], object] | None = None,
        slot: Slot | None = None,
    ) -> Lease:
        """Start holding ``task`` (created or claimed leased to this process), in ``slot`` or a new one."""
        return Lease(self, task, spec, on_lost, slot)

    async def resume(self, task: TaskRow, slot: Slot | None, max_attempts: int) -> TaskRow | None:
        """Run a task the worker claimed (queued, or left behind by a process that stopped)."""
        if task.mode != TaskMode.ASYNC:
            # The client of a sync request or a stream is gone once its server stopped: nobody would read a
            # rerun, so it ends failed and charged nothing.
            reason = INTERRUPTED_STREAM if task.mode == TaskMode.STREAM else INTERRUPTED_SYNC
            return await self.finish(task, Outcome.failed(reason))
        if task.attempts > max_attempts:
            return await self.finish(
                task,
                Outcome.failed(
                    f"abandoned: claimed {task.attempts} times and never finished (each time its process "
                    f"stopped while running it); not retried past {max_attempts} attempts"
                ),
            )
        return await self.run(task, slot)

    async def run(
        self, task: TaskRow, slot: Slot | None = None, request: GenerationInput | None = None
    ) -> TaskRow | None:
        """Generate a sync or claimed task, then settle it; None when the lease was lost meanwhile.

        A claimed task comes with the provider ``slot`` the worker took for it; a sync one with its
        ``request`` as validated on the way in (a claimed one's is read back from the task)."""
        try:
            request = request or generation_input(task)
            spec, provider = self.registry.resolve(task.model_name)
        except TextgenError as exc:
            return await self.finish(task, Outcome.failed(exc.message))
        except ValueError as exc:
            return await self.finish(task, Outcome.failed(f"stored request is invalid: {exc}"))
        progress = Progress()
        generation = asyncio.ensure_future(
            provider.generate(spec, request, account=str(task.account_id), progress=progress)
        )
        lease = self.lease(task, spec, on_lost=generation.cancel, slot=slot)
        lease.on_cancel = generation.cancel
        if task.cancel_requested:
            lease.request_cancel()  # asked while its last runner held it
        try:
            outcome = self.outcome(task.model_name, await generation)
        except asyncio.CancelledError:
            if lease.cancel_requested and generation.cancelled():
                outcome = self.stopped(task, progress.generation(), lease.stop_reason)
            elif lease.lost:
                outcome = Outcome.failed(LEASE_LOST)
            else:
                raise  # cancelled from outside (shutdown, a sync timeout): the caller settles
        except Exception as exc:
            outcome = self.failure(task, exc, progress.generation())
        finally:
            add_upstream(lease.stop())
            if not generation.done():
                generation.cancel()
        return await lease.settle(outcome)

    def failure(self, task: TaskRow, exc: BaseException, produced: Generation | None = None) -> Outcome:
        """The outcome of a generation that raised ``exc`` after producing ``produced`` (if anything).

        It is charged for the tokens it used when it delivered output, or when the provider counted them
        with the failure (the local model's unusable output, an answer Gemini blocked but bills); a failure
        before the first token, with nothing reported, is charged nothing."""
        if isinstance(exc, TextgenError):
            reason = exc.message
        else:
            log.error("task %s: generation failed", task.id, exc_info=exc)
            reason = f"internal error while generating (task {task.id}, see server log)"
        usage = exc.usage if isinstance(exc, UpstreamError) else None
        produced = produced or Generation(text="")
        if usage is not None:  # the counts that came with the failure are the latest
            produced = dataclasses.replace(
                produced, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens
            )
        elif not (produced.output_tokens or produced.text or produced.function_calls):
            return Outcome.failed(reason)
        return self.stopped(task, produced, reason)

    def outcome(self, model_name: str, result: Generation, status: TaskStatus = TaskStatus.DONE) -> Outcome:
        """What a generation produced, priced by its real token counts."""
        spec = self.registry.catalog[model_name]
        return Outcome(
            status=status,
            response_text=result.text,
            function_calls=[call.as_json() for call in result.function_calls],
            finish_reason=result.finish_reason if status == TaskStatus.DONE else None,
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            cost=self.pricing.cost(spec, result.input_tokens, result.output_tokens),
        )

    async def finish(self, task: TaskRow, outcome: Outcome) -> TaskRow | None:
        """Record an outcome, retrying through short database outages; the lease makes it exactly-once."""

        def retry(exc: StorageUnavailable, attempt: int) -> None:
            log.warning("task %s: could not record outcome (%s), attempt %d", task.id, exc, attempt)

        try:
            finished = await retrying(
                lambda: self.queue.finish(
                    task, self.worker_id, outcome, notify_delivery=self.wakeups.notify_deliveries
                ),
                attempts=8,
                on_retry=retry,
            )
        except StorageUnavailable:
            log.error("task %s: outcome not recorded; its lease will expire and it will be retried", task.id)
            return None
        if finished is not None and finished.webhook_url:
            self.wakeups.delivery_queued()
        return metrics.task_finished(finished)

    async def release(self, task_id: str) -> None:
        """Give a task this process holds back to the queue (shutdown)."""
        with contextlib.suppress(StorageUnavailable):
            if await self.queue.release(task_id, self.worker_id, notify=self.wakeups.notify_tasks):
                self.wakeups.task_queued()
