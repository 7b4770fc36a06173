"""Model providers, registered by name; the catalog maps each model to one of them."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from textgen.catalog import ModelSpec
from textgen.errors import BadRequest
from textgen.protocol import GenerationInput
from textgen.providers.base import FunctionCall, Generation, Provider, StreamChunk

__all__ = ["FunctionCall", "Generation", "Provider", "ProviderRegistry", "StreamChunk"]


class ProviderRegistry:
    """Resolves a model name to its spec and provider, refusing what cannot be served."""

    def __init__(self, catalog: dict[str, ModelSpec], providers: dict[str, Provider]) -> None:
        self.catalog = catalog
        self.providers = providers
        # Providers' own checks may be CPU-bound (the local model builds its grammars): they run here, off
        # the event loop, on at most two threads whatever the number of requests being admitted.
        self._checks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="textgen-check")

    def resolve(self, model_name: str) -> tuple[ModelSpec, Provider]:
        spec = self.catalog.get(model_name)
        if spec is None:
            known = ", ".join(sorted(self.catalog))
            raise BadRequest(f"model_name: unknown model {model_name!r}; known models: {known}")
        provider = self.providers.get(spec.provider)
        if provider is None or not provider.available():
            raise BadRequest(
                f"model_name: model {model_name!r} is not configured on this server "
                f"(provider {spec.provider!r} is not available)"
            )
        return spec, provider

    async def admit(self, request: GenerationInput) -> tuple[ModelSpec, Provider]:
        """Resolve the model and check that it can honour every feature the request uses."""
        spec, provider = self.resolve(request.model_name)
        for kind in sorted(request.media_kinds()):
            if kind not in spec.capabilities:
                raise BadRequest(f"messages: model {spec.name!r} does not accept {kind} input")
        if request.function_declarations and "tools" not in spec.capabilities:
            raise BadRequest(f"tools: model {spec.name!r} does not support function calling")
        if request.config.response_mime_type == "application/json" and "json" not in spec.capabilities:
            raise BadRequest(f"config.response_mime_type: model {spec.name!r} does not support JSON output")
        mot = request.config.max_output_tokens
        if mot is not None and mot > spec.max_output_tokens:
            raise BadRequest(
                f"config.max_output_tokens: {mot} exceeds the maximum of {spec.max_output_tokens} "
                f"for model {spec.name!r}"
            )
        # A defect in a check (say a RecursionError) is not a refusal: TaskService.admit logs it as a 503.
        if provider.light_check(request):
            provider.check(spec, request)
        else:
            await asyncio.get_running_loop().run_in_executor(self._checks, provider.check, spec, request)
        return spec, provider

    async def aclose(self) -> None:
        self._checks.shutdown(wait=False, cancel_futures=True)
        for provider in self.providers.values():
            await provider.aclose()
