"""The provider protocol: every model backend implements ``generate`` and ``stream``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from textgen.catalog import ModelSpec
from textgen.protocol import GenerationInput

# Whose request is being generated (an account key), for providers that queue fairly across accounts.
# Set by whoever runs a generation (the task runner, the streaming endpoint); None when unknown.
current_account: ContextVar[str | None] = ContextVar("textgen_current_account", default=None)


@dataclass(slots=True)
class FunctionCall:
    name: str
    args: dict[str, Any]
    id: str | None = None
    thought_signature: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "args": self.args}
        if self.id:
            out["id"] = self.id
        if self.thought_signature:
            out["thought_signature"] = self.thought_signature
        return out


@dataclass(slots=True)
class Generation:
    """A finished generation with real token counts (output includes thinking tokens)."""

    text: str
    function_calls: list[FunctionCall] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = "STOP"
    model_version: str = ""


@dataclass(slots=True)
class StreamChunk:
    """One piece of a streamed generation; token counts are cumulative so far."""

    text: str = ""
    function_calls: list[FunctionCall] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    model_version: str = ""
    # The upstream's own chunk (Gemini-native JSON), relayed as-is when present.
    raw: dict[str, Any] | None = None


class Provider(Protocol):
    name: str

    def available(self) -> bool:
        """Whether this provider can serve requests now (key configured, model loaded)."""
        ...

    def check(self, spec: ModelSpec, request: GenerationInput) -> None:
        """Raise BadRequest for what this provider cannot honour, before any work starts."""
        ...

    def count_input_tokens(self, spec: ModelSpec, request: GenerationInput) -> int:
        """An upper bound of the prompt's tokens, used to reserve credits."""
        ...

    async def generate(self, spec: ModelSpec, request: GenerationInput) -> Generation: ...

    def stream(self, spec: ModelSpec, request: GenerationInput) -> AsyncIterator[StreamChunk]: ...

    async def aclose(self) -> None: ...


def estimate_prompt_tokens(request: GenerationInput, per_media_part: int = 0) -> int:
    """An upper bound of the prompt's text tokens: byte-level BPE never uses more tokens than bytes."""
    total = len(request.system_instruction.encode()) + 16
    for message in request.messages:
        total += 10
        if isinstance(message.content, str):
            total += len(message.content.encode())
        else:
            for part in message.content:
                total += len(part.text.encode()) if part.type == "text" else per_media_part
        if message.function_call is not None:
            total += len(message.function_call.model_dump_json().encode())
        if message.function_response is not None:
            total += len(message.function_response.model_dump_json().encode())
    for declaration in request.function_declarations:
        total += len(declaration.model_dump_json().encode()) + 10
    if request.config.response_json_schema is not None:
        import json

        total += len(json.dumps(request.config.response_json_schema).encode())
    return total
