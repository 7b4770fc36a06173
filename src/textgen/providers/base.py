"""The provider protocol: every model backend implements ``generate`` and ``stream``.

A provider is opened once before it serves (loading a model, say) and closed once at shutdown. Every
generation names the account it is for, so a provider that queues can queue fairly across accounts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from textgen.catalog import ModelSpec
from textgen.protocol import GenerationInput


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
    """One piece of a streamed generation; token counts are cumulative so far (0 and 0: not reported)."""

    text: str = ""
    function_calls: list[FunctionCall] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    model_version: str = ""
    # The upstream's own chunk (Gemini-native JSON), relayed as-is when present.
    raw: dict[str, Any] | None = None


@dataclass(slots=True)
class Progress:
    """What a generation has produced so far, kept up to date by providers that know it (token counts are
    cumulative), so that a generation stopped before its end is charged for what it produced."""

    text: list[str] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, chunk: StreamChunk) -> None:
        self.text.append(chunk.text)
        if chunk.input_tokens or chunk.output_tokens:  # the last counts reported are the running totals
            self.input_tokens, self.output_tokens = chunk.input_tokens, chunk.output_tokens

    def generation(self) -> Generation:
        return Generation(
            text="".join(self.text), input_tokens=self.input_tokens, output_tokens=self.output_tokens
        )


class Provider(Protocol):
    name: str

    async def open(self) -> None:
        """Prepare to serve (load a model, ...); raises ConfigurationError when the provider cannot."""
        ...

    def available(self) -> bool:
        """Whether this provider can serve requests now (key configured, model loaded)."""
        ...

    def capacity(self) -> int:
        """How many generations this provider runs at once in one process (the worker claims no more)."""
        ...

    def check(self, spec: ModelSpec, request: GenerationInput) -> None:
        """Raise BadRequest for what this provider cannot honour, before any work starts.

        Runs on a worker thread unless ``light_check`` says it is cheap, so it may be CPU-bound (the local
        model builds its grammars here)."""
        ...

    def light_check(self, request: GenerationInput) -> bool:
        """Whether ``check`` of this request is cheap enough to run on the event loop (well under a
        millisecond at the request limits), saving the hop to a worker thread."""
        ...

    def count_input_tokens(self, spec: ModelSpec, request: GenerationInput) -> int:
        """An upper bound of the prompt's tokens, used to reserve credits."""
        ...

    async def generate(
        self, spec: ModelSpec, request: GenerationInput, *, account: str, progress: Progress | None = None
    ) -> Generation: ...

    def stream(
        self, spec: ModelSpec, request: GenerationInput, *, account: str
    ) -> AsyncIterator[StreamChunk]: ...

    async def aclose(self) -> None:
        """Stop serving and free what ``open`` took (after in-flight generations have stopped)."""
        ...


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
