"""Helpers for tests that run textgen as real processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import free_socket


def free_port() -> int:
    sock = free_socket()
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def textgen_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
    env.update(values)
    return env


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "textgen", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextmanager
def textgen_process(
    *args: str, env: dict[str, str], log: Path, port: int | None = None
) -> Iterator[subprocess.Popen[str]]:
    """Start ``textgen ARGS`` and stop it afterwards (SIGKILL if SIGTERM is not enough)."""
    with log.open("a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "textgen", *args], env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
    try:
        if port is not None:
            wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_http(url: str, proc: subprocess.Popen[str], log: Path, attempts: int = 600) -> None:
    for _ in range(attempts):
        if proc.poll() is not None:
            raise AssertionError(f"process exited early:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered:\n{log.read_text()}")


def bootstrap_credentials(log: Path) -> tuple[str, str]:
    text = log.read_text()
    api_id = re.search(r"X-API-ID:\s+(\S+)", text)
    api_key = re.search(r"X-API-KEY:\s+(\S+)", text)
    assert api_id and api_key, text
    return api_id.group(1), api_key.group(1)
