"""Async queue: tasks/s from create to ``done`` and to webhook delivered, with 1, 2 and 4 worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from bench.procs import LOOPBACK, CpuMeter
from bench.stack import Textgen, textgen_body
from bench.workload import create_tasks


class WebhookReceiver:
    """A minimal keep-alive HTTP server that answers 200 and notes when each task's webhook arrived."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.server: asyncio.Server | None = None
        self.changed = asyncio.Event()
        self.writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> WebhookReceiver:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:  # idle keep-alive connections end with an IncompleteReadError
            writer.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://{LOOPBACK}:{port}/hook"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                task_id = json.loads(body).get("id", "")
                self.arrivals.setdefault(task_id, time.time())
                self.changed.set()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def wait_for(self, count: int, within: float) -> bool:
        deadline = time.monotonic() + within
        while len(self.arrivals) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 1.0))
        return True


@dataclass
class QueueRun:
    backend: str
    workers: int
    tasks: int
    create_per_second: float
    done_per_second: float
    delivered_per_second: float
    errors: int
    first_error: str | None
    cpu_ms_per_task: float | None  # every textgen process, first create to last webhook delivered
    upstream_cpu_ms_per_task: float | None


async def _done_times(server: Textgen) -> list[dt.datetime]:
    from textgen.settings import load_settings
    from textgen.storage.engine import create_engine
    from textgen.storage.tables import tasks

    engine = create_engine(load_settings(database_url=server.env["TEXTGEN_DATABASE_URL"]))
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(tasks.c.updated_at).where(tasks.c.mode == "async", tasks.c.status == "done")
            )
            return [row[0] for row in rows]
    finally:
        await engine.dispose()


async def run_queue(
    server: Textgen, upstream_pid: int, tasks: int, *, create_concurrency: int = 32, within: float = 300
) -> QueueRun:
    """Create ``tasks`` async tasks with a webhook each, as fast as the API takes them, and time the drain."""
    async with WebhookReceiver() as receiver:
        cpu, upstream_cpu = CpuMeter(server.pids).start(), CpuMeter([upstream_pid]).start()
        created = await create_tasks(
            server, tasks, textgen_body(webhook_url=receiver.url), concurrency=create_concurrency
        )
        errors = created.errors
        if not await receiver.wait_for(len(created.ids), within):
            errors += len(created.ids) - len(receiver.arrivals)
        cpu.stop()
        upstream_cpu.stop()
    done = await _done_times(server)
    if len(done) < tasks:
        errors = max(errors, tasks - len(done))
    started = created.started
    last_done = max(d.timestamp() for d in done) if done else started
    last_hook = max(receiver.arrivals.values()) if receiver.arrivals else started
    return QueueRun(
        backend=server.backend,
        workers=len(server.workers),
        tasks=tasks,
        create_per_second=len(created.ids) / max(created.finished - started, 1e-6),
        done_per_second=len(done) / max(last_done - started, 1e-6),
        delivered_per_second=len(receiver.arrivals) / max(last_hook - started, 1e-6),
        errors=errors,
        first_error=created.first_error,
        cpu_ms_per_task=cpu.ms_per(len(done)),
        upstream_cpu_ms_per_task=upstream_cpu.ms_per(len(done)),
    )


def summary(run: QueueRun) -> dict[str, Any]:
    return run.__dict__
