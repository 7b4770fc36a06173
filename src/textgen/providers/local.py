"""The embedded model: a GGUF chat model run in-process by llama.cpp (llama-cpp-python).

Model instances sit in a pool. Each generation runs on a thread, token by token, so the event loop never
blocks, token counts are exact, and a cancelled stream stops the CPU work before the next token.
Waiting requests are served round-robin across accounts, so one busy account cannot starve the others.
llama.cpp reuses the KV cache for a prompt prefix it has already evaluated, so a conversation goes to
the free instance whose last prompt shares the longest prefix with it, which makes multi-turn
conversations cheaper. Structured output and function calls are enforced by grammars (see local_output).
"""

from __future__ import annotations

import asyncio
import atexit
import codecs
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

from textgen import limits, metrics
from textgen.catalog import ModelSpec
from textgen.errors import BadRequest, ConfigurationError, TokenUsage, UpstreamError
from textgen.protocol import GenerationInput
from textgen.providers.base import (
    FunctionCall,
    Generation,
    Progress,
    StreamChunk,
    estimate_prompt_tokens,
)
from textgen.providers.local_model import (
    CallChoice,
    LocalJob,
    bundled_model_path,
    close_llama_devnull,
    default_instances,
)
from textgen.providers.local_output import (
    CALL_THRESHOLD,
    SCORED_TOKENS,
    ToolChoice,
    plan_output,
    render_messages,
    scoring_tokens,
    tool_choice,
)
from textgen.providers.local_pool import FairPool
from textgen.structured import Budget

__all__ = ["LocalJob", "LocalProvider", "bundled_model_path", "default_instances", "render_messages"]

log = logging.getLogger("textgen.local")

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40


class _Cancelled(Exception):
    pass


