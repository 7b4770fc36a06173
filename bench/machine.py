"""The machine and software a run measured on."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

from bench.procs import ROOT


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "unknown"


def describe() -> dict[str, str]:
    packages = ["uvicorn", "starlette", "aiohttp", "google-genai", "llama_cpp_python", "sqlalchemy", "httpx"]
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "n/a"
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": f"{_ram_gib():.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "textgen": f"{importlib.metadata.version('textgen')} ({_version(['git', '-C', str(ROOT), 'describe', '--always', '--dirty'])})",
        "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "postgresql": _version(["psql", "--version"]),
        "redis": _version(["redis-server", "--version"]),
        "wrk": _version(["wrk", "--version"]),
        "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
