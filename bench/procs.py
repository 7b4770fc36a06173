"""Processes the bench starts: every one is registered and stopped at the end, also on failure."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident memory of one process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class ProcessGroup:
    """Starts processes with their output in log files and stops all of them, in reverse order."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        log.close()
        proc.bench_name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log_tail(self, proc: subprocess.Popen[bytes], lines: int = 30) -> str:
        path = self.logs / f"{proc.bench_name}.log"  # type: ignore[attr-defined]
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_http(self, proc: subprocess.Popen[bytes], url: str, timeout: float = 120.0) -> None:
        """Wait until ``url`` answers below 500 (any answer means the server is listening)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.bench_name} exited early:\n{self.log_tail(proc)}")  # type: ignore[attr-defined]
            try:
                if httpx.get(url, timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{url} never answered:\n{self.log_tail(proc)}")

    def wait_log(self, proc: subprocess.Popen[bytes], text: str, timeout: float = 120.0) -> None:
        """Wait until the process has written ``text`` to its log."""
        path = self.logs / f"{proc.bench_name}.log"  # type: ignore[attr-defined]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.bench_name} exited early:\n{self.log_tail(proc)}")  # type: ignore[attr-defined]
            if path.exists() and text in path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{proc.bench_name} never logged {text!r}:\n{self.log_tail(proc)}")  # type: ignore[attr-defined]

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


@contextlib.contextmanager
def process_group(logs: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(logs)
    try:
        yield group
    finally:
        group.stop_all()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    return text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses


def descendants(pids: list[int]) -> list[int]:
    """The processes and every process below them (uvicorn's workers, a pool's children), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads) so far, from /proc/PID/stat; 0 once it is gone."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def rss_total_kib(pids: list[int]) -> int:
    """Resident memory of the processes and their descendants."""
    total = 0
    for pid in descendants(pids):
        with contextlib.suppress(OSError):
            total += rss_kib(pid)
    return total


class CpuMeter:
    """CPU seconds spent by some processes (and their descendants) between ``start()`` and ``stop()``."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.before: dict[int, float] = {}
        self.seconds = 0.0

    def start(self) -> CpuMeter:
        self.before = {pid: cpu_seconds(pid) for pid in descendants(self.pids)}
        return self

    def stop(self) -> float:
        after = {pid: cpu_seconds(pid) for pid in descendants(self.pids)}
        self.seconds = sum(after[pid] - self.before.get(pid, 0.0) for pid in after)
        return self.seconds

    def ms_per(self, count: int) -> float | None:
        return self.seconds * 1000 / count if count else None
