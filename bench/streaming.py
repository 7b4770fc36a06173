"""Streaming: added time to first chunk and inter-chunk latency, concurrent streams held, RSS per stream."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.procs import ROOT, rss_kib
from bench.stats import percentile

GAP_LIMIT_MS = 50.0


@dataclass
class StreamRun:
    streams: int
    ttfc: list[float]
    gaps: list[float]
    errors: int
    first_error: str | None
    peak_rss_kib: int = 0
    idle_rss_kib: int = 0

    @property
    def gap_p99(self) -> float:
        return percentile(self.gaps, 99)

    @property
    def held(self) -> bool:
        return self.errors == 0 and bool(self.gaps) and self.gap_p99 < GAP_LIMIT_MS

    @property
    def rss_per_stream_kib(self) -> float:
        return max(self.peak_rss_kib - self.idle_rss_kib, 0) / self.streams


@dataclass
class Capacity:
    steps: list[StreamRun] = field(default_factory=list)

    @property
    def held(self) -> StreamRun | None:
        passed = [s for s in self.steps if s.held]
        return passed[-1] if passed else None


def run_client(
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    streams: int,
    *,
    sequential: bool = False,
    ramp_seconds: float = 1.0,
    watch_pid: int | None = None,
) -> StreamRun:
    """Run the SSE client process; while it runs, sample the server's RSS every 50 ms."""
    spec = {
        "url": url,
        "body": body,
        "headers": headers,
        "streams": streams,
        "sequential": sequential,
        "ramp_seconds": ramp_seconds,
    }
    idle = rss_kib(watch_pid) if watch_pid else 0
    peak = idle
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.05):
            peak = max(peak, rss_kib(watch_pid))  # type: ignore[arg-type]

    sampler = threading.Thread(target=sample, daemon=True)
    if watch_pid:
        sampler.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.streamclient", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
            check=False,
        )
    finally:
        stop.set()
        if watch_pid:
            sampler.join()
    if done.returncode != 0:
        raise RuntimeError(f"stream client failed: {done.stderr[-2000:]}")
    out = json.loads(done.stdout)
    return StreamRun(streams, out["ttfc"], out["gaps"], out["errors"], out["first_error"], peak, idle)


def step_up(
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    steps: list[int],
    watch_pid: int | None,
    label: str,
) -> Capacity:
    """Raise the number of concurrent streams until p99 inter-chunk delay passes the limit (or errors)."""
    capacity = Capacity()
    for n in steps:
        run = run_client(url, body, headers, n, ramp_seconds=min(2.0, 0.5 + n / 1000), watch_pid=watch_pid)
        capacity.steps.append(run)
        rss = f", RSS/stream {run.rss_per_stream_kib:.1f} KiB" if watch_pid else ""
        print(f"  {label}: {n} streams: p99 gap {run.gap_p99:.1f} ms, errors {run.errors}{rss}", flush=True)
        if not run.held:
            break
        time.sleep(1.0)
    return capacity
