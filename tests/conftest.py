"""Shared fixtures: a real SQLite file per test and the app served by uvicorn on a loopback port."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests.fakes.providers import FAKE_MODELS_TOML
from textgen.accounts import create_account
from textgen.http.app import create_app
from textgen.providers import Provider
from textgen.services import Services
from textgen.settings import Settings, load_settings
from textgen.storage.migrate import upgrade


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(FAKE_MODELS_TOML)
    return path


@pytest.fixture
def settings(tmp_path: Path, models_file: Path) -> Settings:
    return make_settings(tmp_path, models_file=models_file)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path}/textgen.db",
        "worker_poll_seconds": 0.05,
        "lease_seconds": 5.0,
        "shutdown_timeout_seconds": 2.0,
        "webhook_allow_private": True,
        **overrides,
    }
    return load_settings(**values)


@dataclass
class Account:
    api_id: str
    api_key: str
    id: int

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-ID": self.api_id, "X-API-KEY": self.api_key}


@dataclass
class Server:
    url: str
    app: Any
    settings: Settings

    @property
    def services(self) -> Services:
        return self.app.state.services  # type: ignore[no-any-return]

    def client(self, account: Account | None = None, **kwargs: Any) -> httpx.AsyncClient:
        headers = account.headers if account else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60, **kwargs)

    async def account(self, credits: float = 100.0, rate_limit: int = 1000, name: str = "test") -> Account:
        created = await create_account(self.services.storage.accounts, name, credits, rate_limit)
        return Account(created.account.api_id, created.api_key, created.account.id)

    async def wait_for(
        self,
        account: Account,
        task_id: str,
        statuses: tuple[str, ...] = ("done", "failed"),
        within: float = 60.0,
    ) -> dict[str, Any]:
        """Poll the task over HTTP until it reaches one of ``statuses``."""
        async with self.client(account) as client:
            deadline = asyncio.get_running_loop().time() + within
            while True:
                body: dict[str, Any] = (await client.get(f"/sse/text_generator/{task_id}/")).json()
                if body["status"] in statuses:
                    return body
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"task {task_id} stuck in {body['status']}")
                await asyncio.sleep(0.05)


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port, inside the running event loop."""
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server exited during start-up")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def run_server(
    settings: Settings,
    providers: dict[str, Provider] | None = None,
    *,
    run_worker: bool | None = None,
) -> AsyncIterator[Server]:
    await asyncio.to_thread(upgrade, settings)
    app = create_app(settings, providers, run_worker=run_worker)
    async with serve_app(app) as url:
        yield Server(url=url, app=app, settings=settings)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
