"""py-spy profiles of textgen's processes during a run, summarised as the frames and packages that hold the samples.

``python -m bench --profile`` records every textgen process (py-spy ``record --format raw --threads
--nonblocking``) during the 1,000-task and 1,000-stream runs. Only samples of threads running Python (not idle)
are recorded, so the shares are of the time the process was busy; ``busy`` is those samples over the samples the
rate and duration allow.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RATE = 100  # samples per second
# Leaf frames of a thread that waits (py-spy counts a thread that is runnable but not yet running as active, which
# on a loaded machine is often one just woken from these).
WAITING = {
    "EpollSelector.select (selectors.py)",
    "PollSelector.select (selectors.py)",
    "Condition.wait (threading.py)",
    "Event.wait (threading.py)",
    "Thread._wait_for_tstate_lock (threading.py)",
    "_worker (concurrent/futures/thread.py)",
}
_DISPATCH = ("Handle._run (", "BaseEventLoop._run_once (", "BaseEventLoop.run_forever (", "Context.run (")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if os.access(found, os.X_OK) else None


@dataclass
class Profile:
    name: str
    pid: int
    seconds: float
    stacks: Counter[tuple[str, ...]] = field(default_factory=Counter)
    error: str | None = None

    @property
    def samples(self) -> int:
        return sum(self.stacks.values())


def _short(frame: str) -> str:
    """``func (path/to/pkg/mod.py:12)`` -> ``func (pkg/mod.py)``: the line dropped, the path from the package on."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if path.startswith(".") and "/" in path:  # /lib/python3.11/asyncio/x.py -> asyncio/x.py
        path = path.split("/", 1)[1]
    return f"{match.group('func')} ({path})"


def _package(frame: str) -> str:
    """The package a frame's code is in: ``aiohttp``, ``asyncio``; textgen's by module (``textgen.storage``)."""
    match = re.search(r"\(([^()]+)\)$", _short(frame))
    parts = (match.group(1) if match else frame).split("/")
    keep = 2 if parts[0] == "textgen" and len(parts) > 1 else 1
    return ".".join(p.removesuffix(".py") for p in parts[:keep])


def parse_raw(text: str) -> Counter[tuple[str, ...]]:
    """py-spy's raw (collapsed) output: ``frame;frame;... count`` per line, outermost frame first."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def summary(profile: Profile, top: int = 12) -> dict[str, Any]:
    """Shares of the busy samples (not those waiting in ``WAITING``): by thread, by leaf frame (self), by frame
    anywhere on the stack (total), by the package of the leaf frame."""
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    waiting = 0
    by_thread: dict[str, Counter[str]] = {}
    for stack, count in profile.stacks.items():
        frames = list(stack)
        if frames and frames[0].startswith("process "):
            frames.pop(0)
        thread = "?"
        if frames and frames[0].startswith("thread ("):
            thread = frames.pop(0).split(":", 1)[-1].strip() or "?"
        if not frames:
            continue
        leaf = _short(frames[-1])
        if leaf in WAITING:
            waiting += count
            continue
        threads[thread] += count
        by_thread.setdefault(thread, Counter())
        own[leaf] += count
        packages[_package(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            by_thread[thread][frame] += count

    total = sum(threads.values())

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, n / total) for name, n in counter.most_common(top)] if total else []

    # Frames under nearly every sample of their thread (its main, the event loop's dispatch) say nothing.
    for thread, frames_seen in by_thread.items():
        for name, n in frames_seen.items():
            if n < 0.9 * threads[thread] and not any(name.startswith(d) for d in _DISPATCH):
                inclusive[name] += n
    ours = Counter({name: n for name, n in inclusive.items() if "(textgen/" in name})

    possible = profile.seconds * RATE
    return {
        "name": profile.name,
        "pid": profile.pid,
        "seconds": profile.seconds,
        "samples": total,
        "waiting_samples": waiting,
        "busy": total / possible if possible else None,
        "error": profile.error,
        "threads": shares(threads),
        "self": shares(own),
        "total": shares(inclusive),
        "textgen": shares(ours),
        "packages": shares(packages),
    }


@contextlib.contextmanager
def record(targets: list[tuple[str, int]], directory: Path, label: str) -> Iterator[list[Profile]]:
    """Record each (name, pid) with py-spy while the block runs; the profiles are filled in when it ends."""
    binary = py_spy()
    profiles = [Profile(name, pid, 0.0) for name, pid in targets]
    if binary is None:
        for p in profiles:
            p.error = "py-spy is not installed (pip install py-spy, or make bench)"
        yield profiles
        return
    directory.mkdir(parents=True, exist_ok=True)
    running = []
    for p in profiles:
        out = directory / f"{label}-{p.name}.txt"
        argv = [binary, "record", "--pid", str(p.pid), "--format", "raw", "--threads", "--nonblocking"]
        argv += ["--rate", str(RATE), "--subprocesses", "--output", str(out)]
        log = (directory / f"{label}-{p.name}.log").open("wb")
        running.append((p, out, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)))
        log.close()
    started = time.monotonic()
    try:
        yield profiles
    finally:
        elapsed = time.monotonic() - started
        for p, out, proc in running:
            p.seconds = elapsed
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out.exists():
                p.stacks = parse_raw(out.read_text(errors="replace"))
            else:
                log_text = (directory / f"{label}-{p.name}.log").read_text(errors="replace")
                p.error = f"py-spy wrote nothing: {log_text.strip()[-300:]}"
