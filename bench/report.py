"""docs/benchmarks.md and docs/benchmarks.png from one run's results."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from bench.stats import fmt, ratio

TARGETS = {
    "added_p50": 2.0,
    "added_p99": 5.0,
    "rps_c32": 1000.0,
    "stream_ttfc": 2.0,
    "streams": 5000,
    "rss_per_stream_kib": 20.0,
    "queue_pg4": 1000.0,
    "queue_sqlite": 500.0,
    "embedded": 0.95,
    "soak_growth": 0.05,
}


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def _overhead(o: dict[str, Any], lines: list[str]) -> None:
    direct, lite = o["direct"], o.get("litellm")
    rows = [
        ("direct HTTP to the fake upstream", "direct"),
        ("google-genai SDK to the fake upstream", "sdk"),
        ("textgen, SQLite", "textgen_sqlite"),
        ("textgen, PostgreSQL + Redis", "textgen_postgres"),
        ("LiteLLM proxy", "litellm"),
    ]
    lines += [
        "## 1. Overhead: sync `gemini-2.5-flash`",
        "",
        "| path | c=1 p50 | c=1 p99 | c=32 req/s | c=32 p99 | c=128 req/s | c=128 p99 | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, key in rows:
        r = o.get(key)
        if not r:
            continue
        lat = r["latency"]
        cells = [fmt(lat["p50"]) + " ms", fmt(lat["p99"]) + " ms"]
        errors = lat["errors"]
        for c in ("c32", "c128"):
            t = r.get(c)
            cells += [fmt(t["rps"], 0), fmt(t["p99"], 1) + " ms"] if t else ["—", "—"]
            errors += t["errors"] if t else 0
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {errors} |")
    lines += [
        "",
        "Added latency over direct HTTP (client-measured difference of percentiles) and the service's own "
        "`x-textgen-overhead-ms` header, which excludes the time waiting on the upstream:",
        "",
        "| path | added p50 | added p99 | header p50 | header p99 | target (≤ 2 / ≤ 5 ms) |",
        "|---|---|---|---|---|---|",
    ]
    for label, key in rows[1:]:
        r = o.get(key)
        if not r:
            continue
        lat = r["latency"]
        add50, add99 = lat["p50"] - direct["latency"]["p50"], lat["p99"] - direct["latency"]["p99"]
        header = (
            (fmt(lat.get("header_p50")) + " ms", fmt(lat.get("header_p99")) + " ms")
            if "header_p50" in lat
            else ("—", "—")
        )
        target = (
            _met(add50 <= TARGETS["added_p50"] and add99 <= TARGETS["added_p99"])
            if key.startswith("textgen")
            else "—"
        )
        lines.append(
            f"| {label} | {fmt(add50)} ms | {fmt(add99)} ms | {header[0]} | {header[1]} | {target} |"
        )
    lines += [
        "",
        "Ratios (textgen ÷ LiteLLM: below 1 is better for latency, above 1 is better for throughput; "
        "textgen ÷ direct upstream the same way):",
        "",
        "| figure | textgen SQLite ÷ LiteLLM | textgen PG ÷ LiteLLM | textgen SQLite ÷ direct | textgen PG ÷ direct |",
        "|---|---|---|---|---|",
    ]
    figures = [
        ("c=1 p50", "latency", "p50"),
        ("c=1 p99", "latency", "p99"),
        ("c=32 req/s", "c32", "rps"),
        ("c=32 p99", "c32", "p99"),
        ("c=128 req/s", "c128", "rps"),
        ("c=128 p99", "c128", "p99"),
    ]
    for label, group, key in figures:

        def get(name: str, group: str = group, key: str = key) -> float | None:
            r = o.get(name)
            return r[group][key] if r and group in r else None

        cells = [
            _x(ratio(get(t), get(b)))
            for b in ("litellm", "direct")
            for t in ("textgen_sqlite", "textgen_postgres")
        ]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    for key in ("textgen_sqlite", "textgen_postgres"):
        r = o.get(key)
        if r and "header_p50" in r["latency"]:
            lat = r["latency"]
            measured = lat["p50"] - direct["latency"]["p50"]
            lines.append(
                f"\nCross-check, {r['backend']}: the header says {fmt(lat['header_p50'])} ms at p50; the client sees "
                f"{fmt(measured)} ms more than direct HTTP. The difference ({fmt(measured - lat['header_p50'])} ms) is "
                "time the header cannot see or counts as upstream time: the provider call around the HTTP exchange "
                "(the SDK's request and response models, the fake's own handling), HTTP parsing before the middleware "
                "and the second loopback hop."
            )
    sdk = o.get("sdk")
    if sdk:
        lines.append(
            f"\nThe google-genai SDK alone adds {fmt(sdk['latency']['p50'] - direct['latency']['p50'])} ms at p50 over "
            "direct HTTP for the same request (pydantic models both ways, its own HTTP client)."
        )
    if lite:
        lines.append(f"\nLiteLLM {lite['version']}: {lite['mode']}.")
    lines.append("")


def _streaming(s: dict[str, Any], lines: list[str]) -> None:
    d, t = s["direct_single"], s["textgen_single"]
    added = t["ttfc_p50"] - d["ttfc_p50"]
    lines += [
        "## 3. Streaming: paced upstream, 64 chunks 20 ms apart",
        "",
        "| path | first chunk p50 | first chunk p99 | inter-chunk p50 | inter-chunk p99 |",
        "|---|---|---|---|---|",
        f"| direct to the fake upstream | {fmt(d['ttfc_p50'])} ms | {fmt(d['ttfc_p99'])} ms | {fmt(d['gap_p50'])} ms | {fmt(d['gap_p99'])} ms |",
        f"| through textgen | {fmt(t['ttfc_p50'])} ms | {fmt(t['ttfc_p99'])} ms | {fmt(t['gap_p50'])} ms | {fmt(t['gap_p99'])} ms |",
        "",
        f"Added time to first chunk: **{fmt(added)} ms** at p50 (target ≤ 2 ms: {_met(added <= TARGETS['stream_ttfc'])}).",
        "",
        "Concurrent streams, stepped up until the p99 delay between chunks passes 50 ms (or an error); "
        "RSS per stream is the server's peak RSS during the step minus its idle RSS, divided by the streams:",
        "",
        "| streams | direct p99 gap | textgen p99 gap | textgen errors | textgen RSS per stream |",
        "|---|---|---|---|---|",
    ]
    direct_steps = {x["streams"]: x for x in s["direct_capacity"]["steps"]}
    for step in s["textgen_capacity"]["steps"]:
        dstep = direct_steps.get(step["streams"])
        lines.append(
            f"| {step['streams']} | {fmt(dstep['gap_p99']) + ' ms' if dstep else '—'} | {fmt(step['gap_p99'])} ms | "
            f"{step['errors']} | {fmt(step['rss_per_stream_kib'], 1)} KiB |"
        )
    held, dheld = s["textgen_capacity"]["held"], s["direct_capacity"]["held"]
    per = s["textgen_capacity"]["rss_per_stream_kib"]
    lines += [
        "",
        f"One textgen process held **{held}** concurrent streams (the fake upstream alone, same client: {dheld}; "
        f"target 5,000: {_met(held >= TARGETS['streams'])}), at {fmt(per, 1)} KiB RSS per open stream "
        f"(target ≤ 20 KB: {_met(per is not None and per <= TARGETS['rss_per_stream_kib'] * 1000 / 1024)}).",
        "",
    ]


def _queue(runs: list[dict[str, Any]], lines: list[str]) -> None:
    lines += [
        "## 4. Async queue: create → done → webhook delivered",
        "",
        "| database | worker processes | tasks | create/s | done/s | webhook delivered/s | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['backend']} | {r['workers']} | {r['tasks']} | {fmt(r['create_per_second'], 0)} | "
            f"{fmt(r['done_per_second'], 0)} | {fmt(r['delivered_per_second'], 0)} | {r['errors']} |"
        )
    best = {
        b: max((r["done_per_second"] for r in runs if r["backend"] == b), default=None)
        for b in ("SQLite", "PostgreSQL + Redis")
    }
    pg4 = next((r["done_per_second"] for r in runs if r["backend"] != "SQLite" and r["workers"] == 4), None)
    lines += [
        "",
        f"Targets: ≥ 1,000 tasks/s on PostgreSQL with 4 processes ({fmt(pg4, 0)}: "
        f"{_met(None if pg4 is None else pg4 >= TARGETS['queue_pg4'])}); ≥ 500/s on SQLite (best {fmt(best['SQLite'], 0)}: "
        f"{_met(None if best['SQLite'] is None else best['SQLite'] >= TARGETS['queue_sqlite'])}).",
        "",
    ]


def _embedded(e: dict[str, Any], lines: list[str]) -> None:
    r = ratio(e["textgen"]["per_second"], e["direct"]["per_second"])
    lines += [
        "## 5. Embedded model: `smollm2-135m-instruct`",
        "",
        "| path | tokens | seconds | tokens/s |",
        "|---|---|---|---|",
        f"| llama-cpp-python directly | {e['direct']['tokens']} | {fmt(e['direct']['seconds'])} | {fmt(e['direct']['per_second'], 1)} |",
        f"| through textgen (sync request) | {e['textgen']['tokens']} | {fmt(e['textgen']['seconds'])} | {fmt(e['textgen']['per_second'], 1)} |",
        "",
        f"textgen reaches **{fmt(None if r is None else r * 100, 1)} %** of llama-cpp-python's tokens/s "
        f"(target ≥ 95 %: {_met(None if r is None else r >= TARGETS['embedded'])}); same prompt, "
        f"max {e['max_tokens']} tokens, {e['rounds']} rounds after a warm-up, the same sampling settings and threads.",
        "",
    ]


def _soak(s: dict[str, Any], lines: list[str]) -> None:
    total, errors = sum(s["requests"].values()), sum(s["errors"].values())
    lines += [
        f"## 6. Soak: {s['seconds']:g} s of mixed load (textgen on SQLite)",
        "",
        "Four sync loops, two streaming loops, two async-and-poll loops, a list+credits loop and an "
        "embedded-model request every second, all at once.",
        "",
        "| kind | requests | errors |",
        "|---|---|---|",
    ]
    for kind, n in sorted(s["requests"].items()):
        lines.append(f"| {kind} | {n:,} | {s['errors'].get(kind, 0)} |")
    lines += [
        "",
        f"RSS of the server process: start (after warm-up) {fmt(s['rss_start_kib'] / 1024, 1)} MiB, "
        f"steady {fmt(s['rss_steady_kib'] / 1024, 1)} MiB, end {fmt(s['rss_end_kib'] / 1024, 1)} MiB: "
        f"growth {s['growth']:+.1%} (target < 5 %: {_met(s['growth'] < TARGETS['soak_growth'])}); "
        f"{total:,} requests, {errors} errors (target zero: {_met(errors == 0)}).",
        "",
    ]
    if s["first_errors"]:
        lines += ["First errors:", "", *[f"- `{e}`" for e in s["first_errors"]], ""]


def write(raw: dict[str, Any], md: Path, png: Path, *, draw: bool = True) -> None:
    res, info = raw["results"], raw["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured in one run on {dt.date.today().isoformat()} with `{raw['command']}` "
        f"({raw['elapsed_seconds'] / 60:.0f} minutes{', quick smoke mode: figures are not meaningful' if raw['quick'] else ''}). "
        "Every server, the fake Gemini upstream and the load generators ran on this one machine, on 127.0.0.1, "
        "so they share its cores: figures are comparable within the run, not absolute.",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- **{k.replace('_', ' ')}**: {v}" for k, v in info.items()]
    lines += [
        "",
        "## What each side did",
        "",
        "- **textgen**: one `textgen serve` process (uvicorn, 1 worker) per configuration; every request "
        "authenticates the API key, checks the per-account rate limit (in process on SQLite, Redis on "
        "PostgreSQL), reserves and settles credits in the ledger and persists the task; the Gemini provider "
        "calls the fake through the google-genai SDK.",
        "- **LiteLLM**: the `litellm` proxy CLI, 1 worker, `LITELLM_LOCAL_MODEL_COST_MAP=True`, one "
        "`gemini/gemini-2.5-flash` model with `api_base` at the fake's `/v1beta`, `/v1/chat/completions` "
        "(its OpenAI-format route; the response is translated).",
        "- **Load**: latency at concurrency 1 from an asyncio httpx client over one keep-alive connection "
        f"({raw['plan']['latency_requests']} requests after {raw['plan']['latency_warmup']} warm-up); throughput with "
        f"`wrk` (2 threads, {raw['plan']['wrk_seconds']:g} s per point), the same JSON body every time.",
        "",
    ]
    if raw["notes"]:
        lines += ["## Notes from this run", "", *[f"- {n}" for n in raw["notes"]], ""]
    if "overhead" in res:
        _overhead(res["overhead"], lines)
    if "streaming" in res:
        _streaming(res["streaming"], lines)
    if "queue" in res:
        _queue(res["queue"], lines)
    if "embedded" in res:
        _embedded(res["embedded"], lines)
    if "soak" in res:
        _soak(res["soak"], lines)
    lines += [
        f"![benchmarks]({png.name})",
        "",
        "Raw figures: `bench/results/results.json` after a run (not committed).",
        "",
    ]
    md.write_text("\n".join(lines))
    if draw:
        plot(res, png)


def plot(res: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    o = res.get("overhead", {})
    names = [
        ("direct", "direct"),
        ("sdk", "SDK"),
        ("textgen_sqlite", "textgen\nSQLite"),
        ("textgen_postgres", "textgen\nPG+Redis"),
        ("litellm", "LiteLLM"),
    ]
    present = [(k, n) for k, n in names if k in o]
    ax = axes[0][0]
    xs = range(len(present))
    ax.bar([x - 0.2 for x in xs], [o[k]["latency"]["p50"] for k, _ in present], 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [o[k]["latency"]["p99"] for k, _ in present], 0.4, label="p99")
    ax.set_xticks(list(xs), [n for _, n in present])
    ax.set_ylabel("ms")
    ax.set_title("sync request latency, concurrency 1")
    ax.legend()
    ax = axes[0][1]
    tput = [(k, n) for k, n in present if "c32" in o[k]]
    xs = range(len(tput))
    ax.bar([x - 0.2 for x in xs], [o[k]["c32"]["rps"] for k, _ in tput], 0.4, label="c=32")
    ax.bar([x + 0.2 for x in xs], [o[k].get("c128", {}).get("rps", 0) for k, _ in tput], 0.4, label="c=128")
    ax.set_xticks(list(xs), [n for _, n in tput])
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (log)")
    ax.set_title("throughput (wrk)")
    ax.legend()
    ax = axes[1][0]
    s = res.get("streaming")
    if s:
        for key, label in (("direct_capacity", "direct"), ("textgen_capacity", "textgen")):
            steps = s[key]["steps"]
            ax.plot([x["streams"] for x in steps], [x["gap_p99"] for x in steps], marker="o", label=label)
        ax.axhline(50, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("p99 inter-chunk delay, ms")
        ax.set_title("streaming capacity (paced 20 ms)")
        ax.legend()
    ax = axes[1][1]
    q = res.get("queue")
    if q:
        for backend in ("SQLite", "PostgreSQL + Redis"):
            rows = [r for r in q if r["backend"] == backend]
            ax.plot(
                [r["workers"] for r in rows],
                [r["done_per_second"] for r in rows],
                marker="o",
                label=f"{backend} done",
            )
            ax.plot(
                [r["workers"] for r in rows],
                [r["delivered_per_second"] for r in rows],
                marker="x",
                linestyle=":",
                label=f"{backend} webhook",
            )
        ax.set_xlabel("worker processes")
        ax.set_ylabel("tasks/s")
        ax.set_title("async queue")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
