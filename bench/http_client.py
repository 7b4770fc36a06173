"""``python -m bench.http_client``: which async HTTP client the Gemini provider should call the upstream with.

Every client sends the same ``generateContent`` request (or reads the same ``streamGenerateContent?alt=sse``
stream, with ``--stream``) to one fake Gemini upstream (``tests.fakes.fake_gemini``, its own process), at each
concurrency, from a fresh process per run on uvloop, as the service runs. A run reports requests per second and
the CPU milliseconds per request that the client's process spent (``time.process_time``: user + system time
of every thread). The rounds are interleaved, so that a slow moment of this shared machine hits every client;
the table gives the median round and the spread, and each figure as a ratio to httpx's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import process_group
from bench.stack import FAKE_KEY, MODEL, PROMPT, start_upstream

CLIENTS = ("httpx", "aiohttp")
OPTIONAL_CLIENTS = ("httpx2",)  # the google-genai SDK's transport, when it is installed
TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Run:
    client: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    cpu_seconds: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        return self.cpu_seconds * 1000 / self.requests if self.requests else float("nan")


def _body() -> dict[str, Any]:
    return {
        "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
        "generationConfig": {"temperature": 0.8, "maxOutputTokens": 256},
    }


# -- one client in one process ------------------------------------------------------------------------


Send = Callable[[], Awaitable[None]]


def _stream_text(lines: list[bytes]) -> int:
    """Parse the SSE events as the provider does; the number of chunks."""
    chunks = 0
    for line in lines:
        if line.startswith(b"data:"):
            json.loads(line[5:])
            chunks += 1
    if not chunks:
        raise RuntimeError("the stream had no events")
    return chunks


async def _with_httpx(
    module: Any, url: str, concurrency: int, stream: bool, work: Callable[[Send], Any]
) -> Any:
    limits = module.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"x-goog-api-key": FAKE_KEY, "content-type": "application/json"}
    async with module.AsyncClient(limits=limits, timeout=TIMEOUT, headers=headers) as client:

        async def send() -> None:
            content = json.dumps(_body()).encode()
            if not stream:
                response = await client.post(url, content=content)
                if response.status_code != 200:
                    raise RuntimeError(response.status_code)
                json.loads(response.content)
                return
            async with client.stream("POST", url, content=content) as response:
                if response.status_code != 200:
                    raise RuntimeError(response.status_code)
                _stream_text([line.encode() async for line in response.aiter_lines()])

        return await work(send)


async def _with_aiohttp(url: str, concurrency: int, stream: bool, work: Callable[[Send], Any]) -> Any:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    headers = {"x-goog-api-key": FAKE_KEY, "content-type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:

        async def send() -> None:
            content = json.dumps(_body()).encode()
            async with session.post(url, data=content) as response:
                if response.status != 200:
                    raise RuntimeError(response.status)
                if not stream:
                    json.loads(await response.read())
                    return
                _stream_text([line async for line in response.content])

        return await work(send)


async def _measure(client: str, url: str, concurrency: int, requests: int, stream: bool) -> Run:
    async def work(send: Send) -> Run:
        errors = 0

        async def drive(count: int) -> None:
            nonlocal errors
            remaining = count

            async def worker() -> None:
                nonlocal remaining, errors
                while remaining > 0:
                    remaining -= 1
                    try:
                        await send()
                    except Exception:
                        errors += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))

        await drive(max(2 * concurrency, 50))  # connections opened, code paths warm
        errors = 0
        cpu, started = time.process_time(), time.perf_counter()
        await drive(requests)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
        return Run(client, concurrency, requests, errors, seconds, cpu_seconds)

    if client == "aiohttp":
        run: Run = await _with_aiohttp(url, concurrency, stream, work)
        return run
    module = __import__(client)
    run = await _with_httpx(module, url, concurrency, stream, work)
    return run


def _child(args: argparse.Namespace) -> None:
    import uvloop

    run = uvloop.run(_measure(args.child, args.url, args.concurrency, args.requests, args.stream))
    print(json.dumps(_as_dict(run)))


def _as_dict(run: Run) -> dict[str, Any]:
    return {name: getattr(run, name) for name in Run.__slots__}


# -- the comparison ------------------------------------------------------------------------------------


def _available(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def compare(
    *,
    concurrencies: tuple[int, ...] = (1, 64, 512),
    requests: int = 4000,
    rounds: int = 3,
    stream: bool = False,
    clients: tuple[str, ...] | None = None,
    logs: Path | None = None,
) -> dict[str, list[Run]]:
    """Every client at every concurrency, ``rounds`` times interleaved; runs keyed by ``client@concurrency``."""
    chosen = clients or tuple(c for c in (*CLIENTS, *OPTIONAL_CLIENTS) if _available(c))
    results: dict[str, list[Run]] = {}
    with tempfile.TemporaryDirectory() as tmp, process_group(logs or Path(tmp) / "logs") as group:
        upstream = start_upstream(group, "fake-gemini", chunks=8 if stream else None)
        url = upstream.stream_url if stream else upstream.generate_url
        for round_no in range(rounds):
            order = chosen if round_no % 2 == 0 else tuple(reversed(chosen))
            for concurrency in concurrencies:
                for client in order:
                    argv = [sys.executable, "-m", "bench.http_client", "--child", client, "--url", url]
                    argv += ["--concurrency", str(concurrency), "--requests", str(requests)]
                    argv += ["--stream"] if stream else []
                    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
                    if done.returncode != 0:
                        raise RuntimeError(f"{client} at {concurrency} failed:\n{done.stderr}")
                    run = Run(**json.loads(done.stdout.strip().splitlines()[-1]))
                    results.setdefault(f"{client}@{concurrency}", []).append(run)
    return results


def table(results: dict[str, list[Run]], baseline: str = "httpx") -> str:
    """A Markdown table: median req/s and CPU ms per request over the rounds, their spread, ratios to httpx."""
    rows = [
        "| client | concurrency | req/s (median, min-max) | CPU ms/request (median, min-max) | "
        f"req/s vs {baseline} | CPU/request vs {baseline} | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    medians: dict[str, tuple[float, float]] = {}
    for key, runs in results.items():
        medians[key] = (statistics.median(r.rps for r in runs), statistics.median(r.cpu_ms for r in runs))
    for key, runs in results.items():
        client, concurrency = key.split("@")
        rps, cpu = medians[key]
        base = medians.get(f"{baseline}@{concurrency}")
        rps_ratio = f"{rps / base[0]:.2f}x" if base and base[0] else "-"
        cpu_ratio = f"{cpu / base[1]:.2f}x" if base and base[1] else "-"
        rps_all = [r.rps for r in runs]
        cpu_all = [r.cpu_ms for r in runs]
        rows.append(
            f"| {client} | {concurrency} | {rps:,.0f} ({min(rps_all):,.0f}-{max(rps_all):,.0f}) | "
            f"{cpu:.3f} ({min(cpu_all):.3f}-{max(cpu_all):.3f}) | {rps_ratio} | {cpu_ratio} | "
            f"{sum(r.errors for r in runs)} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--concurrency", default="1,64,512", help="comma-separated concurrencies")
    parser.add_argument("--requests", type=int, default=4000, help="measured requests per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per client and concurrency")
    parser.add_argument("--stream", action="store_true", help="read streamGenerateContent?alt=sse instead")
    parser.add_argument("--clients", default=None, help="comma-separated subset of httpx,aiohttp,httpx2")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.concurrency = int(args.concurrency)
        _child(args)
        return
    concurrencies = tuple(int(c) for c in args.concurrency.split(","))
    clients = tuple(args.clients.split(",")) if args.clients else None
    started = time.monotonic()
    results = compare(
        concurrencies=concurrencies,
        requests=args.requests,
        rounds=args.rounds,
        stream=args.stream,
        clients=clients,
    )
    kind = "streamGenerateContent?alt=sse (8 chunks)" if args.stream else "generateContent"
    print(
        f"{kind} against tests.fakes.fake_gemini ({MODEL}), {args.requests} requests a run, {args.rounds} rounds"
    )
    print(table(results))
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
