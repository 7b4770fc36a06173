"""Concurrent streams: time to first chunk, the gaps between chunks, and the server's memory per open stream."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

from bench.procs import ROOT, CpuMeter, rss_total_kib
from bench.stats import percentile


@dataclass
class StreamRun:
    streams: int
    ttfc: list[float]
    gaps: list[float]
    chunks: list[int]
    errors: int
    first_error: str | None
    most_open: int
    idle_rss_kib: int = 0
    most_open_rss_kib: int | None = None  # the server's RSS when the most streams were open at once
    peak_rss_kib: int = 0
    cpu_seconds: float | None = None  # the server's processes over the run

    @property
    def gap_p99(self) -> float:
        return percentile(self.gaps, 99)

    @property
    def rss_per_stream_kib(self) -> float | None:
        """(RSS when the most streams were open at once - idle RSS) / those streams; None if none ever was."""
        if self.most_open_rss_kib is None or not self.most_open:
            return None
        return max(self.most_open_rss_kib - self.idle_rss_kib, 0) / self.most_open


def run_client(
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    streams: int,
    *,
    sequential: bool = False,
    ramp_seconds: float = 1.0,
    watch_pids: list[int] | None = None,
    cpu_pids: list[int] | None = None,
) -> StreamRun:
    """Run the SSE client process; read the RSS of ``watch_pids`` when the most streams are open (and every 50 ms),
    and the CPU of ``cpu_pids`` (default: the same) over the run."""
    spec = {
        "url": url,
        "body": body,
        "headers": headers,
        "streams": streams,
        "sequential": sequential,
        "ramp_seconds": ramp_seconds,
    }
    pids = watch_pids or []
    idle = rss_total_kib(pids) if pids else 0
    peak = idle
    most_open_rss: int | None = None
    stop = threading.Event()
    cpu_of = cpu_pids if cpu_pids is not None else pids
    cpu = CpuMeter(cpu_of).start() if cpu_of else None

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.05):
            peak = max(peak, rss_total_kib(pids))

    sampler = threading.Thread(target=sample, daemon=True)
    if pids:
        sampler.start()
    stderr: list[str] = []
    stdout: list[str] = []
    argv = [sys.executable, "-m", "bench.streamclient", json.dumps(spec)]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    ) as client:
        out_pipe, err_pipe = client.stdout, client.stderr
        assert out_pipe is not None and err_pipe is not None
        reader = threading.Thread(target=lambda: stdout.append(out_pipe.read()), daemon=True)
        reader.start()
        try:
            for line in err_pipe:
                if line.startswith("open "):
                    if pids:
                        most_open_rss = rss_total_kib(pids)
                else:
                    stderr.append(line)
            client.wait(timeout=600)
            reader.join()
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
            if cpu is not None:
                cpu.stop()
            stop.set()
            if pids:
                sampler.join()
    if client.returncode != 0:
        raise RuntimeError(f"stream client failed: {''.join(stderr)[-2000:]}")
    out = json.loads("".join(stdout))
    return StreamRun(
        streams=streams,
        ttfc=out["ttfc"],
        gaps=out["gaps"],
        chunks=out["chunks"],
        errors=out["errors"],
        first_error=out["first_error"],
        most_open=out["most_open"],
        idle_rss_kib=idle,
        most_open_rss_kib=most_open_rss,
        peak_rss_kib=max(peak, most_open_rss or 0),
        cpu_seconds=cpu.seconds if cpu is not None else None,
    )


def summary(run: StreamRun) -> dict[str, Any]:
    return {
        "streams": run.streams,
        "ttfc_p50": percentile(run.ttfc, 50),
        "ttfc_p99": percentile(run.ttfc, 99),
        "gap_p50": percentile(run.gaps, 50),
        "gap_p99": run.gap_p99,
        "chunks_min": min(run.chunks, default=0),
        "chunks_max": max(run.chunks, default=0),
        "completed": len(run.ttfc),
        "errors": run.errors,
        "first_error": run.first_error,
        "most_open": run.most_open,
        "idle_rss_kib": run.idle_rss_kib,
        "most_open_rss_kib": run.most_open_rss_kib,
        "peak_rss_kib": run.peak_rss_kib,
        "rss_per_stream_kib": run.rss_per_stream_kib,
        "cpu_ms_per_stream": None
        if run.cpu_seconds is None
        else run.cpu_seconds * 1000 / max(run.streams, 1),
    }
