"""The docs match the code: every setting is documented, every documented command exists."""

from __future__ import annotations

import re
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
