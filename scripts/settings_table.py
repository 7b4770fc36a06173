"""Rewrite the README's settings table from the Settings class (run after adding a setting)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from textgen.settings import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- settings-table -->", "<!-- /settings-table -->"


def render(text: str) -> str:
    block = f"{START}\n{settings_table()}\n{END}"
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.replace(START, block)


if __name__ == "__main__":
    updated = render(README.read_text())
    if "--check" in sys.argv:
        sys.exit(0 if updated == README.read_text() else 1)
    README.write_text(updated)
