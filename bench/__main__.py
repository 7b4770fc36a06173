"""``python -m bench``: run every benchmark in one go and write docs/benchmarks.md and docs/benchmarks.png."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import embedded, machine, peer, profile, queue, report, soak, stack, streaming
from bench.load import Latency, Throughput, run_wrk, sdk_latency, sequential_latency
from bench.procs import ROOT, CpuMeter, ProcessGroup, process_group
from bench.stack import (
    FAKE_KEY,
    MODEL,
    PROMPT,
    Config,
    Textgen,
    Upstream,
    start_upstream,
    textgen_body,
    textgen_config,
    textgen_on,
    upstream_body,
)
from bench.workload import closed_loop, closed_loop_summary, task_burst

# tasks, sync and streams run against the same realistic upstream, on one textgen per configuration.
REALISTIC = ["tasks", "sync", "streams"]
SECTIONS = ["overhead", *REALISTIC, "queue", "embedded", "soak"]


@dataclass
class Plan:
    latency_requests: int = 300
    latency_warmup: int = 50
    wrk_seconds: float = 15.0
    concurrencies: tuple[int, ...] = (16, 32)
    configs: tuple[str, ...] = ("sqlite", "pg1", "pg2", "pg4")
    answer_delay_ms: float = 2000.0  # the realistic upstream answers generateContent after this
    stream_chunks: int = 20  # ... and streams this many chunks
    chunk_delay_ms: float = 100.0  # ... this far apart
    burst_tasks: int = 1000
    sync_connections: int = 256
    sync_seconds: float = 20.0
    streams: int = 1000
    stream_ramp_seconds: float = 1.0
    queue_tasks: int = 1000
    embedded_tokens: int = 256
    embedded_rounds: int = 5
    soak_seconds: float = 600.0

    @classmethod
    def quick(cls) -> Plan:
        """Every section in seconds: small counts, a faster realistic upstream, SQLite and PostgreSQL with 2."""
        return cls(
            latency_requests=30,
            latency_warmup=5,
            wrk_seconds=2.0,
            configs=("sqlite", "pg2"),
            answer_delay_ms=200.0,
            chunk_delay_ms=20.0,
            burst_tasks=60,
            sync_connections=32,
            sync_seconds=2.0,
            streams=40,
            stream_ramp_seconds=0.2,
            queue_tasks=60,
            embedded_tokens=16,
            embedded_rounds=1,
            soak_seconds=20.0,
        )


@dataclass
class Context:
    plan: Plan
    group: ProcessGroup
    workdir: Path
    with_litellm: bool
    profile_dir: Path | None = None  # record py-spy profiles there (--profile)
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # sections or configurations that could not be measured


def _latency(lat: Latency) -> dict[str, Any]:
    out: dict[str, Any] = {"p50": lat.p50, "p99": lat.p99, "n": len(lat.samples_ms), "errors": lat.errors}
    if lat.overhead_ms:
        out["header_p50"], out["header_p99"] = lat.overhead_p50, lat.overhead_p99
    return out


def _throughput(t: Throughput, cpu: CpuMeter, upstream_cpu: CpuMeter | None) -> dict[str, Any]:
    out = {
        "rps": t.requests_per_second,
        "p50": t.p50_ms,
        "p99": t.p99_ms,
        "requests": t.requests,
        "errors": t.errors,
        "cpu_ms_per_request": cpu.ms_per(t.requests),
    }
    if upstream_cpu is not None:
        out["upstream_cpu_ms_per_request"] = upstream_cpu.ms_per(t.requests)
    return out


def measure_path(
    ctx: Context,
    label: str,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    pids: list[int],
    upstream: Upstream | None,
) -> dict[str, Any]:
    """c=1 latency, then wrk at each concurrency with the CPU of ``pids`` (and of the upstream) over each run."""
    plan = ctx.plan
    lat = asyncio.run(
        sequential_latency(url, body, headers, requests=plan.latency_requests, warmup=plan.latency_warmup)
    )
    out: dict[str, Any] = {"latency": _latency(lat)}
    head = f"  {label}: c=1 p50 {lat.p50:.2f} ms, p99 {lat.p99:.2f} ms"
    if lat.overhead_ms:
        head += f" (x-textgen-overhead-ms p50 {lat.overhead_p50:.2f}, p99 {lat.overhead_p99:.2f})"
    print(head, flush=True)
    for c in plan.concurrencies:
        cpu = CpuMeter(pids).start()
        upstream_cpu = CpuMeter([upstream.proc.pid]).start() if upstream else None
        t = run_wrk(url, body, headers, connections=c, seconds=plan.wrk_seconds)
        cpu.stop()
        if upstream_cpu is not None:
            upstream_cpu.stop()
        out[f"c{c}"] = result = _throughput(t, cpu, upstream_cpu)
        print(
            f"  {label}: c={c} {t.requests_per_second:,.0f} req/s, p99 {t.p99_ms:.1f} ms, "
            f"CPU {report.ms(result['cpu_ms_per_request'])} per request, errors {t.errors}",
            flush=True,
        )
    return out


def bench_overhead(ctx: Context) -> None:
    print("== overhead: sync gemini-2.5-flash, fake upstream with zero added latency", flush=True)
    up = start_upstream(ctx.group, "fake-overhead")
    res: dict[str, Any] = {}
    res["direct"] = measure_path(
        ctx,
        "direct HTTP",
        up.generate_url,
        upstream_body(),
        {"x-goog-api-key": FAKE_KEY},
        [up.proc.pid],
        None,
    )
    sdk = asyncio.run(
        sdk_latency(up.url, MODEL, PROMPT, requests=ctx.plan.latency_requests, warmup=ctx.plan.latency_warmup)
    )
    res["sdk"] = {"latency": _latency(sdk)}
    print(f"  google-genai SDK: c=1 p50 {sdk.p50:.2f} ms, p99 {sdk.p99:.2f} ms", flush=True)
    for backend, key in (("sqlite", "textgen_sqlite"), ("postgres", "textgen_postgres")):
        try:
            with textgen_on(ctx.group, backend, up, ctx.workdir, f"textgen-{backend}") as tg:
                url = f"{tg.url}/sse/text_generator/"
                res[key] = measure_path(
                    ctx, f"textgen ({tg.backend})", url, textgen_body(sync=True), tg.headers, tg.pids, up
                )
                res[key]["backend"] = tg.backend
        except Exception as exc:  # one configuration failing must not lose the others
            ctx.failed.append(f"overhead on {backend}")
            ctx.notes.append(f"textgen on {backend} could not be measured: {str(exc)[-500:]}")
            print(f"!! textgen on {backend} failed: {exc}", flush=True)
    if ctx.with_litellm:
        try:
            with peer.litellm_proxy(ctx.group, ctx.workdir, up) as lite:
                assert lite.proc is not None
                res["litellm"] = measure_path(
                    ctx,
                    f"LiteLLM {lite.version}",
                    lite.chat_url,
                    peer.body(),
                    lite.headers,
                    [lite.proc.pid],
                    up,
                )
                res["litellm"].update(version=lite.version, mode=lite.mode)
                ctx.notes.extend(lite.notes)
        except Exception as exc:
            ctx.notes.append(f"LiteLLM could not be measured: {str(exc)[-500:]}")
            print(f"!! LiteLLM failed: {exc}", flush=True)
    ctx.group.stop(up.proc)
    ctx.results["overhead"] = res


@contextmanager
def _profiled(ctx: Context, tg: Textgen, config: Config, label: str) -> Iterator[dict[str, Any]]:
    """py-spy on every textgen process while the block runs, when --profile asked for it."""
    found: dict[str, Any] = {}
    if ctx.profile_dir is None:
        yield found
        return
    names = ["api" if config.backend != "sqlite" else "serve"] + [
        f"worker{i}" for i in range(len(tg.workers))
    ]
    with profile.record(
        list(zip(names, tg.pids, strict=True)), ctx.profile_dir, f"{config.key}-{label}"
    ) as runs:
        yield found
    found["profiles"] = [profile.summary(p) for p in runs]


def bench_realistic(ctx: Context, parts: list[str]) -> None:
    """The tasks, sync and streams sections against the realistic upstream, one textgen per configuration."""
    plan = ctx.plan
    print(
        f"== realistic upstream ({', '.join(parts)}): answers after {plan.answer_delay_ms:g} ms, streams "
        f"{plan.stream_chunks} chunks {plan.chunk_delay_ms:g} ms apart",
        flush=True,
    )
    up = start_upstream(
        ctx.group,
        "fake-realistic",
        chunks=plan.stream_chunks,
        delay_ms=plan.chunk_delay_ms,
        answer_delay_ms=plan.answer_delay_ms,
        stream_delay_ms=0,
    )
    upstream = {
        "answer_delay_ms": plan.answer_delay_ms,
        "chunks": plan.stream_chunks,
        "chunk_delay_ms": plan.chunk_delay_ms,
    }
    out: dict[str, dict[str, Any]] = {part: {"upstream": upstream, "runs": []} for part in parts}
    stream_body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
    direct_headers = {"x-goog-api-key": FAKE_KEY}
    if "sync" in parts:
        run = asyncio.run(
            closed_loop(
                up.generate_url,
                upstream_body(),
                direct_headers,
                connections=plan.sync_connections,
                seconds=plan.sync_seconds,
                warmup=plan.answer_delay_ms / 1000 + 1,
                watch_pids=[up.proc.pid],
            )
        )
        out["sync"]["direct"] = closed_loop_summary(run)
        print(
            f"  direct: {plan.sync_connections} connections {run.requests_per_second:,.1f} req/s", flush=True
        )
    if "streams" in parts:
        run_s = streaming.run_client(
            up.stream_url,
            stream_body,
            direct_headers,
            plan.streams,
            ramp_seconds=plan.stream_ramp_seconds,
            watch_pids=[up.proc.pid],
        )
        out["streams"]["direct"] = streaming.summary(run_s)
        print(
            f"  direct: {plan.streams} streams, first chunk p50 {report.ms(out['streams']['direct']['ttfc_p50'])}, "
            f"p99 gap {report.ms(run_s.gap_p99)}, errors {run_s.errors}",
            flush=True,
        )
    for text in plan.configs:
        config = Config.parse(text)
        try:
            with textgen_config(ctx.group, config, up, ctx.workdir, f"textgen-realistic-{config.key}") as tg:
                _realistic_config(ctx, parts, config, tg, up, out)
        except Exception as exc:
            ctx.failed.append(f"{'/'.join(parts)} on {config.key}")
            ctx.notes.append(
                f"{config.label} could not be measured against the realistic upstream: {str(exc)[-500:]}"
            )
            print(f"!! {config.label} failed:\n{traceback.format_exc()}", flush=True)
    ctx.group.stop(up.proc)
    for part in parts:
        ctx.results[part] = out[part]


def _realistic_config(
    ctx: Context, parts: list[str], config: Config, tg: Textgen, up: Upstream, out: dict[str, dict[str, Any]]
) -> None:
    plan = ctx.plan
    base = {"config": config.key, "label": config.label, "backend": tg.backend, "workers": config.workers}
    if "streams" in parts:
        # First (the server's memory not yet raised by the other runs), after a few streams that warm it up.
        url = f"{tg.url}/sse/text_generator/stream/"
        streaming.run_client(url, textgen_body(), tg.headers, min(20, plan.streams), ramp_seconds=0.2)
        time.sleep(1)
        with _profiled(ctx, tg, config, "streams") as prof:
            run_s = streaming.run_client(
                url,
                textgen_body(),
                tg.headers,
                plan.streams,
                ramp_seconds=plan.stream_ramp_seconds,
                watch_pids=[tg.proc.pid],
                cpu_pids=tg.pids,
            )
        row = base | streaming.summary(run_s) | prof
        out["streams"]["runs"].append(row)
        print(
            f"  {config.label}: {plan.streams} streams, first chunk p50 {report.ms(row['ttfc_p50'])}, "
            f"p99 gap {report.ms(row['gap_p99'])}, RSS/stream {report.fmt(row['rss_per_stream_kib'], 1)} KiB, "
            f"errors {run_s.errors}",
            flush=True,
        )
        time.sleep(1)
    if "tasks" in parts:
        with _profiled(ctx, tg, config, "tasks") as prof:
            burst = asyncio.run(task_burst(tg, up.proc.pid, plan.burst_tasks))
        row = base | burst.__dict__ | {"cpu_ms_per_task": burst.cpu_ms_per_task} | prof
        out["tasks"]["runs"].append(row)
        print(
            f"  {config.label}: {plan.burst_tasks} tasks, first created -> last finished "
            f"{report.seconds(burst.seconds)}, {burst.statuses}, CPU {report.ms(burst.cpu_ms_per_task)} per task",
            flush=True,
        )
        time.sleep(1)
    if "sync" in parts:
        run = asyncio.run(
            closed_loop(
                f"{tg.url}/sse/text_generator/",
                textgen_body(sync=True),
                tg.headers,
                connections=plan.sync_connections,
                seconds=plan.sync_seconds,
                warmup=plan.answer_delay_ms / 1000 + 1,
                watch_pids=tg.pids,
            )
        )
        out["sync"]["runs"].append(base | closed_loop_summary(run))
        print(
            f"  {config.label}: {plan.sync_connections} connections {run.requests_per_second:,.1f} req/s, "
            f"CPU {report.ms(run.cpu_ms_per_request)} per request, errors {run.errors}",
            flush=True,
        )
        time.sleep(1)


def bench_queue(ctx: Context) -> None:
    print("== async queue: create -> done -> webhook delivered, zero-latency upstream", flush=True)
    up = start_upstream(ctx.group, "fake-queue")
    runs = []
    for text in ctx.plan.configs:
        config = Config.parse(text)
        try:
            with textgen_config(ctx.group, config, up, ctx.workdir, f"textgen-queue-{config.key}") as tg:
                run = asyncio.run(queue.run_queue(tg, up.proc.pid, ctx.plan.queue_tasks))
        except Exception as exc:
            ctx.failed.append(f"queue on {config.key}")
            ctx.notes.append(f"The queue on {config.label} could not be measured: {str(exc)[-500:]}")
            print(f"!! {config.label} failed:\n{traceback.format_exc()}", flush=True)
            continue
        print(
            f"  {config.label}: {run.done_per_second:,.0f} tasks/s done, "
            f"{run.delivered_per_second:,.0f}/s webhook delivered, CPU {report.ms(run.cpu_ms_per_task)} per task, "
            f"errors {run.errors}",
            flush=True,
        )
        runs.append({"config": config.key, "label": config.label} | queue.summary(run))
    ctx.group.stop(up.proc)
    ctx.results["queue"] = {"runs": runs}


def bench_embedded(ctx: Context) -> None:
    print("== embedded model: tokens/s", flush=True)
    plan = ctx.plan
    up = start_upstream(ctx.group, "fake-embedded")
    with textgen_on(ctx.group, "sqlite", up, ctx.workdir, "textgen-embedded") as tg:
        found = embedded.compare(tg, plan.embedded_tokens, plan.embedded_rounds)
    ctx.group.stop(up.proc)
    direct, through = found.direct, found.textgen
    spread = f"{min(found.ratios) * 100:.1f}-{max(found.ratios) * 100:.1f} %" if found.ratios else "n/a"
    print(
        f"  llama-cpp-python {direct.per_second:.1f} tok/s, through textgen {through.per_second:.1f} tok/s "
        f"(rounds: {spread} of llama-cpp-python's)",
        flush=True,
    )
    ctx.results["embedded"] = {
        "direct": direct.__dict__ | {"per_second": direct.per_second},
        "textgen": through.__dict__ | {"per_second": through.per_second},
        "max_tokens": plan.embedded_tokens,
        "rounds": plan.embedded_rounds,
        "round_ratios": found.ratios,
    }


def bench_soak(ctx: Context) -> None:
    seconds = ctx.plan.soak_seconds
    print(f"== soak: {seconds:g} s of mixed load", flush=True)
    up = start_upstream(ctx.group, "fake-soak", chunks=16)
    with textgen_on(ctx.group, "sqlite", up, ctx.workdir, "textgen-soak") as tg:
        result = asyncio.run(soak.run_soak(tg, seconds))
    ctx.group.stop(up.proc)
    print(
        f"  {sum(result.requests.values()):,} requests, {sum(result.errors.values())} errors; RSS start "
        f"{result.rss_start / 1024:.1f} MiB, steady {result.rss_steady / 1024:.1f}, end {result.rss_end / 1024:.1f} "
        f"({result.growth:+.1%})",
        flush=True,
    )
    ctx.results["soak"] = {
        "seconds": seconds,
        "requests": dict(result.requests),
        "errors": dict(result.errors),
        "first_errors": result.first_errors,
        "rss_start_kib": result.rss_start,
        "rss_steady_kib": result.rss_steady,
        "rss_end_kib": result.rss_end,
        "growth": result.growth,
        "rss": result.rss,
    }


RUNNERS = {
    "overhead": bench_overhead,
    "queue": bench_queue,
    "embedded": bench_embedded,
    "soak": bench_soak,
}


def _steps(only: list[str] | None) -> list[tuple[str, list[str]]]:
    """The sections in order, the realistic ones run together (one textgen per configuration for all three)."""
    chosen = [name for name in SECTIONS if name in (only or SECTIONS)]
    steps: list[tuple[str, list[str]]] = []
    for name in chosen:
        if name in REALISTIC:
            if not any(step == "realistic" for step, _ in steps):
                steps.append(("realistic", [n for n in chosen if n in REALISTIC]))
        else:
            steps.append((name, [name]))
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of every benchmark, in seconds each"
    )
    parser.add_argument("--soak-seconds", type=float, help="soak duration (default 600, 20 with --quick)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these benchmarks")
    parser.add_argument(
        "--configs",
        nargs="+",
        type=Config.parse,
        help="deployments for tasks, sync, streams and queue: sqlite, pgN (default sqlite pg1 pg2 pg4; "
        "--quick: sqlite pg2)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy profiles during the tasks and streams runs"
    )
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM peer")
    parser.add_argument(
        "--output",
        type=Path,
        help="where benchmarks.md, .json and .png go (default docs/; with --quick, the results directory)",
    )
    parser.add_argument(
        "--results", type=Path, default=ROOT / "bench" / "results", help="where results.json and logs go"
    )
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.soak_seconds is not None:
        plan.soak_seconds = args.soak_seconds
    if args.configs:
        plan.configs = tuple(c.key for c in args.configs)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of streams need descriptors
    command = shlex.join(["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])])
    info = machine.describe()
    info["open files limit"] = f"{hard} (raised from the soft limit for every process the bench starts)"
    started = time.time()
    results_dir: Path = args.results
    with tempfile.TemporaryDirectory(prefix="textgen-bench-") as tmp:
        workdir = Path(tmp)
        with process_group(results_dir / "logs") as group:
            ctx = Context(plan, group, workdir, with_litellm=not args.no_litellm)
            if args.profile:
                ctx.profile_dir = results_dir / "profiles"
            for name, parts in _steps(args.only):
                try:
                    if name == "realistic":
                        bench_realistic(ctx, parts)
                    else:
                        RUNNERS[name](ctx)
                except Exception:
                    ctx.failed.append(name)
                    print(f"!! {name} failed:\n{traceback.format_exc()}", flush=True)
                    ctx.notes.append(
                        f"The {name} benchmark failed in this run: {traceback.format_exc(limit=1).strip()[-500:]}"
                    )
                # what has been measured so far survives a run stopped before its end
                results_dir.mkdir(parents=True, exist_ok=True)
                partial = {"command": command, "results": ctx.results, "notes": ctx.notes}
                (results_dir / "partial.json").write_text(json.dumps(partial, indent=1, default=str))
    elapsed = time.time() - started
    results_dir.mkdir(parents=True, exist_ok=True)
    output: Path = args.output or (results_dir if args.quick else ROOT / "docs")
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    date = dt.date.today().isoformat()
    for section in ctx.results.values():
        section["measured"] = {"date": date, "commit": commit, "command": command}
    results = dict(ctx.results)
    previous_path = output / "benchmarks.json"
    previous = json.loads(previous_path.read_text()) if previous_path.exists() else {}
    full_minutes = previous.get("full_minutes")
    if args.only:  # the sections not re-run keep their last figures
        for name, section in previous.get("results", {}).items():
            results.setdefault(name, section)
    elif not args.quick:
        full_minutes = round(elapsed / 60)
    results = {name: results[name] for name in SECTIONS if name in results}
    raw = {
        "command": command,
        "date": date,
        "commit": commit,
        "machine": info,
        "settings": {"all": stack.SETTINGS, "postgresql": stack.PG_SETTINGS},
        "plan": plan.__dict__,
        "results": results,
        "notes": ctx.notes,
        "elapsed_seconds": elapsed,
        "full_minutes": full_minutes,
        "quick": args.quick,
        "profiled": args.profile,
    }
    text = json.dumps(raw, indent=1, default=str)
    (results_dir / "results.json").write_text(text)
    output.mkdir(parents=True, exist_ok=True)
    (output / "benchmarks.json").write_text(text + "\n")
    report.write(raw, output / "benchmarks.md", output / "benchmarks.png")
    print(
        f"wrote {output / 'benchmarks.md'}, .json and .png in {elapsed:.0f} s",
        flush=True,
    )
    if ctx.failed:
        print(f"!! failed: {', '.join(ctx.failed)}", flush=True)
    return 1 if ctx.failed else 0


if __name__ == "__main__":
    sys.exit(main())
