"""The task service: admission (model, features, credits), creation, sync execution and reads."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from typing import Any

from textgen.catalog import ModelSpec, Pricing, from_micro
from textgen.errors import BadRequest
from textgen.protocol import GenerationInput, TaskStatus, TextGenRequest, TextGenResponse
from textgen.providers import Provider, ProviderRegistry
from textgen.runner import Runner
from textgen.storage.store import AccountRow, Cursor, Outcome, Store, TaskRow
from textgen.webhooks.addresses import AddressPolicy, RefusedDestination

_STORED_EXCLUDE = {"model_name", "sync", "webhook_url"}


def to_response(task: TaskRow) -> TextGenResponse:
    request = task.request
    return TextGenResponse.model_validate(
        {
            "id": task.id,
            "model_name": task.model_name,
            "messages": request.get("messages", []),
            "system_instruction": request.get("system_instruction", ""),
            "config": request.get("config", {}),
            "status": task.status,
            "response_text": task.response_text,
            "response_function_calls": task.response_function_calls,
            "failed_reason": task.failed_reason,
            "credits_used": from_micro(task.credits_used),
            "input_tokens": task.input_tokens,
            "output_tokens": task.output_tokens,
            "created_at": task.created_at,
            "updated_at": task.updated_at,
        },
        strict=False,  # stored data was validated (strictly) when it came in
    )


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


class TaskService:
    def __init__(
        self,
        store: Store,
        registry: ProviderRegistry,
        pricing: Pricing,
        runner: Runner,
        *,
        worker_id: str,
        lease_seconds: float,
        sync_timeout: float,
    ) -> None:
        self.store = store
        self.registry = registry
        self.pricing = pricing
        self.runner = runner
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.sync_timeout = sync_timeout
        self.on_queued: list[Any] = []
        # Refuses webhook URLs that reach private addresses; Services loosens it per settings.
        self.webhook_policy = AddressPolicy()

    def admit(self, request: GenerationInput) -> tuple[ModelSpec, Provider, int]:
        """Check model and features; return the worst-case cost to reserve, in micro-credits."""
        spec, provider = self.registry.admit(request)
        input_estimate = provider.count_input_tokens(spec, request)
        max_output = request.config.max_output_tokens or spec.default_output_tokens
        return spec, provider, self.pricing.cost(spec, input_estimate, max_output)

    @staticmethod
    def stored_request(request: GenerationInput) -> dict[str, Any]:
        return request.model_dump(mode="json", exclude=_STORED_EXCLUDE, exclude_none=True)

    async def create(self, account: AccountRow, request: TextGenRequest) -> TaskRow:
        """Create a task; a sync one is run here and returned finished."""
        _, _, reserve = self.admit(request)
        if request.webhook_url:
            try:
                await self.webhook_policy.check_url(request.webhook_url)
            except RefusedDestination as exc:
                raise BadRequest(f"webhook_url: {exc}") from None
        if not request.sync:
            task = await self.store.create_task(
                account_id=account.id,
                model_name=request.model_name,
                mode="async",
                request=self.stored_request(request),
                webhook_url=request.webhook_url,
                reserve=reserve,
            )
            for callback in self.on_queued:
                callback()
            return task
        task = await self.store.create_task(
            account_id=account.id,
            model_name=request.model_name,
            mode="sync",
            request=self.stored_request(request),
            webhook_url=request.webhook_url,
            reserve=reserve,
            lease_owner=self.worker_id,
            lease_seconds=self.lease_seconds,
        )
        # Shielded: a client that hangs up does not abandon a generation it has been charged for.
        run = asyncio.ensure_future(self._run_sync(task))
        finished = await asyncio.shield(run)
        return finished or await self.store.get_task(task.id)

    async def _run_sync(self, task: TaskRow) -> TaskRow | None:
        try:
            return await asyncio.wait_for(self.runner.run(task, self.worker_id), self.sync_timeout)
        except TimeoutError:
            return await self.runner.finish(
                task.id,
                self.worker_id,
                Outcome(status="failed", failed_reason=f"timed out after {self.sync_timeout:g} s"),
            )

    async def get(self, account: AccountRow, task_id: str) -> TaskRow:
        return await self.store.get_task(task_id, account.id)

    async def list(
        self,
        account: AccountRow,
        *,
        limit: int,
        status: TaskStatus | None,
        cursor: str | None,
    ) -> tuple[list[TaskRow], str | None, str | None]:
        """A page of tasks, newest first, with cursors for the next (older) and previous (newer) pages."""
        after = before = None
        if cursor:
            direction, _, value = cursor.partition(":")
            if direction not in ("n", "p"):
                raise BadRequest("cursor: invalid pagination cursor")
            if direction == "n":
                after = decode_cursor(value)
            else:
                before = decode_cursor(value)
        rows, more = await self.store.list_tasks(
            account.id, limit=limit, status=status.value if status else None, after=after, before=before
        )
        if not rows:
            return rows, None, None
        has_older = more if before is None else True
        has_newer = more if before is not None else after is not None
        next_cursor = f"n:{encode_cursor(rows[-1])}" if has_older else None
        prev_cursor = f"p:{encode_cursor(rows[0])}" if has_newer else None
        return rows, next_cursor, prev_cursor
