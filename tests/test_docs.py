"""The docs match the code: every setting is documented, every documented command exists."""

from __future__ import annotations

import re
from pathlib import Path

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
