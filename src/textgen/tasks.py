"""The task service: admission (model, features, credits), creation, sync execution, reads and redelivery."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from textgen import metrics
from textgen.catalog import ModelSpec, Pricing
from textgen.errors import BadRequest, Conflict, ServiceUnavailable, TextgenError
from textgen.lifecycle import Lifecycle
from textgen.notify import Wakeups
from textgen.protocol import GenerationInput, TextGenRequest
from textgen.providers import Provider, ProviderRegistry
from textgen.states import CANCELLED_REASON, Cancellation, TaskMode, TaskStatus
from textgen.storage.outbox import Outbox
from textgen.storage.queue import TaskQueue
from textgen.storage.rows import AccountRow, Cursor, DeliveryHistory, Outcome, TaskRow
from textgen.webhooks.addresses import AddressPolicy, RefusedDestination

log = logging.getLogger("textgen.tasks")

_STORED_EXCLUDE = {"model_name", "sync", "webhook_url"}
# How long a cancel request waits for the process running the task to stop and settle it.
CANCEL_WAIT_SECONDS = 10.0


def encode_cursor(task: TaskRow) -> str:
    raw = f"{task.created_at.isoformat()}|{task.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(value: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        stamp, task_id = raw.split("|", 1)
        created = dt.datetime.fromisoformat(stamp)
        if created.tzinfo is None or len(task_id) > 64:
            raise ValueError
        # In UTC here: an offset that pushes the stamp past year 9999 (or before 1) is not a cursor we made.
        return Cursor(created_at=created.astimezone(dt.UTC), id=task_id)
    except (ValueError, OverflowError) as exc:
        raise BadRequest("cursor: invalid pagination cursor") from exc


@dataclass(frozen=True, slots=True)
class Admission:
    spec: ModelSpec
    provider: Provider
    reserve: int  # the worst-case cost, in micro-credits


class TaskService:
    def __init__(
        self,
        queue: TaskQueue,
        outbox: Outbox,
        registry: ProviderRegistry,
        pricing: Pricing,
        lifecycle: Lifecycle,
        wakeups: Wakeups,
        webhook_policy: AddressPolicy,
        *,
        sync_timeout: float,
        max_redeliveries: int,
    ) -> None:
        self.queue = queue
        self.outbox = outbox
        self.registry = registry
        self.pricing = pricing
        self.lifecycle = lifecycle
        self.wakeups = wakeups
        self.webhook_policy = webhook_policy  # refuses webhook URLs that reach private addresses
        self.sync_timeout = sync_timeout
        self.max_redeliveries = max_redeliveries

    async def admit(self, request: GenerationInput) -> Admission:
        """Check model and features, and price the worst case to reserve.

        A refusal is the TextgenError it raised (a 4xx); any other failure in here (a defect in a provider's
        check or token count, or in pricing) is logged and becomes a 503 before anything is reserved."""
        try:
            spec, provider = await self.registry.admit(request)
            input_estimate = provider.count_input_tokens(spec, request)
            max_output = request.config.max_output_tokens or spec.default_output_tokens
            return Admission(spec, provider, self.pricing.cost(spec, input_estimate, max_output))
        except TextgenError:
            raise
        except Exception as exc:
            log.error("admitting a request for model %r failed", request.model_name, exc_info=exc)
            raise ServiceUnavailable(
                f"could not admit this request for model {request.model_name!r}; the failure is logged, "
                "try again later"
            ) from exc

    @staticmethod
    def stored_request(request: GenerationInput) -> dict[str, Any]:
        return request.model_dump(mode="json", exclude=_STORED_EXCLUDE, exclude_none=True)

    async def open_task(
        self,
        account: AccountRow,
        request: GenerationInput,
        mode: TaskMode,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[TaskRow, Admission]:
        """Admit the request, reserve its worst case and create its task: queued (async), or running and
        leased to this process (sync, stream)."""
        admission = await self.admit(request)
        if webhook_url:
            try:
                await self.webhook_policy.check_url(webhook_url)
            except RefusedDestination as exc:
                raise BadRequest(f"webhook_url: {exc}") from None
        queued = mode == TaskMode.ASYNC
        task = await self.queue.create(
            account_id=account.id,
            model_name=request.model_name,
            mode=mode,
            request=self.stored_request(request),
            webhook_url=webhook_url,
            reserve=admission.reserve,
            lease_owner=None if queued else self.lifecycle.worker_id,
            lease_seconds=self.lifecycle.lease_seconds,
            notify=queued and self.wakeups.notify_tasks,
            provider=admission.spec.provider,
            idempotency_key=idempotency_key,
        )
        if queued:
            self.wakeups.task_queued(admission.spec.provider)
        return task, admission

    async def create(
        self, account: AccountRow, request: TextGenRequest, idempotency_key: str | None = None
    ) -> TaskRow:
        """Create a task; a sync one is run here and returned finished."""
        mode = TaskMode.SYNC if request.sync else TaskMode.ASYNC
        task, _ = await self.open_task(account, request, mode, request.webhook_url, idempotency_key)
        if mode == TaskMode.ASYNC:
            return task
        # Shielded: a client that hangs up does not abandon a generation it has been charged for.
        run = asyncio.ensure_future(self._run_sync(task, request))
        finished = await asyncio.shield(run)
        return finished or await self.queue.get(task.id)

    async def _run_sync(self, task: TaskRow, request: GenerationInput) -> TaskRow | None:
        run = asyncio.ensure_future(self.lifecycle.run(task, request=request))
        done, _ = await asyncio.wait({run}, timeout=self.sync_timeout)
        if run in done:
            return run.result()
        reason = f"timed out after {self.sync_timeout:g} s"
        if self.lifecycle.cancel_local(task.id, reason):
            return await run  # stopped as a cancel is, and charged for what it produced
        run.cancel()  # not started yet: nothing was produced
        await asyncio.wait({run})
        return await self.lifecycle.finish(task, Outcome.failed(reason))

    async def get(self, account: AccountRow, task_id: str) -> TaskRow:
        return await self.queue.get(task_id, account.id)

    async def page(
        self,
        account: AccountRow,
        *,
        limit: int,
        status: TaskStatus | None,
        cursor: str | None,
        size: Callable[[TaskRow], int] | None = None,
        max_bytes: int = 0,
    ) -> tuple[list[TaskRow], str | None, str | None]:
        """A page of tasks, newest first, with cursors for the next (older) and previous (newer) pages.

        With ``size``, the page ends before the task that would take it past ``max_bytes`` (it always holds
        the task nearest the cursor), and the cursor in the paging direction continues from there."""
        after = before = None
        if cursor:
            direction, _, value = cursor.partition(":")
            if direction not in ("n", "p"):
                raise BadRequest("cursor: invalid pagination cursor")
            if direction == "n":
                after = decode_cursor(value)
            else:
                before = decode_cursor(value)
        rows, more = await self.queue.list(account.id, limit=limit, status=status, after=after, before=before)
        if not rows:
            return rows, None, None
        if size is not None:
            nearest_first = rows if before is None else rows[::-1]
            kept: list[TaskRow] = []
            used = 0
            for row in nearest_first:
                used += size(row)
                if kept and used > max_bytes:
                    more = True
                    break
                kept.append(row)
            rows = kept if before is None else kept[::-1]
        has_older = more if before is None else True
        has_newer = more if before is not None else after is not None
        next_cursor = f"n:{encode_cursor(rows[-1])}" if has_older else None
        prev_cursor = f"p:{encode_cursor(rows[0])}" if has_newer else None
        return rows, next_cursor, prev_cursor

    async def cancel(self, account: AccountRow, task_id: str) -> TaskRow:
        """Cancel a task of ``account``. A pending one ends at once, charged nothing; a running one (in any
        process) is stopped and charged for what it produced. Either ends failed, "cancelled", and its
        webhook is sent as for any failure. A finished task is a Conflict and changes nothing."""
        state, task = await self.queue.cancel(
            task_id,
            account.id,
            Outcome.failed(CANCELLED_REASON),
            notify_delivery=self.wakeups.notify_deliveries,
        )
        if state == Cancellation.FINISHED:
            raise Conflict(f"task {task.id} has already finished ({task.status}); nothing was changed")
        if state == Cancellation.CANCELLED:
            if task.webhook_url:
                self.wakeups.delivery_queued()
            return metrics.task_finished(task)
        self.lifecycle.cancel_local(task.id)  # another process hears of it on the cancel channel
        # Its runner stops it within a token (or a chunk) and settles it; answer with the settled task.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT_SECONDS
        while not task.status.finished and loop.time() < deadline:
            await asyncio.sleep(0.05)
            task = await self.queue.get(task.id)
        return task

    async def deliveries(self, account: AccountRow, task_id: str) -> tuple[TaskRow, list[DeliveryHistory]]:
        """A task of ``account`` and its webhook deliveries."""
        task = await self.get(account, task_id)
        return task, await self.outbox.history(task.id)

    async def redeliver(self, account: AccountRow, task_id: str) -> DeliveryHistory:
        """Queue a new delivery (a new webhook-id) of a finished task's payload to its webhook_url, at most
        ``max_redeliveries`` times per task (a Conflict past that)."""
        task = await self.get(account, task_id)
        if not task.status.finished:
            raise BadRequest(f"task {task.id} is {task.status}; only finished tasks can be redelivered")
        if not task.webhook_url:
            raise BadRequest(f"task {task.id} has no webhook_url")
        delivery_id = await self.outbox.redeliver(
            task_id=task.id,
            account_id=task.account_id,
            url=task.webhook_url,
            payload=self.queue.payload(task),
            notify=self.wakeups.notify_deliveries,
            limit=self.max_redeliveries,
        )
        if delivery_id is None:
            raise Conflict(
                f"task {task.id} has been redelivered {self.max_redeliveries} times, the most a task may be; "
                "its deliveries and their attempts are listed at GET .../webhooks/"
            )
        self.wakeups.delivery_queued()
        return next(h for h in await self.outbox.history(task.id) if h.delivery.id == delivery_id)
