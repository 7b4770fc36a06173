"""The docs match the code: every setting is documented, every documented command exists, every curl example
works against a live server, and the deploy examples agree with what the docs say about them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

from textgen.cli import parser
from textgen.settings import Settings, env_name, settings_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_settings_table_is_generated_from_the_settings() -> None:
    assert settings_table() in README, "run: .venv/bin/python scripts/settings_table.py"
    for name in Settings.model_fields:
        assert f"`{env_name(name)}`" in README


def test_readme_starts_with_the_two_commands() -> None:
    head = README.split("\n", 8)[:8]
    assert any(line.startswith("make run") for line in head)
    assert any(line.startswith("make test") for line in head)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_documented_commands_exist() -> None:
    section = README.split("## Command line", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^textgen ([a-z-]+(?: [a-z-]+)?)", section, re.M)
    assert len(commands) >= 8
    for command in commands:
        words = command.split()
        namespace = parser().parse_known_args([*words, "x", "1"])[0]
        assert namespace.command == words[0]


def test_docs_link_to_existing_files() -> None:
    for target in re.findall(r"\]\((docs/[^)#]+)\)", README):
        assert (ROOT / target).exists(), target


def test_stop_timeouts_of_the_deploy_examples_are_the_documented_ones() -> None:
    """Every example gives the process manager the stop timeout docs/deployment.md states, above the shutdown
    timeout it gives textgen."""
    deployment = (ROOT / "docs" / "deployment.md").read_text()
    found = re.search(r"the examples use (\d+) s for (\d+) s", deployment)
    assert found, "docs/deployment.md no longer states the examples' stop timeout"
    stop, shutdown = int(found[1]), int(found[2])
    assert stop > shutdown

    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    textgen = compose["x-textgen"]
    assert textgen["stop_grace_period"] == f"{stop}s"
    assert textgen["environment"]["TEXTGEN_SHUTDOWN_TIMEOUT_SECONDS"] == str(shutdown)
    for name, service in compose["services"].items():
        if service.get("image") == textgen["image"] and name != "migrate":
            assert service["stop_grace_period"] == f"{stop}s", name

    systemd = ROOT / "deploy" / "systemd"
    for unit in ("textgen-api.service", "textgen-worker@.service"):
        assert re.search(rf"^TimeoutStopSec={stop}$", (systemd / unit).read_text(), re.M), unit
    assert re.search(
        rf"^TEXTGEN_SHUTDOWN_TIMEOUT_SECONDS={shutdown}$", (systemd / "textgen.env").read_text(), re.M
    )


def test_the_image_serves_and_migrates_by_default_as_documented() -> None:
    """The Dockerfile's default command is `textgen serve` (which migrates on start), as docs/deployment.md says;
    compose, which migrates once in its own service, overrides it in every service with `--no-migrate`."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    commands = re.findall(r"^CMD (.+)$", dockerfile, re.M)
    assert commands, "deploy/Dockerfile has no CMD"
    assert json.loads(commands[-1]) == ["textgen", "serve"]
    deployment = " ".join((ROOT / "docs" / "deployment.md").read_text().split())
    assert "Its default command is `textgen serve`, which migrates on start" in deployment

    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    image = compose["x-textgen"]["image"]
    for name, service in compose["services"].items():
        if service.get("image") != image:
            continue
        command = service["command"]
        if name == "migrate":
            assert command == ["textgen", "migrate"]
        elif command[:2] == ["textgen", "serve"]:
            assert "--no-migrate" in command, name
        else:
            assert command == ["textgen", "worker"], name


def test_the_procfile_is_described_as_it_is() -> None:
    deployment = (ROOT / "docs" / "deployment.md").read_text()
    described = deployment.split("- `deploy/Procfile`:", 1)[1].split("\n- ", 1)[0]
    processes = dict(
        line.split(":", 1)
        for line in (ROOT / "deploy" / "Procfile").read_text().splitlines()
        if line[:1].isalpha()
    )
    assert set(processes) == {"api", "worker"}
    workers = re.search(r"--workers (\d+)", processes["api"])
    assert workers and f"`serve --no-migrate --workers {workers[1]}`" in described
    assert "one `textgen worker`" in described and processes["worker"].strip() == "textgen worker"


def test_the_local_model_speed_is_the_one_the_benchmark_measured() -> None:
    """docs/local-model.md quotes the embedded-model figures of the last benchmark run (docs/benchmarks.json,
    section "embedded"), and the load that run was under, not a speed nobody measured."""
    bench = json.loads((ROOT / "docs" / "benchmarks.json").read_text())
    embedded = bench["results"]["embedded"]
    direct, through = embedded["direct"]["per_second"], embedded["textgen"]["per_second"]
    doc = " ".join((ROOT / "docs" / "local-model.md").read_text().split())
    load = float(bench["machine"]["load_average_at_start"].split()[0])
    stated = re.search(
        r"\(benchmarks\.md\), section 6 \"Embedded model\", on ([0-9-]+)\).*?"
        r"\(load average ([0-9.]+) at its start\): "
        r"through textgen SmolLM2-135M generated ([0-9.]+) tokens/s, against ([0-9.]+) tokens/s from "
        r"llama-cpp-python alone in the same run, so textgen reached ([0-9.]+) % of the library's speed "
        r"\((\d+)-token answers, (\d+) rounds",
        doc,
    )
    assert stated, "docs/local-model.md no longer states the embedded model's measured speed"
    assert stated[1] == embedded["measured"]["date"]
    assert stated[2] == f"{load:.1f}"
    assert stated[3] == f"{through:.1f}" and stated[4] == f"{direct:.1f}"
    assert stated[5] == f"{through / direct * 100:.1f}"
    assert (int(stated[6]), int(stated[7])) == (embedded["max_tokens"], embedded["rounds"])
    # Figures measured on a loaded machine are said to be.
    assert load < 4 or "heavy other work" in doc


