"""``python -m bench``: run every benchmark in one go and write docs/benchmarks.md and docs/benchmarks.png."""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import embedded, machine, peer, queue, report, soak, streaming
from bench.load import Latency, Throughput, run_wrk, sdk_latency, sequential_latency
from bench.procs import ROOT, ProcessGroup, process_group
from bench.stack import FAKE_KEY, MODEL, PROMPT, start_upstream, textgen_body, textgen_on, upstream_body

SECTIONS = ["overhead", "streaming", "queue", "embedded", "soak"]


@dataclass
class Plan:
    latency_requests: int = 300
    latency_warmup: int = 50
    wrk_seconds: float = 15.0
    concurrencies: tuple[int, ...] = (32, 128)
    stream_sequential: int = 30
    stream_steps: tuple[int, ...] = (100, 250, 500, 1000, 2000, 5000)
    queue_tasks: int = 500
    queue_workers: tuple[int, ...] = (1, 2, 4)
    embedded_tokens: int = 256
    embedded_rounds: int = 5
    soak_seconds: float = 600.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            latency_requests=30,
            latency_warmup=5,
            wrk_seconds=2.0,
            stream_sequential=3,
            stream_steps=(20, 50),
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
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _latency(lat: Latency) -> dict[str, Any]:
    out: dict[str, Any] = {"p50": lat.p50, "p99": lat.p99, "n": len(lat.samples_ms), "errors": lat.errors}
    if lat.overhead_ms:
        out["header_p50"], out["header_p99"] = lat.overhead_p50, lat.overhead_p99
    return out


def _throughput(t: Throughput) -> dict[str, Any]:
    return {
        "rps": t.requests_per_second,
        "p50": t.p50_ms,
        "p99": t.p99_ms,
        "requests": t.requests,
        "errors": t.errors,
    }


def measure_path(
    ctx: Context, label: str, url: str, body: dict[str, Any], headers: dict[str, str]
) -> dict[str, Any]:
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
        t = run_wrk(url, body, headers, connections=c, seconds=plan.wrk_seconds)
        out[f"c{c}"] = _throughput(t)
        print(
            f"  {label}: c={c} {t.requests_per_second:,.0f} req/s, p99 {t.p99_ms:.1f} ms, errors {t.errors}",
            flush=True,
        )
    return out


def bench_overhead(ctx: Context) -> None:
    print("== overhead: sync gemini-2.5-flash, fake upstream with zero added latency", flush=True)
    up = start_upstream(ctx.group, "fake-overhead")
    res: dict[str, Any] = {}
    res["direct"] = measure_path(
        ctx, "direct HTTP", up.generate_url, upstream_body(), {"x-goog-api-key": FAKE_KEY}
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
                    ctx, f"textgen ({tg.backend})", url, textgen_body(sync=True), tg.headers
                )
                res[key]["backend"] = tg.backend
        except Exception as exc:  # one configuration failing must not lose the others
            ctx.notes.append(f"textgen on {backend} could not be measured: {str(exc)[-500:]}")
            print(f"!! textgen on {backend} failed: {exc}", flush=True)
    if ctx.with_litellm:
        try:
            with peer.litellm_proxy(ctx.group, ctx.workdir, up) as lite:
                res["litellm"] = measure_path(
                    ctx, f"LiteLLM {lite.version}", lite.chat_url, peer.body(), lite.headers
                )
                res["litellm"].update(version=lite.version, mode=lite.mode)
                ctx.notes.extend(lite.notes)
        except Exception as exc:
            ctx.notes.append(f"LiteLLM could not be measured: {str(exc)[-500:]}")
            print(f"!! LiteLLM failed: {exc}", flush=True)
    ctx.group.stop(up.proc)
    ctx.results["overhead"] = res


def bench_streaming(ctx: Context) -> None:
    print("== streaming: paced fake upstream, 64 chunks 20 ms apart", flush=True)
    plan = ctx.plan
    up = start_upstream(ctx.group, "fake-paced", chunks=64, delay_ms=20)
    res: dict[str, Any] = {}
    body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
    headers = {"x-goog-api-key": FAKE_KEY}
    single = streaming.run_client(up.stream_url, body, headers, plan.stream_sequential, sequential=True)
    res["direct_single"] = _stream_summary(single)
    res["direct_capacity"] = _capacity(
        streaming.step_up(up.stream_url, body, headers, list(plan.stream_steps), up.proc.pid, "direct")
    )
    with textgen_on(ctx.group, "sqlite", up, ctx.workdir, "textgen-stream") as tg:
        url = f"{tg.url}/sse/text_generator/stream/"
        single = streaming.run_client(
            url, textgen_body(), tg.headers, plan.stream_sequential, sequential=True
        )
        res["textgen_single"] = _stream_summary(single)
        res["textgen_capacity"] = _capacity(
            streaming.step_up(
                url, textgen_body(), tg.headers, list(plan.stream_steps), tg.proc.pid, "textgen"
            )
        )
    ctx.group.stop(up.proc)
    d, t = res["direct_single"], res["textgen_single"]
    print(
        f"  added time to first chunk p50 {t['ttfc_p50'] - d['ttfc_p50']:.2f} ms; "
        f"inter-chunk p99 {t['gap_p99']:.1f} ms vs {d['gap_p99']:.1f} ms direct",
        flush=True,
    )
    ctx.results["streaming"] = res


