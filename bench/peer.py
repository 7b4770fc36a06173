"""LiteLLM's proxy as the peer: its own virtualenv, a Gemini model on the same fake upstream, a virtual key."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.procs import LOOPBACK, ROOT, ProcessGroup, free_port
from bench.stack import FAKE_KEY, MODEL, PROMPT, Upstream, postgres_database

VENV = ROOT / "bench" / ".litellm-venv"
SPEC = os.environ.get("BENCH_LITELLM_SPEC", "litellm[proxy]")
MASTER_KEY = "sk-bench-master-key"


@dataclass
class Peer:
    url: str
    headers: dict[str, str]
    version: str
    mode: str  # what bookkeeping is on, in words
    notes: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def chat_url(self) -> str:
        return f"{self.url}/v1/chat/completions"


def body() -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}


def _pip(*args: str) -> None:
    subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", *args], check=True, timeout=1800)


def ensure_litellm() -> str:
    """Install ``litellm[proxy]`` into bench/.litellm-venv (once) and return its version."""
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {VENV} and installing {SPEC} (a few minutes, once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        _pip("--upgrade", "pip")
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"]
    done = subprocess.run(probe, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        _pip(SPEC)
        done = subprocess.run(probe, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def prepare_database_mode(logs: Path) -> tuple[bool, str]:
    """Install prisma and generate LiteLLM's client; (False, evidence) when that cannot be done here."""
    python = VENV / "bin" / "python"
    log = logs / "litellm-prisma.log"
    try:
        if subprocess.run([str(python), "-c", "import prisma"], capture_output=True, check=False).returncode:
            _pip("prisma")
        schema = next(VENV.glob("lib/python*/site-packages/litellm_proxy_extras/schema.prisma"), None)
        if schema is None:
            schema = next(VENV.glob("lib/python*/site-packages/litellm/proxy/schema.prisma"))
        env = {**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}
        with log.open("w") as out:
            done = subprocess.run(
                [str(VENV / "bin" / "prisma"), "generate", "--schema", str(schema)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=600,
                check=False,
                cwd=schema.parent,
            )
    except (subprocess.SubprocessError, StopIteration, OSError) as exc:
        return False, f"prisma setup failed: {exc}"
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        tail = " ".join(line.strip() for line in text.splitlines()[-6:] if line.strip())
        return False, f"`prisma generate` exited {done.returncode}: {tail[:600]}"
    return True, "prisma client generated"


def _config(upstream: Upstream, database_url: str | None) -> str:
    lines = [
        "model_list:",
        f"  - model_name: {MODEL}",
        "    litellm_params:",
        f"      model: gemini/{MODEL}",
        f"      api_base: {upstream.url}/v1beta",
        f"      api_key: {FAKE_KEY}",
        "litellm_settings:",
        "  telemetry: false",
        "  drop_params: true",
        "general_settings:",
        f"  master_key: {MASTER_KEY}",
    ]
    if database_url:
        lines.append(f"  database_url: {database_url}")
    return "\n".join(lines) + "\n"


def _start(
    group: ProcessGroup, workdir: Path, upstream: Upstream, database_url: str | None
) -> tuple[str, subprocess.Popen[bytes]]:
    config = workdir / ("litellm-db.yaml" if database_url else "litellm.yaml")
    config.write_text(_config(upstream, database_url))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "GOOGLE_", "OPENAI_"))}
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_MODE="PRODUCTION",
        LITELLM_LOG="ERROR",
        PATH=f"{VENV / 'bin'}:{env['PATH']}",
    )
    if database_url:
        env["DATABASE_URL"] = database_url
    argv = [
        str(VENV / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--num_workers",
        "1",
        "--telemetry",
        "False",
    ]
    proc = group.start("litellm-db" if database_url else "litellm", argv, env)
    url = f"http://{LOOPBACK}:{port}"
    group.wait_http(proc, f"{url}/health/liveliness", timeout=240)
    return url, proc


def _virtual_key(url: str) -> str:
    response = httpx.post(
        f"{url}/key/generate",
        json={"models": [MODEL], "key_alias": f"bench-{int(time.time())}"},
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
        timeout=60,
    )
    response.raise_for_status()
    return str(response.json()["key"])


def _check(url: str, headers: dict[str, str]) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", json=body(), headers=headers, timeout=60)
    if response.status_code != 200:
        raise RuntimeError(f"LiteLLM answered {response.status_code}: {response.text[:500]}")


@contextmanager
def litellm_proxy(group: ProcessGroup, workdir: Path, upstream: Upstream) -> Iterator[Peer]:
    """LiteLLM with its PostgreSQL database and a virtual key, else master key only (with the reason)."""
    version = ensure_litellm()
    notes: list[str] = []
    with ExitStack() as stack:
        peer: Peer | None = None
        ok, evidence = prepare_database_mode(group.logs)
        if ok:
            database_url = stack.enter_context(postgres_database("litellm"))
            try:
                url, proc = _start(group, workdir, upstream, database_url)
                headers = {"Authorization": f"Bearer {_virtual_key(url)}"}
                _check(url, headers)
                peer = Peer(
                    url,
                    headers,
                    version,
                    "PostgreSQL database, virtual key (spend logged per request)",
                    notes,
                    proc,
                )
            except (RuntimeError, httpx.HTTPError) as exc:
                evidence = f"database mode failed to start: {str(exc)[-600:]}"
                for started in [p for p in group.procs if getattr(p, "bench_name", "") == "litellm-db"]:
                    group.stop(started)
        if peer is None:
            notes.append(
                f"LiteLLM's database mode could not run here, so it ran with the master key only: {evidence}"
            )
            url, proc = _start(group, workdir, upstream, None)
            headers = {"Authorization": f"Bearer {MASTER_KEY}"}
            _check(url, headers)
            peer = Peer(
                url, headers, version, "master key only, no database (no spend tracking)", notes, proc
            )
        try:
            yield peer
        finally:
            if peer.proc is not None:
                group.stop(peer.proc)
