"""docs/benchmarks.md and docs/benchmarks.png from one run's results (sections not re-run come from the last run).

Everything above ``KEPT`` in docs/benchmarks.md is written here from the figures; what follows that line is
written by hand and kept as it is.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bench.stats import fmt, ratio

KEPT = "<!-- Below this line the sections are written by hand: bench/report.py keeps them as they are. -->"

TARGETS = {
    "cpu_c16": 1.0,  # ms of CPU per sync request, every textgen process, 16 connections
    "added_p50": 1.5,
    "added_p99": 3.0,
    "rps_c32": 800.0,
    "tasks_seconds": 8.0,  # 1,000 async tasks against the 2 s upstream, one process on SQLite
    "stream_ttfc_added": 50.0,  # ms at p50
    "stream_gap_ratio": 2.0,  # p99 inter-chunk gap / direct's
    "rss_per_stream_kb": 50.0,
    "queue_sqlite": 500.0,
    "webhooks_keep_up": 0.9,  # delivered/s at least this share of done/s
    "embedded": 0.95,
    "soak_growth": 0.05,
}

REGENERATE = """\
## Regenerating this page

```sh
make bench                         # = .venv/bin/python -m bench: every section{minutes}
.venv/bin/python -m bench --only tasks sync streams queue --no-litellm   # some sections; the others are kept
.venv/bin/python -m bench --quick  # a smoke run of everything in a few minutes, written to bench/results/
```

