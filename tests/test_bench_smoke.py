"""The benchmark's own pieces in a tiny configuration, so the bench code does not rot between runs."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from pathlib import Path

import httpx
import pytest
from bench import profile, report
from bench.__main__ import Plan, _steps
from bench.__main__ import main as bench_main
from bench.load import parse_wrk, sequential_latency, wrk_script
from bench.procs import CpuMeter, process_group, rss_total_kib
from bench.stack import FAKE_KEY, Config, start_upstream, textgen_body, textgen_on, upstream_body
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
    # the page again from the recorded figures, keeping what follows the hand-written line
    figures = tmp_path / "again.json"
    figures.write_text(json.dumps(raw))
    (tmp_path / "again.md").write_text(f"old figures\n{report.KEPT}\n\n## Written by hand\n")
    report.main([str(figures)])
    again = (tmp_path / "again.md").read_text()
    assert "old figures" not in again and "| textgen, SQLite | 3.00 ms | 2.00 ms |" in again
    assert again.endswith(f"{report.KEPT}\n\n## Written by hand\n")
    assert (tmp_path / "again.png").stat().st_size > 0


def test_cpu_meter_counts_this_process() -> None:
    meter = CpuMeter([os.getpid()]).start()
    spent = time.process_time()
    while time.process_time() - spent < 0.05:  # burn CPU, not wall-clock time
        sum(range(1000))
    assert meter.stop() > 0
    assert meter.ms_per(10) == meter.seconds * 100
    assert CpuMeter([os.getpid()]).ms_per(0) is None
    assert rss_total_kib([os.getpid()]) > 0


def test_configs_and_sections() -> None:
    assert Config.parse("sqlite") == Config("sqlite", 0)
    assert Config.parse("pg4") == Config("postgres", 4)
    assert Config.parse("pg4").key == "pg4"
    for bad in ("pg0", "pg", "mysql"):
        with pytest.raises(ValueError):
            Config.parse(bad)
    # tasks, sync and streams share one textgen per configuration, wherever they are named
    assert _steps(["queue", "streams", "tasks"]) == [
        ("realistic", ["tasks", "streams"]),
        ("queue", ["queue"]),
    ]
    assert [name for name, _ in _steps(None)] == ["overhead", "realistic", "queue", "embedded", "soak"]
    assert Plan().burst_tasks == Plan().streams == 1000
    assert Plan().answer_delay_ms == 2000 and Plan().sync_connections == 256


def test_profile_summary_from_raw_samples() -> None:
    raw = "\n".join(
        [
            'process 7:"python -m textgen serve";thread (7): MainThread;run (/x/lib/python3.11/asyncio/runners.py:1);'
            "handle (/w/src/textgen/http/app.py:3);dumps (/w/.venv/lib/python3.11/site-packages/orjson/x.py:9) 6",
            'process 7:"python -m textgen serve";thread (7): MainThread;run (/x/lib/python3.11/asyncio/runners.py:1);'
            "handle (/w/src/textgen/http/app.py:4) 2",
            'process 7:"python -m textgen serve";thread (7): MainThread;run (/x/lib/python3.11/asyncio/runners.py:1) 2',
            'process 7:"python -m textgen serve";thread (8): textgen-sqlite_0;'
            "_worker (/x/lib/python3.11/concurrent/futures/thread.py:81) 5",
            'process 7:"python -m textgen serve";thread (8): textgen-sqlite_0;'
            "_worker (/x/lib/python3.11/concurrent/futures/thread.py:83);"
            "commit (/w/.venv/lib/python3.11/site-packages/sqlalchemy/engine/base.py:1) 2",
        ]
    )
    stacks = profile.parse_raw(raw + "\nnot a sample line")
    assert sum(stacks.values()) == 17
    got = profile.summary(profile.Profile("serve", 7, 1.0, stacks))
    assert got["samples"] == 12 and got["waiting_samples"] == 5  # the idle executor thread is not work
    assert got["busy"] == 0.12
    assert dict(got["threads"]) == {"MainThread": 10 / 12, "textgen-sqlite_0": 2 / 12}
    assert dict(got["packages"]) == {
        "orjson": 0.5,
        "textgen.http": 2 / 12,
        "sqlalchemy": 2 / 12,
        "asyncio": 2 / 12,
    }
    assert got["self"][0] == ("dumps (orjson/x.py)", 0.5)
    # a frame under (nearly) all of its thread's samples is left out: the event loop's run, the executor's worker
    assert dict(got["textgen"]) == {"handle (textgen/http/app.py)": 8 / 12}
    assert "run (asyncio/runners.py)" not in dict(got["total"])
    assert "_worker (concurrent/futures/thread.py)" not in dict(got["total"])


def test_targets_say_missed_with_the_figure() -> None:
    res = {
        "overhead": {
            "direct": {"latency": {"p50": 0.5, "p99": 1.0}},
            "textgen_sqlite": {
                "latency": {"p50": 1.5, "p99": 9.0},
                "c16": {"cpu_ms_per_request": 6.25},
                "c32": {"rps": 900.0},
            },
        },
        "queue": {
            "runs": [
                {"config": "pg1", "label": "pg 1", "done_per_second": 100.0, "delivered_per_second": 99.0},
                {"config": "pg4", "label": "pg 4", "done_per_second": 50.0, "delivered_per_second": 10.0},
            ]
        },
    }
    rows = dict(report.target_rows(res))
    cpu = rows["CPU per sync request, zero-latency upstream, 16 connections, SQLite"]
    assert cpu == "**missed**: 6.25 ms (target ≤ 1.0 ms)"
    assert rows["Added latency at concurrency 1 over direct HTTP, p50, SQLite"].startswith("met: 1.00 ms")
    assert rows["Added latency at concurrency 1 over direct HTTP, p99, SQLite"].startswith(
        "**missed**: 8.00 ms"
    )
    assert rows["Sync req/s at 32 connections, one process (SQLite)"].startswith("met: 900 req/s")
    assert rows["Queue on PostgreSQL: 4 worker processes ÷ 1"].startswith("**missed**: 0.50x")
    assert rows["Webhook delivery keeps up with tasks done, pg 1"].startswith("met")
    assert rows["Webhook delivery keeps up with tasks done, pg 4"].startswith("**missed**: 10 delivered/s")


def test_fake_upstream_streams_without_the_answer_delay(tmp_path: Path) -> None:
    with process_group(tmp_path / "logs") as group:
        upstream = start_upstream(
            group, "fake", chunks=3, delay_ms=1, answer_delay_ms=60_000, stream_delay_ms=0
        )
        body = upstream_body()
        with httpx.stream(
            "POST", upstream.stream_url, json=body, headers={"x-goog-api-key": FAKE_KEY}, timeout=30
        ) as response:
            events = [line for line in response.iter_lines() if line.startswith("data:")]
        assert len(events) == 3  # streamed at once although every generateContent waits a minute
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(upstream.generate_url, json=body, headers={"x-goog-api-key": FAKE_KEY}, timeout=1)


@pytest.mark.timeout(600)  # eight textgen deployments started on a shared machine
def test_quick_plan_of_the_realistic_and_queue_sections(tmp_path: Path) -> None:
    """tasks, sync, streams and queue in their quick plan on SQLite and PostgreSQL with 2 workers: every figure
    produced, and every task, request, stream and webhook accounted for."""
    argv = ["--quick", "--only", "tasks", "sync", "streams", "queue", "--no-litellm"]
    argv += ["--output", str(tmp_path), "--results", str(tmp_path / "results")]
    assert bench_main(argv) == 0
    raw = json.loads((tmp_path / "benchmarks.json").read_text())
    plan, res = raw["plan"], raw["results"]
    assert list(res) == ["tasks", "sync", "streams", "queue"]
    configs = list(plan["configs"])
    assert configs == ["sqlite", "pg2"]
    for section in ("tasks", "sync", "streams"):
        assert [r["config"] for r in res[section]["runs"]] == configs
        assert res[section]["measured"]["command"] == raw["command"]

    for run in res["tasks"]["runs"]:
        assert run["created"] == plan["burst_tasks"] and run["create_errors"] == 0
        assert run["statuses"] == {"done": plan["burst_tasks"]}
        assert run["seconds"] is not None and run["seconds"] >= plan["answer_delay_ms"] / 1000
        assert run["cpu_ms_per_task"] > 0
    assert res["tasks"]["runs"][1]["workers"] == 2

    direct = res["sync"]["direct"]
    for run in [direct, *res["sync"]["runs"]]:
        assert run["requests"] > 0 and run["errors"] == 0
        assert run["p50"] >= plan["answer_delay_ms"]  # every answer waited for the upstream
        assert run["cpu_ms_per_request"] > 0

    for run in [res["streams"]["direct"], *res["streams"]["runs"]]:
        assert run["errors"] == 0 and run["completed"] == plan["streams"]
        assert run["chunks_min"] >= plan["stream_chunks"]  # every upstream chunk relayed
        assert 0 < run["ttfc_p50"] <= run["ttfc_p99"] and 0 < run["gap_p50"] <= run["gap_p99"]
        assert 0 < run["most_open"] <= plan["streams"]
        # memory per stream is read when the most were open at once
        assert run["rss_per_stream_kib"] is not None and run["most_open_rss_kib"] > 0
        assert run["idle_rss_kib"] > 0 and run["peak_rss_kib"] >= run["idle_rss_kib"]
        assert run["cpu_ms_per_stream"] > 0

    queue = res["queue"]["runs"]
    assert [r["config"] for r in queue] == configs
    for run in queue:
        assert run["tasks"] == plan["queue_tasks"] and run["errors"] == 0
        assert run["done_per_second"] > 0 and run["delivered_per_second"] > 0
        assert run["cpu_ms_per_task"] > 0

    text = (tmp_path / "benchmarks.md").read_text()
    for heading in ("## Targets", "## 2. ", "## 3. ", "## 4. ", "## 5. ", "## Regenerating this page"):
        assert heading in text
    assert (
        f"| {plan['burst_tasks']} async tasks, 0.2 s upstream, first create to last done, SQLite | " in text
    )
    assert (tmp_path / "benchmarks.png").stat().st_size > 0
