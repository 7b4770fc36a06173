"""The model catalog: which models exist, who serves them and what they cost."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from textgen.errors import ConfigurationError

MICRO = 1_000_000  # credits are stored as integer micro-credits


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    provider: str
    input_price: float
    output_price: float
    max_output_tokens: int
    default_output_tokens: int
    capabilities: frozenset[str]
    upstream_name: str
    input_price_long: float | None = None
    output_price_long: float | None = None
    long_context_threshold: int | None = None

    def prices(self, input_tokens: int) -> tuple[float, float]:
        if self.long_context_threshold is not None and input_tokens > self.long_context_threshold:
            return (self.input_price_long or self.input_price, self.output_price_long or self.output_price)
        return self.input_price, self.output_price


@dataclass(frozen=True, slots=True)
class Pricing:
    """Converts token counts into integer micro-credits."""

    credits_per_usd: float

    def cost(self, spec: ModelSpec, input_tokens: int, output_tokens: int) -> int:
        in_price, out_price = spec.prices(input_tokens)
        usd = (input_tokens * in_price + output_tokens * out_price) / 1_000_000
        return math.ceil(round(usd * self.credits_per_usd * MICRO, 6))


def to_micro(credits: float) -> int:
    return round(credits * MICRO)


def from_micro(micro: int) -> float:
    return micro / MICRO


def _spec(name: str, raw: dict[str, Any]) -> ModelSpec:
    try:
        spec = ModelSpec(
            name=name,
            provider=str(raw["provider"]),
            input_price=float(raw["input_price"]),
            output_price=float(raw["output_price"]),
            max_output_tokens=int(raw.get("max_output_tokens", 8192)),
            default_output_tokens=int(raw.get("default_output_tokens", raw.get("max_output_tokens", 8192))),
            capabilities=frozenset(raw.get("capabilities", ["text"])),
            upstream_name=str(raw.get("upstream_name", name)),
            input_price_long=raw.get("input_price_long"),
            output_price_long=raw.get("output_price_long"),
            long_context_threshold=raw.get("long_context_threshold"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"model {name!r}: invalid entry ({exc})") from exc
    if not 1 <= spec.default_output_tokens <= spec.max_output_tokens:
        raise ConfigurationError(
            f"model {name!r}: default_output_tokens must be between 1 and max_output_tokens "
            f"({spec.max_output_tokens}), got {spec.default_output_tokens}"
        )
    return spec


def load_catalog(
    extra_file: Path | None = None, default_output_tokens: int | None = None
) -> dict[str, ModelSpec]:
    """Read the packaged model list, then the user's file on top of it.

    ``default_output_tokens`` (TEXTGEN_DEFAULT_MAX_OUTPUT_TOKENS) replaces every model's output budget for
    requests that name none, capped at the model's own maximum."""
    text = resources.files("textgen").joinpath("models.toml").read_text(encoding="utf-8")
    entries: dict[str, Any] = dict(tomllib.loads(text)["models"])
    if extra_file is not None:
        try:
            text = extra_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigurationError(f"cannot read {extra_file} ({reason})") from exc
        try:
            entries.update(tomllib.loads(text).get("models", {}))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{extra_file} is not valid TOML ({exc})") from exc
    catalog = {name: _spec(name, raw) for name, raw in entries.items()}
    if default_output_tokens is not None:
        catalog = {
            name: replace(spec, default_output_tokens=min(default_output_tokens, spec.max_output_tokens))
            for name, spec in catalog.items()
        }
    return catalog
