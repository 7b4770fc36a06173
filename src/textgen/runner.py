"""Runs one claimed task through its provider and records the outcome (shared by worker and sync path)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from textgen import metrics
from textgen.catalog import Pricing
from textgen.errors import StorageUnavailable, TextgenError, UpstreamError
from textgen.protocol import GenerationInput
from textgen.providers import Generation, ProviderRegistry
from textgen.providers.base import current_account
from textgen.storage.store import Outcome, Store, TaskRow
from textgen.timing import add_upstream

log = logging.getLogger("textgen.runner")

INTERRUPTED_STREAM = "interrupted: the server stopped while this task was streaming"


def generation_input(task: TaskRow) -> GenerationInput:
    return GenerationInput.model_validate({**task.request, "model_name": task.model_name}, strict=False)


async def hold_lease(
    store: Store,
    task_id: str,
    worker_id: str,
    lease_seconds: float,
    on_lost: Callable[[], object] | None = None,
) -> None:
    """Renew a task's lease until cancelled; ``on_lost`` runs if another worker has taken the task over."""
    interval = max(lease_seconds / 3, 0.05)
    while True:
        await asyncio.sleep(interval)
        try:
            held = await store.renew_lease(task_id, worker_id, lease_seconds)
        except StorageUnavailable as exc:
            log.warning("task %s: lease renewal failed (%s); will retry", task_id, exc)
            continue
        if not held:
            log.warning("task %s: lease lost; abandoning generation", task_id)
            if on_lost is not None:
                on_lost()
            return


class Runner:
    def __init__(
        self, store: Store, registry: ProviderRegistry, pricing: Pricing, lease_seconds: float
    ) -> None:
        self.store = store
        self.registry = registry
        self.pricing = pricing
        self.lease_seconds = lease_seconds

    async def run(self, task: TaskRow, worker_id: str) -> TaskRow | None:
        """Generate, then finish the task; None when the lease was lost to another worker meanwhile."""
        if task.mode == "stream":
            # The client of a stream is gone once its server stopped; nobody would read a rerun.
            return await self.finish(
                task.id, worker_id, Outcome(status="failed", failed_reason=INTERRUPTED_STREAM)
            )
        outcome = await self._generate(task, worker_id)
        return await self.finish(task.id, worker_id, outcome)

    async def _generate(self, task: TaskRow, worker_id: str) -> Outcome:
        try:
            request = generation_input(task)
            spec, provider = self.registry.resolve(task.model_name)
        except TextgenError as exc:
            return Outcome(status="failed", failed_reason=exc.message)
        except ValueError as exc:
            return Outcome(status="failed", failed_reason=f"stored request is invalid: {exc}")
        # The generation runs in a copy of this context: providers queue fairly by the account set here.
        current_account.set(str(task.account_id))
        generation = asyncio.ensure_future(provider.generate(spec, request))
        heartbeat = asyncio.ensure_future(
            hold_lease(self.store, task.id, worker_id, self.lease_seconds, on_lost=generation.cancel)
        )
        watch = metrics.generation_started(spec.name, spec.provider)
        try:
            result: Generation = await generation
        except asyncio.CancelledError:
            if generation.cancelled() and not heartbeat.done():
                raise
            return Outcome(status="failed", failed_reason="lease lost")
        except UpstreamError as exc:
            return Outcome(status="failed", failed_reason=exc.message)
        except TextgenError as exc:
            return Outcome(status="failed", failed_reason=exc.message)
        except Exception:
            log.exception("task %s: generation failed", task.id)
            return Outcome(
                status="failed",
                failed_reason=f"internal error while generating (task {task.id}, see server log)",
            )
        finally:
            add_upstream(watch.done())
            heartbeat.cancel()
            if not generation.done():
                generation.cancel()
        return self.outcome(task.model_name, result)

    def outcome(self, model_name: str, result: Generation) -> Outcome:
        spec = self.registry.catalog[model_name]
        return Outcome(
            status="done",
            response_text=result.text,
            function_calls=[call.as_json() for call in result.function_calls],
            finish_reason=result.finish_reason,
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            cost=self.pricing.cost(spec, result.input_tokens, result.output_tokens),
        )

    async def finish(self, task_id: str, worker_id: str, outcome: Outcome) -> TaskRow | None:
        """Record an outcome, retrying through short database outages; the lease makes it exactly-once."""
        delay = 0.2
        for attempt in range(8):
            try:
                return metrics.task_finished(await self.store.finish_task(task_id, worker_id, outcome))
            except StorageUnavailable as exc:
                log.warning("task %s: could not record outcome (%s), attempt %d", task_id, exc, attempt + 1)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.error("task %s: outcome not recorded; its lease will expire and it will be retried", task_id)
        return None

    async def release(self, task_id: str, worker_id: str) -> None:
        with contextlib.suppress(StorageUnavailable):
            await self.store.release_task(task_id, worker_id)