def test_every_extra_the_makefile_installs_is_defined() -> None:
    makefile = (ROOT / "Makefile").read_text()
    extras = set(re.findall(r"\.\[([a-z0-9_,-]+)\]", makefile))
    assert extras, "the Makefile installs no extras any more: update this test"
    defined = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for group in extras:
        for extra in group.split(","):
            assert extra in defined, f"the Makefile installs .[{extra}], which pyproject.toml does not define"


# ---- every curl of the docs, run against a live server ------------------------------------------------

DOCS_WITH_CURL = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SHELLS = {"", "sh", "bash", "shell"}
ASSIGNMENT = re.compile(r"^(export )?[A-Z_]+=")
API_ORIGIN = re.compile(r"(?:http://)?(?:localhost|127\.0\.0\.1):800[01]")
WEBHOOK_ORIGIN = "http://127.0.0.1:9000"  # the receiver of docs/webhooks.md


@dataclass
class Snippet:
    doc: str
    command: str
    assignments: list[str]


def shell_commands(text: str) -> list[str]:
    """The complete commands of a shell code block: a command goes on while a line ends with a backslash or a
    quote is open."""
    commands: list[str] = []
    pending = ""
    for line in text.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command continues on the next line
            continue
        commands.append(pending)
        pending = ""
    return commands


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block, an indented one (in a list item) dedented."""
    blocks: list[tuple[str, str]] = []
    fence: tuple[str, int] | None = None
    body: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence, body = (stripped[3:].strip(), len(line) - len(line.lstrip())), []
        elif stripped == "```":
            blocks.append((fence[0], "\n".join(body)))
            fence = None
        else:
            body.append(line[fence[1] :])
    return blocks


def curl_snippets() -> list[Snippet]:
    snippets = []
    for doc in DOCS_WITH_CURL:
        for language, block in code_blocks((ROOT / doc).read_text()):
            if language not in SHELLS:
                continue
            commands = shell_commands(block)
            assignments = [c for c in commands if ASSIGNMENT.match(c) and "$(" not in c]
            snippets += [Snippet(doc, c, assignments) for c in commands if c.startswith("curl ")]
    return snippets


def test_the_curl_examples_are_found() -> None:
    found = {s.doc for s in curl_snippets()}
    assert found == {"README.md", "docs/deployment.md", "docs/operations.md", "docs/webhooks.md"}, found
    assert len(curl_snippets()) >= 20


async def test_every_curl_example_of_the_docs_works_against_a_live_server(tmp_path: Path) -> None:
    from tests.conftest import make_settings, run_server
    from tests.test_webhooks import Receiver, serve_receiver

    admin_token = "docs-test-admin-token"
    settings = make_settings(
        tmp_path,
        admin_token=admin_token,
        redis_url="redis://127.0.0.1:6379/0",  # the deployment walkthrough's readyz says "redis"
        local_model_instances=1,
        default_max_output_tokens=24,  # short answers: the examples are about the API, not the text
        webhook_schedule="0",
        webhook_poll_seconds=0.05,
    )
    receiver = Receiver()
    async with serve_receiver(receiver) as hook, run_server(settings) as server:
        account = await server.account(credits=100, rate_limit=10_000)
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "YOUR_API_ID": account.api_id,
            "YOUR_API_KEY": account.api_key,
            "API_ID": account.api_id,
            "API_KEY": account.api_key,
            "TEXTGEN_ADMIN_TOKEN": admin_token,
            "TG": f"-H X-API-ID:{account.api_id} -H X-API-KEY:{account.api_key}",
        }
        seen: dict[
            str, str
        ] = {}  # the last id of each kind an answer gave: what the docs' placeholders stand for
        ran = 0
        for snippet in curl_snippets():
            command = snippet.command.replace(WEBHOOK_ORIGIN, hook)
            command = API_ORIGIN.sub(server.url, command)
            command = command.replace("YOUR_API_ID", account.api_id).replace("YOUR_API_KEY", account.api_key)
            for placeholder, kind in (("<id>", "id"), ("tg_…", "api_id"), ("key_…", "key_id")):
                if placeholder in command.split("#", 1)[0]:
                    assert kind in seen, f"{snippet.doc}: nothing before `{snippet.command}` gave a {kind}"
                    command = command.replace(placeholder, seen[kind])
            script = "\n".join(
                [
                    "curl() { command curl -sS --max-time 120 -w '\\n%{http_code}' \"$@\"; }",
                    *snippet.assignments,
                    command,
                ]
            )
            proc = await asyncio.create_subprocess_exec(
                "bash", "-c", script, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await proc.communicate()
            assert proc.returncode == 0, (snippet.doc, snippet.command, err.decode())
            body, _, status = out.decode().rpartition("\n")
            assert status in ("200", "201", "204"), (snippet.doc, snippet.command, status, body)
            ran += 1
            with contextlib.suppress(ValueError):
                answer = json.loads(body)
                if isinstance(answer, dict):
                    seen.update(
                        {k: answer[k] for k in ("id", "api_id", "key_id") if isinstance(answer.get(k), str)}
                    )
            # A comment's "field": "value" is what the answer says.
            comment = snippet.command.rpartition("#")[2] if "#" in snippet.command else ""
            for field, value in re.findall(r'"(\w+)": "([^"]*)"', comment):
                assert re.search(rf'"{field}":\s*"{re.escape(value)}"', body), (snippet.command, body)
        assert ran == len(curl_snippets())
        # The webhook example's task was delivered to its receiver.
        await receiver.wait(1)