class _Engine:
    """One llama.cpp model instance and its chat template."""

    def __init__(self, llm: Any, index: int = 0) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        self.index = index
        # The text whose KV cache this instance holds (last prompt and its output): the affinity key.
        self.cached = ""
        # Tokens sampled over this instance's life; lets tests see that a cancelled generation stopped.
        self.sampled = 0
        # Scoring passes run, and the tokens they evaluated, over this instance's life (choosing a call).
        self.passes = 0
        self.scored_tokens = 0
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ConfigurationError("the GGUF model has no chat template (tokenizer.chat_template)")
        eos, bos = llm.token_eos(), llm.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        )

    def render(self, messages: list[dict[str, str]]) -> tuple[str, bool, list[str]]:
        result = self.formatter(messages=cast(Any, messages))
        stops = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return result.prompt, bool(result.added_special), [s for s in stops if s]

    def prompt(self, messages: list[dict[str, str]]) -> tuple[str, list[int], list[str]]:
        text, added_special, stops = self.render(messages)
        tokens = self.llm.tokenize(text.encode(), add_bos=not added_special, special=True)
        return text, tokens, stops

    def grammar_error(self, grammar: str) -> str | None:
        """None when llama.cpp accepts the grammar (a rejected grammar must never reach the sampler)."""
        import llama_cpp

        sampler = llama_cpp.llama_sampler_init_grammar(self.llm._model.vocab, grammar.encode(), b"root")
        if not sampler:
            return "llama.cpp rejected the grammar built for this request"
        llama_cpp.llama_sampler_free(sampler)
        return None

    def _continuation_logprob(self, context: str, text: str) -> tuple[float, int, int]:
        """log P(text | context) under the model, in nats, the number of tokens of ``text``, and the number
        of tokens the pass evaluated (what it costs, as prompt tokens)."""
        import numpy as np
        from llama_cpp._internals import LlamaBatch

        llm = self.llm
        head = llm.tokenize(context.encode(), add_bos=False, special=False)[-SCORED_TOKENS:]
        tail = llm.tokenize(f" {text}".encode(), add_bos=False, special=False)[:SCORED_TOKENS]
        tokens = head + tail
        llm.reset()
        llm._ctx.kv_cache_clear()
        batch = LlamaBatch(n_tokens=len(tokens), embd=0, n_seq_max=1, verbose=False)
        try:
            batch.set_batch(batch=tokens, n_past=0, logits_all=True)
            llm._ctx.decode(batch)
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(tokens), llm.n_vocab()))
            rows = logits[len(head) - 1 : len(tokens) - 1].astype(np.float64)
        finally:
            batch.close()  # type: ignore[no-untyped-call]
            llm._ctx.kv_cache_clear()
        self.passes += 1
        self.scored_tokens += len(tokens)
        top = rows.max(axis=1)
        log_norm = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
        picked = rows[np.arange(len(tail)), tail]
        return float((picked - log_norm).sum()), len(tail), len(tokens)

    def relevance(self, query: str, descriptions: dict[str, str]) -> dict[str, float]:
        """How much each description raises the model's likelihood of the request, per token of it."""
        return self.score(query, descriptions)[0]

    def score(
        self,
        query: str,
        descriptions: dict[str, str],
        cancel: threading.Event | None = None,
        seconds: float | None = None,
    ) -> tuple[dict[str, float], int]:
        """The relevance of each description, and the tokens the passes evaluated.

        The pointwise mutual information log P(query | "<description>\nExample request:") - log P(query |
        "Example request:"), averaged over the query's tokens: positive when the model finds the request
        more likely as a request for that function than as a request at all. Deterministic (no sampling).
        One pass per description (at most ``LOCAL_MAX_SCORED_FUNCTIONS``, see ``tool_choice``) plus one;
        descriptions not reached within ``seconds`` are not scored.
        """
        seconds = limits.LOCAL_SCORING_SECONDS if seconds is None else seconds
        deadline = time.monotonic() + seconds
        self.cached = ""  # the passes clear the KV cache: it no longer holds a prompt
        base, n, evaluated = self._continuation_logprob("Example request:", query)
        scores: dict[str, float] = {}
        for name, description in descriptions.items():
            if cancel is not None and cancel.is_set():
                raise _Cancelled
            if time.monotonic() >= deadline:
                log.warning(
                    "tool choice: scored %d of %d functions within %g s",
                    len(scores),
                    len(descriptions),
                    seconds,
                )
                break
            given, _, cost = self._continuation_logprob(f"{description}\nExample request:", query)
            evaluated += cost
            scores[name] = (given - base) / max(n, 1)
        return scores, evaluated

    def choose(self, job: LocalJob, cancel: threading.Event | None = None) -> tuple[LocalJob, int]:
        """The job to run: ``job`` itself (text), or the call its choice makes when one is relevant enough;
        and the prompt tokens the choice evaluated (billed with the generation's own)."""
        if job.choice is None:
            return job, 0
        scores, evaluated = self.score(job.choice.query, job.choice.descriptions, cancel)
        log.debug("tool choice for %r: %s", job.choice.query[:80], scores)
        best = max(scores, key=lambda name: scores[name], default=None)
        if best is not None and scores[best] > CALL_THRESHOLD:
            return job.choice.calls[best], evaluated
        return job, evaluated

    def run(
        self, job: LocalJob, emit: Callable[[str, int, int, str | None], None], cancel: threading.Event
    ) -> None:
        """Generate on this thread, calling ``emit(delta, prompt_tokens, output_tokens, finish)``."""
        import llama_cpp
        from llama_cpp.llama_grammar import LlamaGrammar

        llm = self.llm
        prompt_text, prompt, template_stops = self.prompt(job.messages)
        n_ctx = llm.n_ctx()
        if len(prompt) >= n_ctx:
            raise UpstreamError(
                f"the prompt is {len(prompt)} tokens, more than the local model's context of {n_ctx}",
                status_code=400,
            )
        max_tokens = min(job.max_tokens, n_ctx - len(prompt))
        grammar = None
        if job.grammar is not None:
            problem = self.grammar_error(job.grammar)
            if problem is not None:
                raise UpstreamError(problem)
            grammar = LlamaGrammar.from_string(job.grammar, verbose=False)
        if job.seed is not None:
            # Reusing a cached prefix evaluates the prompt in different batches, which changes the logits
            # in the last bits; a seeded request re-evaluates from scratch so equal seeds give equal text.
            llm.reset()
        llm.set_seed(job.seed if job.seed is not None else secrets.randbits(31))
        self.cached = prompt_text
        stops = [*job.stop, *template_stops]
        hold = max((len(s) for s in stops), default=1) - 1
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        sent = 0
        count = 0
        finish = "MAX_TOKENS"
        history = list(prompt)
        for token in llm.generate(
            prompt,
            top_k=job.top_k,
            top_p=job.top_p,
            min_p=0.05,
            temp=job.temperature,
            repeat_penalty=1.0,
            frequency_penalty=job.frequency_penalty,
            presence_penalty=job.presence_penalty,
            grammar=grammar,
        ):
            self.sampled += 1
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
        self.cached = prompt_text + text
        emit(text[sent:], len(prompt), count, finish)