def _stream_summary(run: streaming.StreamRun) -> dict[str, Any]:
    from bench.stats import percentile

    return {
        "streams": run.streams,
        "ttfc_p50": percentile(run.ttfc, 50),
        "ttfc_p99": percentile(run.ttfc, 99),
        "gap_p50": percentile(run.gaps, 50),
        "gap_p99": run.gap_p99,
        "errors": run.errors,
        "rss_per_stream_kib": run.rss_per_stream_kib,
        "peak_rss_kib": run.peak_rss_kib,
        "held": run.held,
        "first_error": run.first_error,
    }


def _capacity(cap: streaming.Capacity) -> dict[str, Any]:
    held = cap.held
    return {
        "steps": [_stream_summary(s) for s in cap.steps],
        "held": held.streams if held else 0,
        "rss_per_stream_kib": held.rss_per_stream_kib if held else None,
    }


def bench_queue(ctx: Context) -> None:
    print("== async queue: create -> done -> webhook delivered", flush=True)
    up = start_upstream(ctx.group, "fake-queue")
    runs = []
    for backend in ("sqlite", "postgres"):
        for n in ctx.plan.queue_workers:
            with textgen_on(
                ctx.group,
                backend,
                up,
                ctx.workdir,
                f"textgen-queue-{backend}-{n}",
                api_worker=False,
                workers=n,
            ) as tg:
                run = asyncio.run(queue.run_queue(tg, ctx.plan.queue_tasks))
            print(
                f"  {run.backend}, {n} worker process(es): {run.done_per_second:,.0f} tasks/s done, "
                f"{run.delivered_per_second:,.0f}/s webhook delivered, errors {run.errors}",
                flush=True,
            )
            runs.append(queue.summary(run))
    ctx.group.stop(up.proc)
    ctx.results["queue"] = runs


def bench_embedded(ctx: Context) -> None:
    print("== embedded model: tokens/s", flush=True)
    plan = ctx.plan
    direct = embedded.direct(plan.embedded_tokens, plan.embedded_rounds)
    up = start_upstream(ctx.group, "fake-embedded")
    with textgen_on(ctx.group, "sqlite", up, ctx.workdir, "textgen-embedded") as tg:
        through = embedded.through_textgen(tg, plan.embedded_tokens, plan.embedded_rounds)
    ctx.group.stop(up.proc)
    print(
        f"  llama-cpp-python {direct.per_second:.1f} tok/s, through textgen {through.per_second:.1f} tok/s",
        flush=True,
    )
    ctx.results["embedded"] = {
        "direct": direct.__dict__ | {"per_second": direct.per_second},
        "textgen": through.__dict__ | {"per_second": through.per_second},
        "max_tokens": plan.embedded_tokens,
        "rounds": plan.embedded_rounds,
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
    "streaming": bench_streaming,
    "queue": bench_queue,
    "embedded": bench_embedded,
    "soak": bench_soak,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run of every benchmark")
    parser.add_argument("--soak-seconds", type=float, help="soak duration (default 600, 20 with --quick)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these benchmarks")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM peer")
    parser.add_argument("--output", type=Path, default=ROOT / "docs", help="where benchmarks.md/.png go")
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.soak_seconds is not None:
        plan.soak_seconds = args.soak_seconds
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of streams need descriptors
    command = shlex.join(["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])])
    info = machine.describe()
    started = time.time()
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="textgen-bench-") as tmp:
        workdir = Path(tmp)
        with process_group(ROOT / "bench" / "results" / "logs") as group:
            ctx = Context(plan, group, workdir, with_litellm=not args.no_litellm)
            for name in args.only or SECTIONS:
                try:
                    RUNNERS[name](ctx)
                except Exception:
                    failed.append(name)
                    print(f"!! {name} failed:\n{traceback.format_exc()}", flush=True)
                    ctx.notes.append(
                        f"The {name} benchmark failed in this run: {traceback.format_exc(limit=1).strip()[-500:]}"
                    )
    elapsed = time.time() - started
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    raw = {
        "command": command,
        "machine": info,
        "plan": plan.__dict__,
        "results": ctx.results,
        "notes": ctx.notes,
        "elapsed_seconds": elapsed,
        "quick": args.quick,
    }
    (results_dir / "results.json").write_text(json.dumps(raw, indent=1, default=str))
    args.output.mkdir(parents=True, exist_ok=True)
    report.write(raw, args.output / "benchmarks.md", args.output / "benchmarks.png")
    print(
        f"wrote {args.output / 'benchmarks.md'} and {args.output / 'benchmarks.png'} in {elapsed:.0f} s",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