`--only SECTION...` re-runs those sections (overhead, tasks, sync, streams, queue, embedded, soak) and keeps the
others' figures from `docs/benchmarks.json`, each section saying when and at which commit it was measured.
`--configs sqlite pg1 pg4` chooses the deployments; `--profile` records py-spy profiles of every textgen process
during the tasks and streams runs (they slow the server a little, so figures of a profiled run say so);
`--quick` writes to `bench/results/` unless `--output` says otherwise. `.venv/bin/python -m bench.report` writes
this page and its plot again from `docs/benchmarks.json` without measuring. Nothing on this page is edited by hand
above the line that says so near its end.
"""


def ms(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f} ms"


def seconds(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.2f} s"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def verdict(value: float | None, ok: bool | None, shown: str, target: str) -> str:
    """``met (shown)`` or ``**missed**: shown (target ...)``; n/a without a figure."""
    if value is None or ok is None or (isinstance(value, float) and math.isnan(value)):
        return f"n/a (target {target})"
    return f"met: {shown} (target {target})" if ok else f"**missed**: {shown} (target {target})"


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _stamp(section: dict[str, Any] | list[Any], raw: dict[str, Any]) -> str:
    meta = section.get("measured") if isinstance(section, dict) else None
    if meta and meta.get("command") != raw.get("command"):
        return f"Measured {meta['date']} at {meta['commit']} with `{meta['command']}` (an earlier run than the rest)."
    return ""


# -- targets -------------------------------------------------------------------------------------------------


def target_rows(res: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    o = res.get("overhead") or {}
    sq = o.get("textgen_sqlite")
    cpu16 = _get(sq, "c16", "cpu_ms_per_request")
    rows.append(
        (
            "CPU per sync request, zero-latency upstream, 16 connections, SQLite",
            verdict(cpu16, cpu16 is not None and cpu16 <= TARGETS["cpu_c16"], ms(cpu16, 2), "≤ 1.0 ms"),
        )
    )
    direct = o.get("direct")
    if sq and direct:
        add50 = sq["latency"]["p50"] - direct["latency"]["p50"]
        add99 = sq["latency"]["p99"] - direct["latency"]["p99"]
        rows.append(
            (
                "Added latency at concurrency 1 over direct HTTP, p50, SQLite",
                verdict(add50, add50 <= TARGETS["added_p50"], ms(add50), "≤ 1.5 ms"),
            )
        )
        rows.append(
            (
                "Added latency at concurrency 1 over direct HTTP, p99, SQLite",
                verdict(add99, add99 <= TARGETS["added_p99"], ms(add99), "≤ 3 ms"),
            )
        )
    rps = _get(sq, "c32", "rps")
    rows.append(
        (
            "Sync req/s at 32 connections, one process (SQLite)",
            verdict(
                rps, rps is not None and rps >= TARGETS["rps_c32"], fmt(rps, 0) + " req/s", "≥ 800 req/s"
            ),
        )
    )
    tasks = res.get("tasks")
    if tasks:
        n = tasks["runs"][0]["tasks"] if tasks["runs"] else 1000
        for run in tasks["runs"]:
            if run["config"] != "sqlite":
                continue
            secs = run["seconds"]
            rows.append(
                (
                    f"{n:,} async tasks, {tasks['upstream']['answer_delay_ms'] / 1000:g} s upstream, first create to "
                    "last done, SQLite",
                    verdict(
                        secs if secs is not None else math.inf,
                        secs is not None and secs <= TARGETS["tasks_seconds"],
                        seconds(secs) if secs is not None else "not all finished",
                        "≤ 8 s",
                    ),
                )
            )
    streams = res.get("streams")
    if streams and streams.get("direct"):
        d = streams["direct"]
        for run in streams["runs"]:
            added = run["ttfc_p50"] - d["ttfc_p50"]
            gap = ratio(run["gap_p99"], d["gap_p99"])
            per = _rss_per_stream(run)
            label = f"{run['streams']:,} streams, {run['label']}"
            rows.append(
                (
                    f"{label}: added time to first chunk, p50",
                    verdict(added, added <= TARGETS["stream_ttfc_added"], ms(added, 1), "≤ 50 ms"),
                )
            )
            rows.append(
                (
                    f"{label}: p99 inter-chunk gap ÷ direct's",
                    verdict(
                        gap,
                        gap is not None and gap <= TARGETS["stream_gap_ratio"],
                        f"{_x(gap)} ({ms(run['gap_p99'], 1)} vs {ms(d['gap_p99'], 1)})",
                        "≤ 2x",
                    ),
                )
            )
            kb = None if per is None else per * 1024 / 1000
            rows.append(
                (
                    f"{label}: RSS per open stream",
                    verdict(
                        kb,
                        kb is not None and kb <= TARGETS["rss_per_stream_kb"],
                        f"{fmt(kb, 1)} KB"
                        + (
                            f" (at most {run['most_open']:,} open at once)"
                            if run["most_open"] < run["streams"]
                            else ""
                        ),
                        "≤ 50 KB",
                    ),
                )
            )
            if run["errors"] or run["completed"] < run["streams"]:
                rows.append(
                    (
                        f"{label}: every stream completed",
                        f"**missed**: {run['completed']:,} of {run['streams']:,}, {run['errors']} errors",
                    )
                )
    q = res.get("queue")
    if q:
        runs = q["runs"] if isinstance(q, dict) else q
        by = {r["config"]: r for r in runs}
        s = by.get("sqlite")
        if s:
            rows.append(
                (
                    "Queue, zero-latency upstream, create → done, SQLite",
                    verdict(
                        s["done_per_second"],
                        s["done_per_second"] >= TARGETS["queue_sqlite"],
                        f"{fmt(s['done_per_second'], 0)} tasks/s",
                        "≥ 500/s",
                    ),
                )
            )
        if "pg1" in by and "pg4" in by:
            one, four = by["pg1"]["done_per_second"], by["pg4"]["done_per_second"]
            rows.append(
                (
                    "Queue on PostgreSQL: 4 worker processes ÷ 1",
                    verdict(
                        four / one if one else None,
                        four >= one,
                        f"{_x(four / one if one else None)} ({fmt(four, 0)} vs {fmt(one, 0)} tasks/s)",
                        "≥ 1x",
                    ),
                )
            )
        for r in runs:
            share = ratio(r["delivered_per_second"], r["done_per_second"])
            rows.append(
                (
                    f"Webhook delivery keeps up with tasks done, {r['label']}",
                    verdict(
                        share,
                        share is not None and share >= TARGETS["webhooks_keep_up"],
                        f"{fmt(r['delivered_per_second'], 0)} delivered/s vs {fmt(r['done_per_second'], 0)} done/s",
                        "≥ 90 % of done/s",
                    ),
                )
            )
    e = res.get("embedded")
    if e:
        r = ratio(e["textgen"]["per_second"], e["direct"]["per_second"])
        rows.append(
            (
                "Embedded model, share of llama-cpp-python's tokens/s",
                verdict(
                    r,
                    r is not None and r >= TARGETS["embedded"],
                    f"{fmt(None if r is None else r * 100, 1)} %",
                    "≥ 95 %",
                ),
            )
        )
    soak = res.get("soak")
    if soak:
        errors = sum(soak["errors"].values())
        rows.append(
            (
                f"Soak, {soak['seconds']:g} s mixed: RSS growth",
                verdict(
                    soak["growth"], soak["growth"] < TARGETS["soak_growth"], f"{soak['growth']:+.1%}", "< 5 %"
                ),
            )
        )
        rows.append(("Soak: errors", verdict(errors, errors == 0, str(errors), "0")))
    return rows


# -- sections ------------------------------------------------------------------------------------------------


def _overhead(o: dict[str, Any], raw: dict[str, Any], lines: list[str]) -> None:
    direct, lite = o["direct"], o.get("litellm")
    rows = [
        ("direct HTTP to the fake upstream", "direct"),
        ("google-genai SDK to the fake upstream", "sdk"),
        ("textgen, SQLite", "textgen_sqlite"),
        ("textgen, PostgreSQL + Redis", "textgen_postgres"),
        ("LiteLLM proxy", "litellm"),
    ]
    points = sorted(
        int(k[1:]) for r in o.values() if isinstance(r, dict) for k in r if k[:1] == "c" and k[1:].isdigit()
    )
    points = sorted(set(points))
    lines += [
        "## 1. Overhead: sync `gemini-2.5-flash`, zero-latency upstream",
        "",
        _stamp(o, raw),
        "",
        "CPU per request is user + system time of every process of the system under test (textgen, LiteLLM, or "
        "the fake upstream for direct HTTP), read from `/proc/PID/stat` before and after each `wrk` run, divided "
        "by the requests; the fake upstream's own CPU per request is in the last columns.",
        "",
    ]
    head = "| path | c=1 p50 | c=1 p99 |"
    rule = "|---|---|---|"
    for c in points:
        head += f" c={c} req/s | c={c} p99 | c={c} CPU/request |"
        rule += "---|---|---|"
    head += " upstream CPU/request | errors |"
    rule += "---|---|"
    lines += [head, rule]
    for label, key in rows:
        r = o.get(key)
        if not r:
            continue
        lat = r["latency"]
        cells = [ms(lat["p50"]), ms(lat["p99"])]
        errors = lat["errors"]
        up_cpu = None
        for c in points:
            t = r.get(f"c{c}")
            if t:
                cells += [fmt(t["rps"], 0), ms(t["p99"], 1), ms(t.get("cpu_ms_per_request"), 3)]
                errors += t["errors"]
                up_cpu = t.get("upstream_cpu_ms_per_request", up_cpu)
            else:
                cells += ["—", "—", "—"]
        cells.append(ms(up_cpu, 3) if up_cpu is not None else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {errors} |")
    lines += [
        "",
        "Added latency over direct HTTP (client-measured difference of percentiles) and the service's own "
        "`x-textgen-overhead-ms` header, which excludes the time waiting on the upstream:",
        "",
        "| path | added p50 | added p99 | header p50 | header p99 |",
        "|---|---|---|---|---|",
    ]
    for label, key in rows[1:]:
        r = o.get(key)
        if not r:
            continue
        lat = r["latency"]
        add50, add99 = lat["p50"] - direct["latency"]["p50"], lat["p99"] - direct["latency"]["p99"]
        header = (ms(lat.get("header_p50")), ms(lat.get("header_p99"))) if "header_p50" in lat else ("—", "—")
        lines.append(f"| {label} | {ms(add50)} | {ms(add99)} | {header[0]} | {header[1]} |")
    if lite:
        lines += [
            "",
            "Ratios to LiteLLM in the same run (below 1 is better for latency and CPU, above 1 for throughput):",
            "",
            "| figure | textgen SQLite ÷ LiteLLM | textgen PG ÷ LiteLLM |",
            "|---|---|---|",
        ]
        figures = [("c=1 p50", "latency", "p50"), ("c=1 p99", "latency", "p99")]
        for c in points:
            figures += [
                (f"c={c} req/s", f"c{c}", "rps"),
                (f"c={c} CPU/request", f"c{c}", "cpu_ms_per_request"),
            ]
        for label, group, key in figures:
            cells = [
                _x(ratio(_get(o, t, group, key), _get(o, "litellm", group, key)))
                for t in ("textgen_sqlite", "textgen_postgres")
            ]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
        lines.append(f"\nLiteLLM {lite['version']}: {lite['mode']}.")
    sdk = o.get("sdk")
    if sdk:
        lines.append(
            f"\nThe google-genai SDK alone adds {ms(sdk['latency']['p50'] - direct['latency']['p50'])} at p50 over "
            "direct HTTP for the same request (textgen no longer calls it for generation; shown for scale)."
        )
    lines.append("")


def _tasks(t: dict[str, Any], raw: dict[str, Any], lines: list[str]) -> None:
    up = t["upstream"]
    n = t["runs"][0]["tasks"] if t["runs"] else 0
    lines += [
        f"## 2. {n:,} async tasks against an upstream that answers after {up['answer_delay_ms'] / 1000:g} s",
        "",
        _stamp(t, raw),
        "",
        f"{n:,} async tasks (no webhook) created at once, 32 requests at a time over keep-alive connections "
        "(aiohttp); the time is from the first task's `created_at` to the last task's `updated_at` when it "
        "finished, both from the database. CPU per task is every textgen process (API and workers) from the first "
        "create to the last finished, divided by the tasks. With no limit of its own, the upstream would finish "
        f"them about {up['answer_delay_ms'] / 1000:g} s after the last create.",
        "",
        "| deployment | created | create/s | first create → last done | done | failed | CPU/task (textgen) | CPU/task (upstream) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in t["runs"]:
        rate = r["created"] / r["create_seconds"] if r["create_seconds"] else None
        secs = seconds(r["seconds"]) if r["seconds"] is not None else "**not all finished**"
        lines.append(
            f"| {r['label']} | {r['created']:,} | {fmt(rate, 0)} | {secs} | {r['statuses'].get('done', 0):,} | "
            f"{r['statuses'].get('failed', 0):,} | {ms(r['cpu_ms_per_task'], 2)} | "
            f"{ms(r['upstream_cpu_seconds'] * 1000 / r['created'] if r['created'] else None, 3)} |"
        )
        if r.get("first_error"):
            lines.append(f"| | first create error: `{r['first_error'][:200]}` | | | | | | |")
    lines.append("")


def _sync(s: dict[str, Any], raw: dict[str, Any], lines: list[str]) -> None:
    up, d = s["upstream"], s.get("direct")
    c = d["connections"] if d else (s["runs"][0]["connections"] if s["runs"] else 0)
    window = d["seconds"] if d else (s["runs"][0]["seconds"] if s["runs"] else 0)
    ideal = c / (up["answer_delay_ms"] / 1000)
    lines += [
        f"## 3. Sync requests at {c} connections against the {up['answer_delay_ms'] / 1000:g} s upstream",
        "",
        _stamp(s, raw),
        "",
        f"{c} aiohttp clients, each sending the next sync request as soon as its last one was answered; the "
        f"requests answered within a {window:g} s window (after every connection was busy) are counted, and CPU is "
        f"read over that window. The upstream's limit is {c} / {up['answer_delay_ms'] / 1000:g} s = "
        f"{ideal:,.0f} req/s.",
        "",
        "| path | req/s | ÷ the upstream's limit | p50 | p99 | errors | CPU/request |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = ([("direct HTTP to the fake upstream (its CPU)", d)] if d else []) + [
        (r["label"], r) for r in s["runs"]
    ]
    for label, r in rows:
        lines.append(
            f"| {label} | {fmt(r['rps'], 1)} | {_x(ratio(r['rps'], ideal))} | {ms(r['p50'], 0)} | {ms(r['p99'], 0)} | "
            f"{r['errors']} | {ms(r['cpu_ms_per_request'], 2)} |"
        )
    firsts = [f"{r['label']}: `{r['first_error'][:200]}`" for _, r in rows if r.get("first_error")]
    if firsts:
        lines += ["", "First errors: " + "; ".join(firsts)]
    lines.append("")


def _rss_per_stream(run: dict[str, Any]) -> float | None:
    """KiB per open stream; None for runs whose client counted a stream open from its TCP connect, before the
    server had taken it: that figure is not memory per served stream."""
    return run["rss_per_stream_kib"] if "most_open_rss_kib" in run else None


def _streams(s: dict[str, Any], raw: dict[str, Any], lines: list[str]) -> None:
    up, d = s["upstream"], s.get("direct")
    n = d["streams"] if d else (s["runs"][0]["streams"] if s["runs"] else 0)
    lines += [
        f"## 4. {n:,} concurrent streams: {up['chunks']} chunks {up['chunk_delay_ms']:g} ms apart",
        "",
        _stamp(s, raw),
        "",
        f"One client process (raw asyncio sockets) opens {n:,} streams over "
        f"{raw['plan'].get('stream_ramp_seconds', 1):g} s and reads every event; the upstream sends the first "
        "chunk at once. Added time is the difference of percentiles to the same client reading the fake upstream "
        "directly. Streams are the first thing each fresh server does, after 20 warm-up streams. A stream is open from "
        "its response's status line to its end; RSS per stream is the API process's RSS at the moment the most "
        "streams were open at once (the client says when) minus its RSS before, divided by those streams. CPU per "
        "stream is every textgen process over the run.",
        "",
        "| path | completed | errors | most open at once | first chunk p50 | p99 | added p50 | added p99 | "
        "inter-chunk p50 | p99 | p99 ÷ direct | RSS per stream | CPU/stream |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = ([("direct to the fake upstream (its RSS, CPU)", d)] if d else []) + [
        (r["label"], r) for r in s["runs"]
    ]
    for label, r in rows:
        added50 = r["ttfc_p50"] - d["ttfc_p50"] if d and r is not d else None
        added99 = r["ttfc_p99"] - d["ttfc_p99"] if d and r is not d else None
        per = _rss_per_stream(r)
        lines.append(
            f"| {label} | {r['completed']:,} | {r['errors']} | {r['most_open']:,} | {ms(r['ttfc_p50'], 1)} | "
            f"{ms(r['ttfc_p99'], 1)} | {ms(added50, 1) if added50 is not None else '—'} | "
            f"{ms(added99, 1) if added99 is not None else '—'} | {ms(r['gap_p50'], 1)} | {ms(r['gap_p99'], 1)} | "
            f"{_x(ratio(r['gap_p99'], d['gap_p99'])) if d and r is not d else '—'} | "
            f"{'n/a' if per is None else fmt(per * 1024 / 1000, 1) + ' KB'} | {ms(r['cpu_ms_per_stream'], 2)} |"
        )
    firsts = [f"{label}: `{r['first_error'][:200]}`" for label, r in rows if r.get("first_error")]
    if firsts:
        lines += ["", "First errors: " + "; ".join(firsts)]
    if any("most_open_rss_kib" not in r for _, r in rows):
        lines += [
            "",
            "RSS per stream is n/a: this run's client counted a stream open from its TCP connect, before the server "
            "had taken it, so the RSS it read was not that of the streams being served.",
        ]
    lines.append("")


def _queue(q: dict[str, Any] | list[dict[str, Any]], raw: dict[str, Any], lines: list[str]) -> None:
    runs = q["runs"] if isinstance(q, dict) else q
    lines += [
        "## 5. Async queue, zero-latency upstream: create → done → webhook delivered",
        "",
        _stamp(q, raw),
        "",
        "Tasks with a webhook each, created 32 at a time (aiohttp); done/s is tasks over the time from the first "
        "create to the last `updated_at` of a done task, delivered/s over the time to the last webhook received "
        "by a local receiver. CPU per task is every textgen process from the first create to the last webhook.",
        "",
        "| deployment | tasks | create/s | done/s | webhook delivered/s | CPU/task (textgen) | CPU/task (upstream) | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.get('label', r['backend'])} | {r['tasks']:,} | {fmt(r['create_per_second'], 0)} | "
            f"{fmt(r['done_per_second'], 0)} | {fmt(r['delivered_per_second'], 0)} | "
            f"{ms(r.get('cpu_ms_per_task'), 2)} | {ms(r.get('upstream_cpu_ms_per_task'), 3)} | {r['errors']} |"
        )
    lines.append("")


def _embedded(e: dict[str, Any], raw: dict[str, Any], lines: list[str]) -> None:
    r = ratio(e["textgen"]["per_second"], e["direct"]["per_second"])
    lines += [
        "## 6. Embedded model: `smollm2-135m-instruct`",
        "",
        _stamp(e, raw),
        "",
        "| path | tokens | seconds | tokens/s |",
        "|---|---|---|---|",
        f"| llama-cpp-python directly | {e['direct']['tokens']} | {fmt(e['direct']['seconds'])} | {fmt(e['direct']['per_second'], 1)} |",
        f"| through textgen (sync request) | {e['textgen']['tokens']} | {fmt(e['textgen']['seconds'])} | {fmt(e['textgen']['per_second'], 1)} |",
        "",
        f"textgen reaches {fmt(None if r is None else r * 100, 1)} % of llama-cpp-python's tokens/s; same prompt, "
        f"max {e['max_tokens']} tokens, {e['rounds']} rounds after a warm-up, the same sampling settings and threads"
        + _round_spread(e),
        "",
    ]


def _round_spread(e: dict[str, Any]) -> str:
    """The per-round ratios, when the run interleaved its rounds (older runs did not)."""
    ratios = e.get("round_ratios")
    if not ratios:
        return " (the spread over rounds was not measured in this run)."
    low, high = min(ratios) * 100, max(ratios) * 100
    return (
        f"; one round of each in turn, so both meet the same machine. Round by round textgen reached "
        f"{low:.1f}-{high:.1f} % (median {statistics.median(ratios) * 100:.1f} %): a spread of "
        f"{high - low:.1f} points."
    )


def _soak(s: dict[str, Any], raw: dict[str, Any], lines: list[str]) -> None:
    total, errors = sum(s["requests"].values()), sum(s["errors"].values())
    lines += [
        f"## 7. Soak: {s['seconds']:g} s of mixed load (textgen on SQLite)",
        "",
        _stamp(s, raw),
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
        f"growth {s['growth']:+.1%}; {total:,} requests, {errors} errors.",
        "",
    ]
    if s["first_errors"]:
        lines += ["First errors:", "", *[f"- `{e}`" for e in s["first_errors"]], ""]


def _profiles(res: dict[str, Any], lines: list[str]) -> None:
    found = [
        (section, run["label"], p)
        for section in ("tasks", "streams")
        for run in (res.get(section) or {}).get("runs", [])
        for p in run.get("profiles", [])
    ]
    if not found:
        return
    lines += [
        "## Profiles (py-spy)",
        "",
        "py-spy `record --threads --nonblocking` at 100 samples/s on every textgen process during the runs above. "
        "Shares are of the samples in which the process ran Python (idle threads are not sampled); busy is "
        "those samples over all the samples the duration allows (above 100 % when several threads ran).",
        "",
    ]

    def cells(pairs: list[list[Any]]) -> str:
        return "; ".join(f"`{name}` {share:.0%}" for name, share in pairs) or "—"

    for section, label, p in found:
        busy = "n/a" if p["busy"] is None else f"{p['busy']:.0%}"
        lines += [
            f"**{section}, {label}, {p['name']}** ({p['samples']:,} samples, busy {busy}; "
            f"{p.get('waiting_samples', 0):,} more in a wait)",
            "",
        ]
        if p.get("error"):
            lines += [f"- {p['error']}", ""]
            continue
        lines += [
            f"- threads: {cells(p['threads'][:4])}",
            f"- packages (leaf frame): {cells(p['packages'][:8])}",
            f"- own time (leaf frames): {cells(p['self'][:8])}",
            f"- on the stack (inclusive): {cells(p['total'][:10])}",
            f"- textgen's functions on the stack: {cells(p.get('textgen', [])[:10])}",
            "",
        ]


def _settings(raw: dict[str, Any]) -> str:
    recorded = raw.get("settings")
    if not recorded:
        return "The settings the bench changed were not recorded in this run."
    every = ", ".join(f"`{k}={v}`" for k, v in recorded["all"].items())
    pg = ", ".join(f"`{k}={v}`" for k, v in recorded.get("postgresql", {}).items())
    return (
        f"Settings are textgen's defaults except {every}; on PostgreSQL also {pg} per process (the server here "
        "allows 100 connections, shared with everything else on the machine)."
    )


def write(raw: dict[str, Any], md: Path, png: Path, *, draw: bool = True) -> None:
    res, info = raw["results"], raw["machine"]
    kept = ""
    if md.exists():
        text = md.read_text()
        if KEPT in text:
            kept = text[text.index(KEPT) :]
    full = raw.get("full_minutes")
    minutes = f", about {full} minutes" if full else ""
    lines = [
        "# Benchmarks",
        "",
        f"Measured in one run on {raw.get('date', '')} at commit {raw.get('commit', 'n/a')} with "
        f"`{raw['command']}` ({raw['elapsed_seconds'] / 60:.0f} minutes"
        f"{'; quick smoke mode: figures are not meaningful' if raw['quick'] else ''}"
        f"{'; py-spy profiled the tasks and streams runs' if raw.get('profiled') else ''}). "
        "Every server, the fake Gemini upstream and the load generators ran on this one machine, on 127.0.0.1, "
        "so they share its cores (and other people's work on it): compare figures within the run, not across runs. "
        "CPU milliseconds per request move much less between runs than requests per second.",
        "",
        REGENERATE.format(minutes=minutes),
        "## Targets",
        "",
        "| target | this run |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in target_rows(res)],
        "",
        "## Machine",
        "",
        *[f"- **{k.replace('_', ' ')}**: {v}" for k, v in info.items()],
        "",
        "## What each side did",
        "",
        "- **textgen**: per deployment, a fresh database: on SQLite one `textgen serve` process (uvicorn, its own "
        "task worker and webhook sender inside); on PostgreSQL + Redis one `textgen serve` with "
        "`TEXTGEN_RUN_WORKER=false` and 1, 2 or 4 `textgen worker` processes. Every request authenticates the API "
        "key, checks the per-account rate limit, reserves and settles credits in the ledger and persists the "
        "task; the Gemini provider calls the fake upstream over REST (aiohttp). " + _settings(raw),
        "- **Upstreams**: `tests/fakes/fake_gemini.py` in its own process: zero-latency for the overhead and "
        "queue sections; the realistic one answers `generateContent` after "
        f"{raw['plan'].get('answer_delay_ms', 2000) / 1000:g} s and streams {raw['plan'].get('stream_chunks', 20)} "
        f"chunks {raw['plan'].get('chunk_delay_ms', 100):g} ms apart.",
        "- **LiteLLM**: the `litellm` proxy CLI, 1 worker, `LITELLM_LOCAL_MODEL_COST_MAP=True`, one "
        "`gemini/gemini-2.5-flash` model with `api_base` at the fake's `/v1beta`, `/v1/chat/completions` "
        "(its OpenAI-format route; the response is translated).",
        "- **Load**: latency at concurrency 1 from an asyncio httpx client over one keep-alive connection "
        f"({raw['plan']['latency_requests']} requests after {raw['plan']['latency_warmup']} warm-up); zero-latency "
        f"throughput with `wrk` (2 threads, {raw['plan']['wrk_seconds']:g} s per point); tasks, sync load and the "
        "queue from aiohttp clients in the bench's process; streams from their own client process.",
        "",
    ]
    if raw["notes"]:
        lines += ["## Notes from this run", "", *[f"- {n}" for n in raw["notes"]], ""]
    for key, render in (
        ("overhead", _overhead),
        ("tasks", _tasks),
        ("sync", _sync),
        ("streams", _streams),
        ("queue", _queue),
        ("embedded", _embedded),
        ("soak", _soak),
    ):
        if key in res:
            render(res[key], raw, lines)  # type: ignore[operator]
    _profiles(res, lines)
    lines += [
        f"![benchmarks]({png.name})",
        "",
        f"Raw figures: `{md.with_suffix('.json').name}` beside this page.",
        "",
    ]
    text = "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1]))  # no double blanks
    md.write_text(text + ("\n" + kept if kept else ""))
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
    ax.set_title("sync request latency, concurrency 1, zero-latency upstream")
    ax.legend()
    ax = axes[0][1]
    cpu = [(k, n) for k, n in present if _get(o, k, "c16", "cpu_ms_per_request")]
    xs = range(len(cpu))
    ax.bar(list(xs), [o[k]["c16"]["cpu_ms_per_request"] for k, _ in cpu], 0.5)
    ax.axhline(TARGETS["cpu_c16"], color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(list(xs), [n for _, n in cpu])
    ax.set_yscale("log")
    ax.set_ylabel("CPU ms per request (log)")
    ax.set_title("CPU per sync request, 16 connections (target dashed)")
    ax = axes[1][0]
    t = res.get("tasks")
    if t and t["runs"]:
        runs = t["runs"]
        ax.bar(range(len(runs)), [r["seconds"] or 0 for r in runs], 0.5)
        ax.axhline(TARGETS["tasks_seconds"], color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(runs)), [r["config"] for r in runs])
        ax.set_ylabel("seconds")
        ax.set_title(f"{runs[0]['tasks']:,} async tasks, first create to last done (2 s upstream)")
    ax = axes[1][1]
    q = res.get("queue")
    if q:
        runs = q["runs"] if isinstance(q, dict) else q
        xs = range(len(runs))
        ax.bar([x - 0.2 for x in xs], [r["done_per_second"] for r in runs], 0.4, label="done/s")
        ax.bar([x + 0.2 for x in xs], [r["delivered_per_second"] for r in runs], 0.4, label="webhooks/s")
        ax.set_xticks(list(xs), [r.get("config", r["backend"]) for r in runs])
        ax.set_ylabel("tasks/s")
        ax.set_title("async queue, zero-latency upstream")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.report [docs/benchmarks.json]``: write the page and plot again from recorded figures."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument(
        "figures", type=Path, nargs="?", default=Path(__file__).parent.parent / "docs" / "benchmarks.json"
    )
    args = parser.parse_args(argv)
    raw = json.loads(args.figures.read_text())
    write(raw, args.figures.with_suffix(".md"), args.figures.with_suffix(".png"))


if __name__ == "__main__":
    main()
