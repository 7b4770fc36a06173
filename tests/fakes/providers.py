"""An in-process provider for tests of the task machinery (never what a user runs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from textgen.catalog import ModelSpec
from textgen.errors import UpstreamError
from textgen.protocol import GenerationInput
from textgen.providers.base import Generation, Progress, StreamChunk, estimate_prompt_tokens

FAKE_MODELS_TOML = """
[models."fake-model"]
provider = "fake"
input_price = 1000.0
output_price = 1000.0
max_output_tokens = 1000
default_output_tokens = 100
capabilities = ["text", "tools", "json"]
"""


@dataclass
class FakeProvider:
    """Echoes the last user message; can be told to wait, fail, or block until released."""

    name: str = "fake"
    delay: float = 0.0
    fail_with: str | None = None
    gate: asyncio.Event | None = None
    calls: list[GenerationInput] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)  # whose request each call was
    output_tokens: int = 5
    started: asyncio.Event = field(default_factory=asyncio.Event)
    chunk_delay: float = 0.0
    fail_after_chunks: int | None = None
    fail_before_first: UpstreamError | None = None
    stream_closed: int = 0
    slots: int = 64

    def capacity(self) -> int:
        return self.slots

    async def open(self) -> None:
        return None

    def available(self) -> bool:
        return True

    def check(self, spec: ModelSpec, request: GenerationInput) -> None:
        return None

    def light_check(self, request: GenerationInput) -> bool:
        return False

    def count_input_tokens(self, spec: ModelSpec, request: GenerationInput) -> int:
        return estimate_prompt_tokens(request)

    async def generate(
        self,
        spec: ModelSpec,
        request: GenerationInput,
        *,
        account: str,
        progress: Progress | None = None,
    ) -> Generation:
        self.calls.append(request)
        self.accounts.append(account)
        if progress is not None:
            progress.input_tokens = 7  # the prompt has been read: stopping from here on still costs it
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with:
            raise UpstreamError(self.fail_with)
        text = f"echo: {request.messages[-1].text()}"
        return Generation(text=text, input_tokens=7, output_tokens=self.output_tokens)

    async def stream(
        self, spec: ModelSpec, request: GenerationInput, *, account: str
    ) -> AsyncIterator[StreamChunk]:
        if self.fail_before_first is not None:
            raise self.fail_before_first
        result = await self.generate(spec, request, account=account)
        words = result.text.split(" ")
        try:
            for i, word in enumerate(words):
                if self.fail_after_chunks is not None and i == self.fail_after_chunks:
                    raise UpstreamError("upstream stream broke: connection reset")
                if i and self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                yield StreamChunk(text=("" if i == 0 else " ") + word, input_tokens=7, output_tokens=i + 1)
            yield StreamChunk(text="", input_tokens=7, output_tokens=len(words), finish_reason="STOP")
        finally:
            self.stream_closed += 1

    async def aclose(self) -> None:
        return None
