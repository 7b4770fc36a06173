"""A lean SSE load client on raw asyncio sockets, run as its own process so its CPU is not the server's.

``python -m bench.streamclient SPEC_JSON`` prints one JSON line: per-stream time to first chunk and the gaps
between chunks (ms), the most streams open at once, and errors. SPEC: url, body, headers, streams, ramp_seconds,
sequential. A stream is open from its response's status line to its end. Each time the most streams open at once
passes another twentieth of them (and when it reaches all of them) it writes ``open N`` on a line of its stderr,
so the caller can read the server's memory then.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import sys
import time
from typing import Any
from urllib.parse import urlsplit

MARK = b"data:"


class OpenStreams:
    """How many streams have their response and are not yet finished; says ``open N`` at each new twentieth."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.step = max(1, total // 20)
        self.open = 0
        self.most = 0

    def opened(self) -> None:
        self.open += 1
        if self.open > self.most:
            self.most = self.open
            if self.most % self.step == 0 or self.most == self.total:
                sys.stderr.write(f"open {self.most}\n")
                sys.stderr.flush()

    def closed(self) -> None:
        self.open -= 1


async def one_stream(
    host: str, port: int, path: str, payload: bytes, headers: dict[str, str], streams: OpenStreams
) -> dict[str, Any]:
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        "Accept: text/event-stream",
        "Connection: close",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    counted = False
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        status_line = await reader.readline()
        status = int(status_line.split()[1]) if status_line else 0
        if status == 200:
            streams.opened()
            counted = True
        arrivals: list[float] = []
        tail = b""
        while True:
            data = await reader.read(65536)
            if not data:
                break
            now = time.perf_counter()
            window = tail + data
            count = window.count(MARK) - tail.count(MARK)
            arrivals.extend([now] * count)
            tail = window[-(len(MARK) - 1) :]
    finally:
        if counted:
            streams.closed()
        writer.close()
    if status != 200 or not arrivals:
        return {"error": f"status {status}, {len(arrivals)} chunks"}
    ttfc = (arrivals[0] - started) * 1000
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    return {"ttfc": ttfc, "gaps": gaps, "chunks": len(arrivals)}


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    url = urlsplit(spec["url"])
    path = url.path + (f"?{url.query}" if url.query else "")
    payload = json.dumps(spec["body"]).encode()
    host, port = url.hostname or "127.0.0.1", url.port or 80
    results: list[dict[str, Any]] = []
    streams = OpenStreams(1 if spec.get("sequential") else spec["streams"])

    async def guarded(delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            results.append(await one_stream(host, port, path, payload, spec["headers"], streams))
        except OSError as exc:
            results.append({"error": repr(exc)})

    if spec.get("sequential"):
        for _ in range(spec["streams"]):
            await guarded(0)
    else:
        n, ramp = spec["streams"], spec.get("ramp_seconds", 1.0)
        await asyncio.gather(*(guarded(ramp * i / n) for i in range(n)))
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    return {
        "ttfc": [r["ttfc"] for r in ok],
        "gaps": [g for r in ok for g in r["gaps"]],
        "chunks": [r["chunks"] for r in ok],
        "most_open": streams.most,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    spec = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(run(spec))))


if __name__ == "__main__":
    main()
