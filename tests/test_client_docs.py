"""Every Python example of the client's documentation, run as written against a real ``textgen serve`` process
(embedded model, SQLite), with the webhook receiver example receiving a real signed delivery."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import bootstrap_credentials, free_port, run_cli, textgen_env, textgen_process
from textgen_client import Client

ROOT = Path(__file__).resolve().parents[1]
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"

# What each section's example prints, as a regular expression (its first match must exist).
EXPECTED = {
    ("docs/client.md", "Generate"): r"^done \d",
    ("docs/client.md", "Submit, then wait (or cancel)"): rf"^{UUID} pending\ndone [\"']",
    ("docs/client.md", "Stream"): rf"\ntask {UUID}: [0-9.e-]+ credits, (STOP|MAX_TOKENS)\n",
    ("docs/client.md", "Function calling"): r"^the model calls get_weather \{'location': ",
    ("docs/client.md", "Listing tasks"): rf"^{UUID} \d{{4}}-\d\d-\d\d",
    ("docs/client.md", "Asyncio"): rf"^{UUID} done [\"'].*\n{UUID} done [\"']",
    ("docs/client.md", "Errors and retries"): r"^400 config\.temperature",
    ("README.md", "Python client"): r"\ndone [0-9.e-]+ [0-9.]+\n.*TextDelta\(text=.*StreamEnd\(task_id=",
    ("clients/python/README.md", "textgen-client"): r"^done ",
}
RECEIVER = ("docs/client.md", "Webhooks")


def python_examples(relative: str) -> dict[tuple[str, str], str]:
    """Each ``python`` block of a Markdown file, keyed by (file, the heading it is under)."""
    found: dict[tuple[str, str], str] = {}
    heading = ""
    lines = (ROOT / relative).read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("#").strip()
        elif lines[i].strip() == "```python":
            end = lines.index("```", i + 1)
            assert (relative, heading) not in found, f"two examples under {heading!r} in {relative}"
            found[(relative, heading)] = "\n".join(lines[i + 1 : end]) + "\n"
            i = end
        i += 1
    return found


def run_example(code: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.timeout(900)
def test_every_client_example_in_the_docs_runs_against_textgen_serve(tmp_path: Path) -> None:
    examples = {
        **python_examples("README.md"),
        **python_examples("docs/client.md"),
        **python_examples("clients/python/README.md"),
    }
    assert set(examples) == {*EXPECTED, RECEIVER}

    port = free_port()
    env = textgen_env(
        TEXTGEN_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/docs.db",
        TEXTGEN_LOG_LEVEL="warning",
        TEXTGEN_WORKER_POLL_SECONDS="0.2",
        TEXTGEN_DEFAULT_RATE_LIMIT="100000",
        TEXTGEN_LOCAL_MODEL_INSTANCES="1",
        TEXTGEN_WEBHOOK_ALLOW_PRIVATE="true",
    )
    log = tmp_path / "server.log"
    with textgen_process("serve", "--port", str(port), env=env, log=log, port=port):
        api_id, api_key = bootstrap_credentials(log)
        shown = run_cli("accounts", "show", api_id, "--json", env=env)
        secret = json.loads(shown.stdout)["webhook_secret"]
        example_env = {
            **textgen_env(),
            "TEXTGEN_BASE_URL": f"http://127.0.0.1:{port}",
            "TEXTGEN_API_ID": api_id,
            "TEXTGEN_API_KEY": api_key,
            "PYTHONUNBUFFERED": "1",
        }
        for key, pattern in EXPECTED.items():
            output = run_example(examples[key], example_env)
            assert re.search(pattern, output, flags=re.S | re.M), f"{key} printed:\n{output}"

        receiver_port = free_port()
        receiver_log = tmp_path / "receiver.log"
        with receiver_log.open("w") as out:
            receiver = subprocess.Popen(
                [sys.executable, "-c", examples[RECEIVER]],
                env={**example_env, "WEBHOOK_SECRET": secret, "PORT": str(receiver_port)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            with Client(api_id, api_key, base_url=f"http://127.0.0.1:{port}") as client:
                task = client.submit(
                    "smollm2-135m-instruct",
                    "Say hi.",
                    config={"max_output_tokens": 16},
                    webhook_url=f"http://127.0.0.1:{receiver_port}/hook",
                )
                done = client.wait(task, timeout=120)
            expected = f"task {task.id} {done.status} {done.response_text!r}"
            for _ in range(600):
                if expected in receiver_log.read_text():
                    break
                assert receiver.poll() is None, receiver_log.read_text()
                time.sleep(0.1)
            assert expected in receiver_log.read_text(), receiver_log.read_text()
        finally:
            receiver.terminate()
            receiver.wait(timeout=10)
