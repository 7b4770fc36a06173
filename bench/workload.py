"""Loads against a running textgen: a burst of async tasks timed to the last one done, and closed-loop sync load.

The clients are aiohttp, in the bench's own process: their CPU is not the server's, and aiohttp costs a fraction
of httpx's per request (see docs/benchmarks.md, the HTTP client study).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import sqlalchemy as sa

from bench.procs import CpuMeter
from bench.stack import Textgen, textgen_body
from bench.stats import percentile


@dataclass
class Created:
    ids: list[str] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    started: float = 0.0  # wall clock (time.time()) of the first request
    finished: float = 0.0  # wall clock when the last create was answered


async def create_tasks(
    server: Textgen, count: int, body: dict[str, Any], *, concurrency: int = 32
) -> Created:
    """POST ``count`` async tasks as fast as the API takes them, ``concurrency`` requests at a time."""
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json", **server.headers}
    result = Created()
    remaining = count
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(server.url, connector=connector, timeout=timeout) as session:

        async def creator() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                try:
                    async with session.post(
                        "/sse/text_generator/", data=payload, headers=headers
                    ) as response:
                        text = await response.read()
                        if response.status == 201:
                            result.ids.append(json.loads(text)["id"])
                            continue
                        error = f"{response.status} {text[:200]!r}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    error = repr(exc)
                result.errors += 1
                result.first_error = result.first_error or error

        result.started = time.time()
        await asyncio.gather(*(creator() for _ in range(concurrency)))
        result.finished = time.time()
    return result


def _engine(server: Textgen) -> Any:
    from textgen.settings import load_settings
    from textgen.storage.engine import create_engine

    return create_engine(load_settings(database_url=server.env["TEXTGEN_DATABASE_URL"]))


async def _unfinished(engine: Any) -> int:
    from textgen.storage.tables import tasks

    async with engine.connect() as conn:
        query = sa.select(sa.func.count()).where(
            tasks.c.mode == "async", tasks.c.status.in_(("pending", "running"))
        )
        return int((await conn.execute(query)).scalar_one())


async def _task_rows(engine: Any) -> list[tuple[str, dt.datetime, dt.datetime]]:
    """(status, created_at, updated_at) of every async task (the streams and sync requests are tasks too)."""
    from textgen.storage.tables import tasks

    async with engine.connect() as conn:
        query = sa.select(tasks.c.status, tasks.c.created_at, tasks.c.updated_at).where(
            tasks.c.mode == "async"
        )
        rows = await conn.execute(query)
        return [(str(r[0]), r[1], r[2]) for r in rows]


@dataclass
class TaskBurst:
    tasks: int
    created: int
    create_errors: int
    first_error: str | None
    create_seconds: float  # first create sent -> last create answered
    seconds: (
        float | None
    )  # first task created -> last task finished (database timestamps); None if unfinished
    statuses: dict[str, int]
    cpu_seconds: float  # every textgen process, from the first create to the last task finished
    upstream_cpu_seconds: float

    @property
    def cpu_ms_per_task(self) -> float | None:
        return self.cpu_seconds * 1000 / self.created if self.created else None


async def task_burst(
    server: Textgen, upstream_pid: int, count: int, *, within: float = 600, concurrency: int = 32
) -> TaskBurst:
    """``count`` async tasks created at once; the time from the first created to the last finished."""
    engine = _engine(server)
    try:
        await _unfinished(engine)  # connected before the clock starts
        cpu, upstream_cpu = CpuMeter(server.pids).start(), CpuMeter([upstream_pid]).start()
        created = await create_tasks(server, count, textgen_body(), concurrency=concurrency)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not await _unfinished(engine):
                break
            await asyncio.sleep(0.1)
        cpu.stop()
        upstream_cpu.stop()
        rows = await _task_rows(engine)
    finally:
        await engine.dispose()
    statuses = Counter(status for status, _, _ in rows)
    finished = [updated for status, _, updated in rows if status in ("done", "failed")]
    seconds = None
    if rows and len(finished) == len(rows):
        seconds = (max(finished) - min(created_at for _, created_at, _ in rows)).total_seconds()
    return TaskBurst(
        tasks=count,
        created=len(created.ids),
        create_errors=created.errors,
        first_error=created.first_error,
        create_seconds=created.finished - created.started,
        seconds=seconds,
        statuses=dict(statuses),
        cpu_seconds=cpu.seconds,
        upstream_cpu_seconds=upstream_cpu.seconds,
    )


@dataclass
class ClosedLoop:
    connections: int
    seconds: float
    latencies_ms: list[float]
    errors: int
    first_error: str | None
    cpu_seconds: float  # every process watched, over the measured window

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_request(self) -> float | None:
        return self.cpu_seconds * 1000 / self.requests if self.requests else None


async def closed_loop(
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    *,
    connections: int,
    seconds: float,
    warmup: float,
    watch_pids: list[int],
) -> ClosedLoop:
    """``connections`` clients each POSTing the same body again as soon as the last answer came.

    After ``warmup`` seconds (every connection busy), a window of ``seconds`` starts: the requests answered in it
    are counted, and the CPU of ``watch_pids`` is read from its start to its end.
    """
    payload = json.dumps(body).encode()
    all_headers = {"content-type": "application/json", **headers}
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=120)
    cpu = CpuMeter(watch_pids)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        opened = time.perf_counter()
        window = opened + warmup
        deadline = window + seconds

        async def client() -> None:
            nonlocal errors, first_error
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=payload, headers=all_headers) as response:
                        text = await response.read()
                        ok = 200 <= response.status < 300
                        error = None if ok else f"{response.status} {text[:200]!r}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    error = repr(exc)
                answered = time.perf_counter()
                if not window <= answered <= deadline:
                    continue  # answered outside the window: neither counted nor an error
                if error is None:
                    latencies.append((answered - sent) * 1000)
                else:
                    errors += 1
                    first_error = first_error or error

        async def meter() -> None:
            await asyncio.sleep(window - time.perf_counter())
            cpu.start()
            await asyncio.sleep(deadline - time.perf_counter())
            cpu.stop()

        await asyncio.gather(meter(), *(client() for _ in range(connections)))
    return ClosedLoop(connections, seconds, latencies, errors, first_error, cpu.seconds)


def closed_loop_summary(run: ClosedLoop) -> dict[str, Any]:
    return {
        "connections": run.connections,
        "seconds": run.seconds,
        "requests": run.requests,
        "rps": run.requests_per_second,
        "p50": percentile(run.latencies_ms, 50),
        "p99": percentile(run.latencies_ms, 99),
        "errors": run.errors,
        "first_error": run.first_error,
        "cpu_ms_per_request": run.cpu_ms_per_request,
    }