class LocalProvider:
    """Serves the catalog's ``local`` models from a pool of llama.cpp instances."""

    name = "local"

    def __init__(
        self,
        model_path: Path | None = None,
        instances: int | None = None,
        n_ctx: int = 4096,
        threads: int | None = None,
    ) -> None:
        self.model_path = model_path or bundled_model_path()
        self.instances = instances or default_instances()
        self.n_ctx = n_ctx
        self.threads = threads or max(1, (os.cpu_count() or 2) // self.instances)
        self.pool: FairPool[_Engine] = FairPool()
        self._engines: list[_Engine] = []
        self.load_error: str | None = None
        # Generations whose thread is using an instance: closed only once every one has stopped.
        self._running: dict[asyncio.Future[None], threading.Event] = {}

    def capacity(self) -> int:
        """One generation per model instance; more would only wait in the pool."""
        return self.instances

    async def open(self) -> None:
        """Load the model instances (in a thread), then put them into the pool on this event loop."""
        await asyncio.to_thread(self.load)
        for engine in self._engines:
            self.pool.release(engine)

    def load(self) -> None:
        """Load the model instances (blocking)."""
        from llama_cpp import Llama

        atexit.register(close_llama_devnull)

        try:
            for index in range(self.instances):
                llm = Llama(
                    model_path=str(self.model_path),
                    n_ctx=self.n_ctx,
                    n_threads=self.threads,
                    n_threads_batch=self.threads,
                    verbose=False,
                )
                self._engines.append(_Engine(llm, index))
        except ConfigurationError as exc:
            self.load_error = exc.message
            raise
        except Exception as exc:
            self.load_error = f"could not load {self.model_path}: {exc}"
            raise ConfigurationError(self.load_error) from exc
        log.info(
            "local model loaded: %s (%d instance(s), %d thread(s) each)",
            self.model_path.name,
            self.instances,
            self.threads,
        )

    @property
    def engines(self) -> list[_Engine]:
        return list(self._engines)

    def available(self) -> bool:
        return bool(self._engines)

    def check(self, spec: ModelSpec, request: GenerationInput) -> None:
        """Build the request's grammars now (off the event loop, within one budget), so an unusable schema
        is a 400 before any task exists."""
        budget = Budget()
        narrowed = tool_choice(request, budget)
        requests = (
            [narrowed.text, *narrowed.calls.values()] if isinstance(narrowed, ToolChoice) else [narrowed]
        )
        for each in requests:
            plan = plan_output(each, budget)
            if plan.grammar is not None and self._engines:
                problem = self._engines[0].grammar_error(plan.grammar)
                if problem is not None:
                    raise BadRequest(f"config.response_json_schema / tools: {problem}")

    def light_check(self, request: GenerationInput) -> bool:
        return False  # grammars and the tool choice are built on a worker thread, within their budget

    def count_input_tokens(self, spec: ModelSpec, request: GenerationInput) -> int:
        estimate = estimate_prompt_tokens(request)
        # The function-calling instructions added to the system prompt, and the passes choosing a call.
        return estimate + (400 if request.function_declarations else 0) + scoring_tokens(request)

    def job(self, spec: ModelSpec, request: GenerationInput) -> LocalJob:
        """The request as llama.cpp runs it, its grammars built (CPU-bound: call it off the event loop)."""
        budget = Budget()
        narrowed = tool_choice(request, budget)
        if not isinstance(narrowed, ToolChoice):
            return self._job(spec, narrowed, budget)
        job = self._job(spec, narrowed.text, budget)
        job.choice = CallChoice(
            query=narrowed.query,
            descriptions=narrowed.descriptions,
            calls={name: self._job(spec, each, budget) for name, each in narrowed.calls.items()},
        )
        return job

    def _job(self, spec: ModelSpec, request: GenerationInput, budget: Budget) -> LocalJob:
        cfg = request.config
        plan = plan_output(request, budget)
        return LocalJob(
            messages=render_messages(request),
            max_tokens=cfg.max_output_tokens or spec.default_output_tokens,
            temperature=DEFAULT_TEMPERATURE if cfg.temperature is None else cfg.temperature,
            top_p=DEFAULT_TOP_P if cfg.top_p is None else cfg.top_p,
            top_k=DEFAULT_TOP_K if cfg.top_k is None else cfg.top_k,
            presence_penalty=cfg.presence_penalty or 0.0,
            frequency_penalty=cfg.frequency_penalty or 0.0,
            seed=cfg.seed,
            # A stop sequence must not cut a function call in half.
            stop=[] if plan.calls else list(cfg.stop_sequences or []),
            grammar=plan.grammar,
            output=plan,
        )

    async def generate(
        self, spec: ModelSpec, request: GenerationInput, *, account: str, progress: Progress | None = None
    ) -> Generation:
        job = await self._job_off_loop(spec, request)
        job.account = account
        return await self.generate_job(spec, job, progress)

    async def _job_off_loop(self, spec: ModelSpec, request: GenerationInput) -> LocalJob:
        return await asyncio.to_thread(self.job, spec, request)

    async def generate_job(
        self, spec: ModelSpec, job: LocalJob, progress: Progress | None = None
    ) -> Generation:
        parts: list[str] = []
        calls: list[FunctionCall] = []
        last = StreamChunk()
        async for chunk in self.stream_job(spec, job):
            if progress is not None:
                progress.add(chunk)
            parts.append(chunk.text)
            calls.extend(chunk.function_calls)
            last = chunk
        return Generation(
            text="".join(parts),
            function_calls=calls,
            input_tokens=last.input_tokens,
            output_tokens=last.output_tokens,
            finish_reason=last.finish_reason or "STOP",
            model_version=spec.name,
        )

    async def stream(
        self, spec: ModelSpec, request: GenerationInput, *, account: str
    ) -> AsyncIterator[StreamChunk]:
        job = await self._job_off_loop(spec, request)
        job.account = account
        async with contextlib.aclosing(self.stream_job(spec, job)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def stream_job(self, spec: ModelSpec, job: LocalJob) -> AsyncGenerator[StreamChunk, None]:
        """Yield text as generated; a call is held back and arrives whole in the last chunk.

        Closing the generator (or cancelling its consumer) stops the model before its next token and
        returns the instance to the pool once its thread has stopped.
        """
        if not self._engines:
            raise UpstreamError("the local model is not loaded", status_code=503)
        account = job.account or ""
        prompt_text, _, _ = self._engines[0].render(job.messages)
        engine = await metrics.local_pool_wait(self.pool.acquire(account, prompt_text))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def emit(delta: str, prompt_tokens: int, output_tokens: int, finish: str | None) -> None:
            loop.call_soon_threadsafe(
                queue.put_nowait, ("chunk", (delta, prompt_tokens, output_tokens, finish))
            )

        def produce() -> None:
            try:
                chosen, scored = engine.choose(job, cancel)
                loop.call_soon_threadsafe(queue.put_nowait, ("job", chosen))

                def billed(delta: str, prompt_tokens: int, output_tokens: int, finish: str | None) -> None:
                    emit(delta, prompt_tokens + scored, output_tokens, finish)  # the choice's passes too

                engine.run(chosen, billed, cancel)
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
            except _Cancelled:
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
            except Exception as exc:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        plan = job.output
        raw = ""
        released = 0  # characters of raw already yielded as text
        thread = loop.run_in_executor(None, produce)
        self._running[thread] = cancel
        thread.add_done_callback(lambda done: self._running.pop(done, None))
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "job":
                    plan, job = payload.output, payload
                elif kind == "chunk":
                    delta, prompt_tokens, output_tokens, finish = payload
                    raw += delta
                    if finish is None:
                        if plan.calls or len(raw) == released:
                            continue  # a call is held back until it is complete
                        text, released = raw[released:], len(raw)
                        yield StreamChunk(
                            text=text,
                            input_tokens=prompt_tokens,
                            output_tokens=output_tokens,
                            model_version=spec.name,
                        )
                        continue
                    try:
                        text, calls = plan.interpret(raw, finish, job.max_tokens)
                    except UpstreamError as exc:  # the output is unusable, but it was generated
                        exc.usage = TokenUsage(prompt_tokens, output_tokens)
                        raise
                    yield StreamChunk(
                        text=text[released:] if not calls else "",
                        function_calls=calls,
                        input_tokens=prompt_tokens,
                        output_tokens=output_tokens,
                        finish_reason=finish,
                        model_version=spec.name,
                    )
                elif kind == "error":
                    if isinstance(payload, UpstreamError):
                        raise payload
                    raise UpstreamError(f"local model failed: {payload}")
                else:
                    return
        finally:
            cancel.set()
            # The instance goes back to the pool only once its thread has stopped using it (at most one more
            # token). Inside a cancelled (anyio) scope that await is cancelled again; the thread's completion
            # callback then returns the instance, so it is never lost.
            try:
                await asyncio.shield(thread)
            except BaseException:
                thread.add_done_callback(lambda _: self.pool.release(engine))
                raise
            self.pool.release(engine)

    async def aclose(self) -> None:
        # An instance closed while a thread still generates on it would crash the process: stop them first
        # (each stops before its next token) and wait for their threads.
        for cancel in self._running.values():
            cancel.set()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        for engine in self._engines:
            with contextlib.suppress(Exception):
                engine.llm.close()
        self._engines.clear()
