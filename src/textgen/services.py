"""The long-lived objects of a process, built from settings and owned by the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from textgen.accounts import Authenticator
from textgen.catalog import Pricing, load_catalog
from textgen.notify import DELIVERIES_CHANNEL, TASKS_CHANNEL, Listener, asyncpg_dsn
from textgen.providers import Provider, ProviderRegistry
from textgen.ratelimit import RateLimiter
from textgen.runner import Runner
from textgen.settings import Settings
from textgen.storage.engine import create_engine
from textgen.storage.store import Store
from textgen.tasks import TaskService
from textgen.webhooks import AddressPolicy, WebhookSender
from textgen.worker import Worker, new_worker_id

log = logging.getLogger("textgen")

ProviderFactory = Callable[[Settings], dict[str, Provider]]


def default_providers(settings: Settings) -> dict[str, Provider]:
    """The providers a real server runs: the embedded model, and Gemini when a key is configured."""
    from textgen.providers.local import LocalProvider

    providers: dict[str, Provider] = {
        "local": LocalProvider(
            settings.local_model_path,
            instances=settings.local_model_instances,
            n_ctx=settings.local_context_tokens,
            threads=settings.local_threads,
        )
    }
    from textgen.providers.gemini import GeminiProvider

    providers["gemini"] = GeminiProvider(settings)
    return providers


@dataclass
class Services:
    settings: Settings
    store: Store
    registry: ProviderRegistry
    auth: Authenticator
    limiter: RateLimiter
    runner: Runner
    tasks: TaskService
    worker: Worker
    worker_id: str
    background: list[asyncio.Task[None]] = field(default_factory=list)
    webhooks: WebhookSender | None = None
    listener: Listener | None = None

    @classmethod
    def build(cls, settings: Settings, providers: dict[str, Provider]) -> Services:
        store = Store(create_engine(settings))
        registry = ProviderRegistry(load_catalog(settings.models_file), providers)
        pricing = Pricing(settings.credits_per_usd)
        runner = Runner(store, registry, pricing, settings.lease_seconds)
        worker_id = new_worker_id("api")
        tasks = TaskService(
            store,
            registry,
            pricing,
            runner,
            worker_id=worker_id,
            lease_seconds=settings.lease_seconds,
            sync_timeout=settings.sync_timeout_seconds,
        )
        worker = Worker(
            store,
            runner,
            worker_id=worker_id,
            concurrency=settings.worker_concurrency,
            poll_seconds=settings.worker_poll_seconds,
            lease_seconds=settings.lease_seconds,
        )
        tasks.on_queued.append(worker.notify)
        policy = AddressPolicy(
            allow_private=settings.webhook_allow_private,
            refused_ports=settings.webhook_refused_port_set,
        )
        tasks.webhook_policy = policy
        webhooks = WebhookSender.from_settings(store, settings, worker_id, policy)
        store.delivery_listeners.append(webhooks.notify)
        return cls(
            settings=settings,
            store=store,
            registry=registry,
            auth=Authenticator(store, settings.auth_cache_seconds),
            limiter=RateLimiter(settings.redis_url),
            runner=runner,
            tasks=tasks,
            worker=worker,
            worker_id=worker_id,
            webhooks=webhooks,
        )

    async def start_providers(self) -> None:
        for name, provider in self.registry.providers.items():
            load = getattr(provider, "load", None)
            if load is not None:
                try:
                    await asyncio.to_thread(load)
                except Exception as exc:
                    log.error("provider %s failed to load: %s", name, exc)
                    continue
            start = getattr(provider, "start", None)
            if start is not None:
                start()

    async def start_worker(self) -> None:
        self.background.append(asyncio.create_task(self.worker.run(), name="textgen-worker"))
        self.start_webhooks()
        self.start_notifications()

    def start_notifications(self) -> None:
        """On PostgreSQL, LISTEN for work queued by other processes (polling remains the fallback)."""
        if not self.store.is_postgres:
            return
        channels = {TASKS_CHANNEL: [self.worker.notify]}
        if self.webhooks is not None:
            channels[DELIVERIES_CHANNEL] = [self.webhooks.notify]
        self.listener = Listener(asyncpg_dsn(self.settings.database_url), channels)
        self.background.append(asyncio.create_task(self.listener.run(), name="textgen-listener"))

    def start_webhooks(self) -> None:
        """Run the webhook sender in this process (``textgen serve`` and ``textgen worker``)."""
        if self.webhooks is not None:
            self.background.append(asyncio.create_task(self.webhooks.run(), name="textgen-webhooks"))
            # Deliveries this process queues are woken in-process: no NOTIFY that wakes every sender.
            self.store.delivers_locally = True

    async def aclose(self) -> None:
        # Both stop within the one shutdown timeout, side by side, not one after the other.
        grace = self.settings.shutdown_timeout_seconds
        stopping = [self.worker.stop(grace)]
        self.store.delivers_locally = False
        if self.webhooks is not None:
            stopping.append(self.webhooks.stop(grace))
        await asyncio.gather(*stopping)
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.registry.aclose()
        await self.limiter.aclose()
        await self.store.aclose()
