"""Soak: mixed load for a fixed time; resident memory at start, steady state and end, and every error."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from bench.procs import rss_kib
from bench.stack import Textgen, textgen_body
from bench.stats import percentile


@dataclass
class Soak:
    seconds: float
    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, KiB)

    def _window(self, lo: float, hi: float) -> list[int]:
        return [kib for t, kib in self.rss if lo * self.seconds <= t <= hi * self.seconds]

    @property
    def rss_start(self) -> float:
        """After the warm-up: the median over 10-20 % of the run."""
        return percentile(self._window(0.1, 0.2), 50)

    @property
    def rss_steady(self) -> float:
        return percentile(self._window(0.4, 0.6), 50)

    @property
    def rss_end(self) -> float:
        return percentile(self._window(0.9, 1.0), 50)

    @property
    def growth(self) -> float:
        return (self.rss_end - self.rss_start) / self.rss_start


async def run_soak(server: Textgen, seconds: float) -> Soak:
    """Sync, streaming, async (polled), list and credits requests, plus a trickle of embedded-model requests."""
    result = Soak(seconds)
    deadline = time.monotonic() + seconds
    started = time.monotonic()

    def failed(kind: str, detail: str) -> None:
        result.errors[kind] += 1
        if len(result.first_errors) < 10:
            result.first_errors.append(f"{kind}: {detail[:300]}")

    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:

        async def loop(kind: str, pause: float = 0.0) -> None:
            while time.monotonic() < deadline:
                try:
                    ok, detail = await ACTIONS[kind](client)
                except httpx.HTTPError as exc:
                    ok, detail = False, repr(exc)
                result.requests[kind] += 1
                if not ok:
                    failed(kind, detail)
                if pause:
                    await asyncio.sleep(pause)

        async def sample() -> None:
            while time.monotonic() < deadline:
                result.rss.append((time.monotonic() - started, rss_kib(server.proc.pid)))
                await asyncio.sleep(1.0)

        loops = [loop("sync") for _ in range(4)] + [loop("stream") for _ in range(2)]
        loops += [loop("async") for _ in range(2)] + [loop("read", 0.05), loop("local", 1.0)]
        await asyncio.gather(sample(), *loops)
    return result


async def _sync(client: httpx.AsyncClient) -> tuple[bool, str]:
    response = await client.post("/sse/text_generator/", json=textgen_body(sync=True))
    return response.status_code == 201 and response.json()["status"] == "done", response.text


async def _stream(client: httpx.AsyncClient) -> tuple[bool, str]:
    async with client.stream("POST", "/sse/text_generator/stream/", json=textgen_body()) as response:
        text = (await response.aread()).decode()
    return response.status_code == 200 and '"creatify"' in text, text[-300:]


async def _async(client: httpx.AsyncClient) -> tuple[bool, str]:
    created = await client.post("/sse/text_generator/", json=textgen_body())
    if created.status_code != 201:
        return False, created.text
    task_id = created.json()["id"]
    for _ in range(600):
        task = (await client.get(f"/sse/text_generator/{task_id}/")).json()
        if task["status"] in ("done", "failed"):
            return task["status"] == "done", str(task.get("failed_reason"))
        await asyncio.sleep(0.02)
    return False, f"task {task_id} not finished"


async def _read(client: httpx.AsyncClient) -> tuple[bool, str]:
    listed = await client.get("/sse/text_generator/", params={"limit": 20})
    credits = await client.get("/api/remaining_credits/")
    return listed.status_code == 200 and credits.status_code == 200, listed.text + credits.text


async def _local(client: httpx.AsyncClient) -> tuple[bool, str]:
    body = {
        "model_name": "smollm2-135m-instruct",
        "sync": True,
        "messages": [{"role": "user", "content": "Say hi."}],
        "config": {"max_output_tokens": 8},
    }
    response = await client.post("/sse/text_generator/", json=body)
    return response.status_code == 201 and response.json()["status"] == "done", response.text


ACTIONS = {"sync": _sync, "stream": _stream, "async": _async, "read": _read, "local": _local}
