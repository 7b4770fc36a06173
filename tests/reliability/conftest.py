"""Shared pieces of the reliability suite: a service running on its own thread, and the books checks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import Account, Server, make_settings, run_server, serve_app
from tests.fakes.fake_gemini import FakeGemini
from tests.fakes.providers import FAKE_MODELS_TOML, FakeProvider
from textgen.providers.gemini import GeminiProvider
from textgen.services import Services
from textgen.settings import Settings
from textgen.states import TERMINAL

T = TypeVar("T")
# Retries compressed so that upstream faults resolve in milliseconds; the policy is the same.
FAST_RETRIES: dict[str, Any] = {
    "gemini_api_key": "test-key",
    "gemini_retry_initial_delay_seconds": 0.01,
    "gemini_retry_max_delay_seconds": 0.05,
    "gemini_max_attempts": 3,
    "gemini_retry_budget_seconds": 10.0,
    "gemini_file_poll_seconds": 0.01,
}
PLENTY = 1_000_000.0  # credits: no generated case is refused for want of them
UNLIMITED = 10_000_000  # requests per minute


def reliability_settings(tmp_path: Path, upstream: str, **overrides: Any) -> Settings:
    """Settings for a service with the fake model and Gemini pointed at a fake upstream."""
    models = tmp_path / "models.toml"
    models.write_text(FAKE_MODELS_TOML)
    return make_settings(
        tmp_path, models_file=models, gemini_base_url=upstream, **{**FAST_RETRIES, **overrides}
    )


def providers(settings: Settings) -> dict[str, Any]:
    return {"gemini": GeminiProvider(settings), "fake": FakeProvider()}


async def assert_books_balance(services: Services, account: Account, opening: float) -> None:
    """No credit lost or double-charged: the ledger sums to the balance, and every credit spent is
    charged to exactly one finished task, never more than it reserved (a failed task only for the output it
    produced: one that failed before its first token is charged nothing)."""
    for _ in range(600):  # tasks still in flight finish first (the worker is running)
        rows, _ = await services.storage.tasks.list(account.id, limit=10_000)
        if all(row.status in TERMINAL for row in rows):
            break
        await asyncio.sleep(0.05)
    assert all(row.status in TERMINAL for row in rows), [(r.id, r.status) for r in rows]
    summary = await services.storage.accounts.ledger_summary(account.id)
    assert summary.ledger_sum == summary.balance
    assert all(row.credits_used <= row.credits_reserved for row in rows)
    assert all(row.credits_used == 0 for row in rows if row.status == "failed" and row.output_tokens == 0)
    charged = sum(row.credits_used for row in rows)
    assert summary.balance == round(opening * 1_000_000) - charged


class BackgroundLoop:
    """An event loop on its own thread, so synchronous tests (Hypothesis) can talk to a live service."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="reliability-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.run(self._cancel_leftovers())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @staticmethod
    async def _cancel_leftovers() -> None:
        # Libraries leave loop-wide watchers behind (sse-starlette's shutdown watcher); end them cleanly.
        current = asyncio.current_task()
        leftovers = [task for task in asyncio.all_tasks() if task is not current]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)


@dataclass
class LiveService:
    """A service on loopback with the fake model and Gemini behind a fake upstream; one rich account."""

    server: Server
    upstream: FakeGemini
    account: Account
    loop: BackgroundLoop
    webhook_url: str  # loopback, nothing listening: deliveries fail, nothing leaves the machine

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def headers(self) -> dict[str, str]:
        return self.account.headers


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    loop = BackgroundLoop()
    stack = AsyncExitStack()
    fake = FakeGemini(record=False)
    tmp_path = tmp_path_factory.mktemp("live")

    async def start() -> LiveService:
        upstream = await stack.enter_async_context(serve_app(fake.app))
        settings = reliability_settings(tmp_path, upstream)
        server = await stack.enter_async_context(run_server(settings, providers(settings), run_worker=True))
        account = await server.account(credits=PLENTY, rate_limit=UNLIMITED)
        closed = await stack.enter_async_context(_closed_port())
        return LiveService(server, fake, account, loop, f"http://127.0.0.1:{closed}/hook")

    try:
        service = loop.run(start())
        yield service
    finally:
        loop.run(stack.aclose())
        loop.close()


class _ClosedPort:
    """A loopback port that is bound but never listens: connections to it are refused."""

    async def __aenter__(self) -> int:
        from tests.conftest import free_socket

        self.sock = free_socket()
        port: int = self.sock.getsockname()[1]
        return port

    async def __aexit__(self, *exc: object) -> None:
        self.sock.close()


def _closed_port() -> _ClosedPort:
    return _ClosedPort()
