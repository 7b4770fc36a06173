"""Load generators: an asyncio client for latency at concurrency 1, and wrk for throughput."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.stats import percentile


@dataclass
class Latency:
    """Client-side latency of sequential requests, and textgen's own ``x-textgen-overhead-ms`` if sent."""

    samples_ms: list[float]
    overhead_ms: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def p50(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples_ms, 99)

    @property
    def overhead_p50(self) -> float:
        return percentile(self.overhead_ms, 50)

    @property
    def overhead_p99(self) -> float:
        return percentile(self.overhead_ms, 99)


async def sequential_latency(
    url: str, body: dict[str, Any], headers: dict[str, str], *, requests: int, warmup: int
) -> Latency:
    """POST the same body ``warmup + requests`` times, one at a time, over one keep-alive connection."""
    payload = json.dumps(body).encode()
    all_headers = {"content-type": "application/json", **headers}
    result = Latency([])
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        for i in range(warmup + requests):
            started = time.perf_counter()
            response = await client.post(url, content=payload, headers=all_headers)
            elapsed = (time.perf_counter() - started) * 1000
            if i < warmup:
                continue
            if response.status_code >= 300:
                result.errors += 1
                continue
            result.samples_ms.append(elapsed)
            overhead = response.headers.get("x-textgen-overhead-ms")
            if overhead is not None:
                result.overhead_ms.append(float(overhead))
    return result


@dataclass
class Throughput:
    connections: int
    seconds: float
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers plus socket errors


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str, connections: int, seconds: float) -> Throughput:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _duration_ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _duration_ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        errors += int(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        errors += sum(int(g) for g in match.groups())
    return Throughput(connections, seconds, rps, p50, p99, total, errors)


def wrk_script(body: dict[str, Any], headers: dict[str, str]) -> str:
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{json.dumps(body)}]==]"]
    lines.append('wrk.headers["Content-Type"] = "application/json"')
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()]
    return "\n".join(lines) + "\n"


def ensure_wrk() -> str:
    """The wrk binary, installed from Debian's packages when missing."""
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk (apt-get install -y wrk)", flush=True)
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
        subprocess.run(install, capture_output=True, check=True)
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is not installed and apt-get could not install it")
    return found


def run_wrk(
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    *,
    connections: int,
    seconds: float,
    threads: int = 2,
) -> Throughput:
    """``wrk`` posting the same JSON body: requests/s and latency percentiles."""
    wrk = ensure_wrk()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(wrk_script(body, headers))
        argv = [
            wrk,
            f"-t{min(threads, connections)}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(script),
            url,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr or done.stdout}")
    return parse_wrk(done.stdout, connections, seconds)


async def sdk_latency(base_url: str, model: str, prompt: str, *, requests: int, warmup: int) -> Latency:
    """The same call through the google-genai SDK, as textgen's Gemini provider makes it."""
    from google import genai
    from google.genai import types

    client = genai.Client(
        api_key="bench-upstream-key", http_options=types.HttpOptions(base_url=base_url, api_version="v1beta")
    )
    result = Latency([])
    try:
        for i in range(warmup + requests):
            started = time.perf_counter()
            await client.aio.models.generate_content(model=model, contents=prompt)
            elapsed = (time.perf_counter() - started) * 1000
            if i >= warmup:
                result.samples_ms.append(elapsed)
    finally:
        await client.aio.aclose()
    return result
