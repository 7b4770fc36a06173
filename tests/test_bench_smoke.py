"""The benchmark's own pieces in a tiny configuration, so the bench code does not rot between runs."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from bench import report
from bench.load import parse_wrk, sequential_latency, wrk_script
from bench.procs import process_group
from bench.stack import FAKE_KEY, start_upstream, textgen_body, textgen_on, upstream_body
from bench.stats import percentile, ratio

WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:1/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  600.00us  12.00ms   90.00%
  Latency Distribution
     50%  1.95ms
     75%    2.20ms
     90%    2.60ms
     99%  850.00us
  31000 requests in 2.00s, 9.00MB read
  Non-2xx or 3xx responses: 3
  Socket errors: connect 0, read 1, write 0, timeout 0
Requests/sec:  15500.25
Transfer/sec:      4.50MB
"""


def test_wrk_output_and_script() -> None:
    result = parse_wrk(WRK_OUTPUT, connections=32, seconds=2)
    assert result.requests_per_second == 15500.25
    assert result.p50_ms == 1.95
    assert result.p99_ms == 0.85
    assert result.requests == 31000
    assert result.errors == 4
    script = wrk_script({"a": 1}, {"X-API-ID": "id"})
    assert 'wrk.method = "POST"' in script
    assert 'wrk.body = [==[{"a": 1}]==]' in script
    assert 'wrk.headers["X-API-ID"] = "id"' in script


def test_stats() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert math.isnan(percentile([], 50))
    assert ratio(1.0, 0.0) is None
    assert ratio(1.0, 4.0) == 0.25


def test_overhead_measurement_against_the_fake(tmp_path: Path) -> None:
    with process_group(tmp_path / "logs") as group:
        upstream = start_upstream(group, "fake")
        direct = asyncio.run(
            sequential_latency(
                upstream.generate_url, upstream_body(), {"x-goog-api-key": FAKE_KEY}, requests=5, warmup=1
            )
        )
        with textgen_on(group, "sqlite", upstream, tmp_path, "textgen") as server:
            through = asyncio.run(
                sequential_latency(
                    f"{server.url}/sse/text_generator/",
                    textgen_body(sync=True),
                    server.headers,
                    requests=5,
                    warmup=1,
                )
            )
    assert group.procs == []  # everything the bench started was stopped
    assert direct.errors == through.errors == 0
    assert len(direct.samples_ms) == len(through.samples_ms) == 5
    assert direct.overhead_ms == []  # the fake sends no overhead header
    assert len(through.overhead_ms) == 5  # textgen sends it on every response
    for figure in (direct.p50, direct.p99, through.p50, through.p99, through.overhead_p50):
        assert math.isfinite(figure) and figure > 0
    # The header counts time inside textgen only, so it can never exceed what the client measured.
    for client_ms, header_ms in zip(through.samples_ms, through.overhead_ms, strict=True):
        assert header_ms <= client_ms


def test_report_from_partial_results(tmp_path: Path) -> None:
    latency = {"p50": 1.0, "p99": 2.0, "n": 5, "errors": 0}
    raw = {
        "command": "python -m bench --quick",
        "machine": {"cpu": "test", "cores": "2"},
        "plan": {"latency_requests": 5, "latency_warmup": 1, "wrk_seconds": 1},
        "results": {
            "overhead": {
                "direct": {"latency": latency},
                "textgen_sqlite": {
                    "latency": {**latency, "p50": 3.0, "header_p50": 1.5, "header_p99": 2.5},
                    "backend": "SQLite",
                },
            },
            "embedded": {
                "direct": {"tokens": 10, "seconds": 1.0, "per_second": 10.0},
                "textgen": {"tokens": 10, "seconds": 1.1, "per_second": 9.1},
                "max_tokens": 10,
                "rounds": 1,
            },
        },
        "notes": ["a note"],
        "elapsed_seconds": 60,
        "quick": True,
    }
    report.write(raw, tmp_path / "b.md", tmp_path / "b.png", draw=False)
    text = (tmp_path / "b.md").read_text()
    assert "| textgen, SQLite | 3.00 ms | 2.00 ms |" in text
    assert "91.0 %" in text
    # matplotlib comes with the optional "bench" dependencies only.
    pytest.importorskip("matplotlib")
    report.plot(raw["results"], tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 0
