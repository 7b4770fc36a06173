"""The systems under test: the fake Gemini upstream, textgen on SQLite or PostgreSQL + Redis, their databases."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from bench.procs import LOOPBACK, ProcessGroup, free_port, python_module

POSTGRES_DSN = os.environ.get("BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_POOL_SIZE = os.environ.get("BENCH_PG_POOL_SIZE", "8")
PG_MAX_OVERFLOW = os.environ.get("BENCH_PG_MAX_OVERFLOW", "4")
FAKE_KEY = "bench-upstream-key"
MODEL = "gemini-2.5-flash"
PROMPT = "Write a short tagline for an AI video tool."


@dataclass
class Upstream:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen[bytes]

    @property
    def generate_url(self) -> str:
        return f"{self.url}/v1beta/models/{MODEL}:generateContent"

    @property
    def stream_url(self) -> str:
        return f"{self.url}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"


@dataclass
class Textgen:
    url: str
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    headers: dict[str, str]
    backend: str  # "sqlite" or "postgresql+redis"
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid, *(w.pid for w in self.workers)]


def start_upstream(
    group: ProcessGroup,
    name: str,
    chunks: int | None = None,
    delay_ms: float = 0,
    *,
    answer_delay_ms: float = 0,
    stream_delay_ms: float | None = None,
) -> Upstream:
    """The fake Gemini upstream in its own process.

    ``answer_delay_ms``: every answer waits this long (streams too, unless ``stream_delay_ms`` says otherwise);
    ``chunks`` / ``delay_ms``: streams come in this many chunks this far apart.
    """
    port = free_port()
    # any key (LiteLLM sends its own way); idle keep-alive connections stay open as Gemini's do, far past
    # uvicorn's 5 s, so a client's pooled connection is not closed under it between two bursts
    args = ["--port", str(port), "--keep-alive-seconds", "600"]
    if chunks:
        args += ["--chunks", str(chunks), "--chunk-delay-ms", str(delay_ms)]
    if answer_delay_ms:
        args += ["--delay-ms", str(answer_delay_ms)]
    if stream_delay_ms is not None:
        args += ["--stream-delay-ms", str(stream_delay_ms)]
    proc = group.start(name, python_module("tests.fakes.fake_gemini", *args))
    url = f"http://{LOOPBACK}:{port}"
    group.wait_http(proc, f"{url}/v1beta/files/none")
    return Upstream(url, proc)


@dataclass(frozen=True)
class Config:
    """A deployment measured: one ``textgen serve`` on SQLite running its own worker, or on PostgreSQL + Redis an
    API process (``TEXTGEN_RUN_WORKER=false``) and ``workers`` ``textgen worker`` processes."""

    backend: str  # "sqlite" or "postgres"
    workers: int = 0

    @classmethod
    def parse(cls, text: str) -> Config:
        """``sqlite`` or ``pgN`` (N worker processes)."""
        if text == "sqlite":
            return cls("sqlite")
        if text.startswith("pg") and text[2:].isdigit() and int(text[2:]) > 0:
            return cls("postgres", int(text[2:]))
        raise ValueError(f"unknown configuration {text!r}: sqlite or pgN")

    @property
    def key(self) -> str:
        return "sqlite" if self.backend == "sqlite" else f"pg{self.workers}"

    @property
    def label(self) -> str:
        if self.backend == "sqlite":
            return "SQLite, one `textgen serve`"
        return f"PostgreSQL, API + {self.workers} worker{'s' if self.workers > 1 else ''}"


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextmanager
def postgres_database(kind: str) -> Iterator[str]:
    """A uniquely named PostgreSQL database (its plain libpq URL), dropped afterwards."""
    name = f"bench_{kind}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(f"CREATE DATABASE {name}"))
    base = POSTGRES_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# What the bench sets beside the database and the upstream; textgen's defaults otherwise (the queue's poll
# intervals too: a new task wakes the workers at once). PostgreSQL adds PG_SETTINGS.
SETTINGS = {
    "TEXTGEN_GEMINI_MAX_ATTEMPTS": "1",  # a fault shows instead of being retried
    "TEXTGEN_WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on 127.0.0.1
    "TEXTGEN_WEBHOOK_JITTER": "0",
    "TEXTGEN_SHUTDOWN_TIMEOUT_SECONDS": "3",
    "TEXTGEN_LOG_LEVEL": "warning",
}
# PostgreSQL here allows 100 connections, shared with everything else on the machine: every process gets the
# same smaller pool, so 5 processes (API + 4 workers) stay within 65.
PG_SETTINGS = {"TEXTGEN_DB_POOL_SIZE": PG_POOL_SIZE, "TEXTGEN_DB_MAX_OVERFLOW": PG_MAX_OVERFLOW}


def textgen_env(
    database_url: str, upstream: Upstream, redis_url: str | None = None, **extra: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_") and k != "GOOGLE_API_KEY"}
    env.update(
        TEXTGEN_DATABASE_URL=database_url,
        GEMINI_API_KEY=FAKE_KEY,
        TEXTGEN_GEMINI_BASE_URL=upstream.url,
        TEXTGEN_GEMINI_API_VERSION="v1beta",
        **SETTINGS,
    )
    env.update(extra)
    if redis_url:
        env["TEXTGEN_REDIS_URL"] = redis_url
    return env


def textgen_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "textgen", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"textgen {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def create_account(env: dict[str, str], name: str = "bench") -> dict[str, str]:
    """An account that neither the rate limit nor the credits will stop during a benchmark."""
    created = json.loads(
        textgen_cli(
            env, "accounts", "create", name, "--credits", "1000000000", "--rate-limit", "100000000", "--json"
        )
    )
    return {"X-API-ID": created["api_id"], "X-API-KEY": created["api_key"]}


def start_textgen(
    group: ProcessGroup,
    name: str,
    env: dict[str, str],
    backend: str,
    *,
    api_worker: bool = True,
    workers: int = 0,
    worker_concurrency: int | None = None,
) -> Textgen:
    """Migrate, create an account, start ``textgen serve`` (and ``textgen worker`` processes)."""
    textgen_cli(env, "migrate")
    headers = create_account(env)
    port = free_port()
    serve_env = {**env, "TEXTGEN_RUN_WORKER": "true" if api_worker else "false"}
    proc = group.start(
        name, python_module("textgen", "serve", "--port", str(port), "--no-migrate"), serve_env
    )
    url = f"http://{LOOPBACK}:{port}"
    group.wait_http(proc, f"{url}/readyz")
    started = [
        group.start(
            f"{name}-worker{i}",
            python_module(
                "textgen",
                "worker",
                *(["--concurrency", str(worker_concurrency)] if worker_concurrency else []),
            ),
            {**env, "TEXTGEN_LOG_LEVEL": "info"},
        )
        for i in range(workers)
    ]
    # A measurement starts once every worker is claiming, not while they are still starting up.
    for worker in started:
        group.wait_log(worker, "ready (")
    return Textgen(url, proc, env, headers, backend, started)


@contextmanager
def textgen_on(
    group: ProcessGroup, backend: str, upstream: Upstream, workdir: Path, name: str, **kwargs: object
) -> Iterator[Textgen]:
    """textgen on ``sqlite`` (a fresh file) or ``postgres`` (a fresh database, plus Redis), stopped afterwards."""
    extra = {k: str(v) for k, v in kwargs.pop("env", {}).items()}  # type: ignore[attr-defined]
    if backend == "sqlite":
        path = workdir / f"{name}-{uuid.uuid4().hex[:6]}.db"
        env = textgen_env(f"sqlite+aiosqlite:///{path}", upstream, **extra)
        server = start_textgen(group, name, env, "SQLite", **kwargs)  # type: ignore[arg-type]
        try:
            yield server
        finally:
            for proc in [*server.workers, server.proc]:
                group.stop(proc)
        return
    extra = {**PG_SETTINGS, **extra}
    with postgres_database("textgen") as url:
        env = textgen_env(url.replace("postgresql://", "postgresql+asyncpg://"), upstream, REDIS_URL, **extra)
        server = start_textgen(group, name, env, "PostgreSQL + Redis", **kwargs)  # type: ignore[arg-type]
        try:
            yield server
        finally:
            for proc in [*server.workers, server.proc]:
                group.stop(proc)


@contextmanager
def textgen_config(
    group: ProcessGroup, config: Config, upstream: Upstream, workdir: Path, name: str
) -> Iterator[Textgen]:
    """textgen deployed as ``config`` says, against ``upstream``."""
    api_worker = config.backend == "sqlite"
    with textgen_on(
        group, config.backend, upstream, workdir, name, api_worker=api_worker, workers=config.workers
    ) as server:
        yield server


def textgen_body(**extra: object) -> dict[str, object]:
    return {"model_name": MODEL, "messages": [{"role": "user", "content": PROMPT}], **extra}


def upstream_body() -> dict[str, object]:
    return {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
