"""CPU cost of the metric observations on the request path, per call, with and without multiprocess mode.

``python -m bench.metrics_cost`` runs both modes, each in a fresh interpreter (the mode is chosen when
prometheus-client is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

CALLS = 200_000


class _Route:
    path_format = "/sse/text_generator/"


class _Task:
    model_name = "fake-model"
    status = "done"
    failed_reason = None
    input_tokens = 7
    output_tokens = 5
    credits_used = 12_000


def measure() -> str:
    from textgen import metrics

    scope = {"route": _Route(), "method": "POST"}
    for _ in range(1000):
        metrics.request_answered(scope, 201, 0.004)
    started = time.process_time()
    for _ in range(CALLS):
        metrics.request_answered(scope, 201, 0.004)
    request = (time.process_time() - started) / CALLS * 1e6
    started = time.process_time()
    for _ in range(CALLS):
        metrics.generation_started("fake-model", "fake").done()
    generation = (time.process_time() - started) / CALLS * 1e6
    started = time.process_time()
    for _ in range(CALLS):
        metrics.task_finished(_Task())
    finished = (time.process_time() - started) / CALLS * 1e6
    return (
        f"request_answered {request:.1f} us, generation_started+done {generation:.1f} us, "
        f"task_finished {finished:.1f} us"
    )


def main() -> None:
    if sys.argv[1:] == ["--child"]:
        print(measure())
        return
    for mode in ("per process", "multiprocess"):
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with tempfile.TemporaryDirectory() as directory:
            if mode == "multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = directory
            out = subprocess.run(
                [sys.executable, "-m", "bench.metrics_cost", "--child"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        print(f"{mode}: {out} (CPU per call)")


if __name__ == "__main__":
    main()
