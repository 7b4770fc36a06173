"""The long-lived objects of a process, built from settings and owned by the app's lifespan.

Everything is wired here, through constructors: storage, the providers, the one generation lifecycle,
the services the HTTP layer calls, the worker and the webhook sender, and whom to wake when work is queued.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from textgen.accounts import AccountService, Authenticator
from textgen.admin import AccountAdmin
from textgen.capacity import Capacity
from textgen.catalog import Pricing, load_catalog
from textgen.idempotency import Idempotency
from textgen.lifecycle import Lifecycle
from textgen.notify import (
    CANCEL_CHANNEL,
    DELIVERIES_CHANNEL,
    TASKS_CHANNEL,
    Listener,
    Wakeups,
    asyncpg_dsn,
)
from textgen.providers import Provider, ProviderRegistry
from textgen.ratelimit import RateLimiter
from textgen.settings import Settings
from textgen.storage import Storage
from textgen.streaming import Streams
from textgen.tasks import TaskService
from textgen.webhooks import AddressPolicy, WebhookSender
from textgen.worker import Worker, new_worker_id

log = logging.getLogger("textgen")

ProviderFactory = Callable[[Settings], dict[str, Provider]]


def default_providers(settings: Settings) -> dict[str, Provider]:
    """The providers a real server runs: the embedded model, and Gemini when a key is configured."""
    from textgen.providers.gemini import GeminiProvider
    from textgen.providers.local import LocalProvider

    return {
        "local": LocalProvider(
            settings.local_model_path,
            instances=settings.local_model_instances,
            n_ctx=settings.local_context_tokens,
            threads=settings.local_threads,
        ),
        "gemini": GeminiProvider(settings),
    }


@dataclass
class Services:
    settings: Settings
    storage: Storage
    registry: ProviderRegistry
    wakeups: Wakeups
    auth: Authenticator
    limiter: RateLimiter
    lifecycle: Lifecycle
    tasks: TaskService
    streams: Streams
    idempotency: Idempotency
    accounts: AccountService
    admin: AccountAdmin
    worker: Worker
    webhooks: WebhookSender
    worker_id: str
    background: list[asyncio.Task[None]] = field(default_factory=list)
    listener: Listener | None = None
    provider_errors: dict[str, str] = field(default_factory=dict)  # why a provider failed to open
    _sending: bool = False

    @classmethod
    def build(cls, settings: Settings, providers: dict[str, Provider]) -> Services:
        storage = Storage.open(settings)
        registry = ProviderRegistry(
            load_catalog(settings.models_file, settings.default_max_output_tokens), providers
        )
        pricing = Pricing(settings.credits_per_usd)
        wakeups = Wakeups(postgres=storage.db.is_postgres)
        capacity = Capacity(
            {name: provider.capacity() for name, provider in providers.items()}, on_free=wakeups.task_queued
        )
        models: dict[str, list[str]] = {name: [] for name in providers}
        for spec in registry.catalog.values():
            if spec.provider in models:
                models[spec.provider].append(spec.name)
        worker_id = new_worker_id("api")
        policy = AddressPolicy(
            allow_private=settings.webhook_allow_private,
            refused_ports=settings.webhook_refused_port_set,
        )
        lifecycle = Lifecycle(
            storage.tasks,
            registry,
            pricing,
            wakeups,
            capacity,
            worker_id=worker_id,
            lease_seconds=settings.lease_seconds,
            generation_timeout=settings.generation_timeout_seconds,
        )
        tasks = TaskService(
            storage.tasks,
            storage.outbox,
            registry,
            pricing,
            lifecycle,
            wakeups,
            policy,
            sync_timeout=settings.sync_timeout_seconds,
            max_redeliveries=settings.webhook_max_redeliveries,
        )
        limiter = RateLimiter(settings.redis_url)
        auth = Authenticator(
            storage.admin, settings.auth_cache_seconds, limiter, settings.auth_failures_per_minute
        )
        return cls(
            settings=settings,
            storage=storage,
            registry=registry,
            wakeups=wakeups,
            auth=auth,
            limiter=limiter,
            lifecycle=lifecycle,
            tasks=tasks,
            streams=Streams(tasks, lifecycle),
            idempotency=Idempotency(storage.idempotency, settings.idempotency_ttl_seconds),
            accounts=AccountService(storage.accounts),
            admin=AccountAdmin(
                storage,
                default_rate_limit=settings.default_rate_limit,
                webhook_secret_grace=dt.timedelta(seconds=settings.webhook_secret_grace_seconds),
                auth=auth,
            ),
            worker=Worker(
                storage.tasks,
                lifecycle,
                models=models,
                max_tasks=settings.worker_concurrency,
                batch=settings.worker_claim_batch,
                max_attempts=settings.task_max_attempts,
                poll_seconds=settings.worker_poll_seconds,
                wake=wakeups.tasks,
                claim_interval=settings.claim_interval_seconds,
                hints=wakeups.take_task_hints,
            ),
            webhooks=WebhookSender.from_settings(
                storage.outbox,
                storage.accounts,
                settings,
                worker_id=worker_id,
                policy=policy,
                wake=wakeups.deliveries,
            ),
            worker_id=worker_id,
        )

    async def open_providers(self) -> None:
        """Open every provider; one that cannot open is logged and stays unavailable."""
        for name, provider in self.registry.providers.items():
            try:
                await provider.open()
            except Exception as exc:
                log.error("provider %s failed to load: %s", name, exc)
                self.provider_errors[name] = f"failed to load: {exc}"

    async def start_worker(self) -> None:
        self.background.append(asyncio.create_task(self.worker.run(), name="textgen-worker"))
        self.start_webhooks()
        self.start_notifications()

    def start_notifications(self) -> None:
        """On PostgreSQL, LISTEN for work queued by other processes (polling remains the fallback)."""
        if not self.storage.db.is_postgres:
            return
        channels: dict[str, list[Callable[[], None]]] = {
            TASKS_CHANNEL: [self.wakeups.task_queued],
            DELIVERIES_CHANNEL: [self.wakeups.delivery_queued],
        }
        self.listener = Listener(
            asyncpg_dsn(self.settings.database_url),
            channels,
            # A task's NOTIFY names its provider, so only a worker with room for that provider claims.
            receivers={CANCEL_CHANNEL: self._cancel_requested, TASKS_CHANNEL: self.wakeups.task_queued},
        )
        self.background.append(asyncio.create_task(self.listener.run(), name="textgen-listener"))

    def _cancel_requested(self, task_id: str) -> None:
        self.lifecycle.cancel_local(task_id)

    def start_webhooks(self) -> None:
        """Run the webhook sender in this process (``textgen serve`` and ``textgen worker``)."""
        self.background.append(asyncio.create_task(self.webhooks.run(), name="textgen-webhooks"))
        # Deliveries this process queues are woken in-process: no NOTIFY that wakes every sender.
        self.wakeups.sender_started()
        self._sending = True

    async def aclose(self) -> None:
        # Both stop within the one shutdown timeout, side by side, not one after the other.
        grace = self.settings.shutdown_timeout_seconds
        if self._sending:
            self.wakeups.sender_stopped()
            self._sending = False
        await asyncio.gather(self.worker.stop(grace), self.webhooks.stop(grace))
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.lifecycle.aclose()
        await self.registry.aclose()
        await self.limiter.aclose()
        await self.storage.aclose()
