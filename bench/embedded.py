"""The embedded model: tokens/s through textgen versus llama-cpp-python called directly, same prompt and limits."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import httpx

from bench.stack import Textgen

MODEL = "smollm2-135m-instruct"
PROMPT = "Write a long story about a robot who learns to paint. Describe every painting in detail."
SEED = 1234
TEMPERATURE = (
    0.7  # textgen's default sampling for the local model: temperature 0.7, top_p 0.95, top_k 40, min_p 0.05
)


@dataclass
class TokenRate:
    tokens: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class Comparison:
    direct: TokenRate
    textgen: TokenRate
    ratios: list[float]  # textgen's tokens/s over llama-cpp-python's, round by round


def compare(server: Textgen, max_tokens: int, rounds: int) -> Comparison:
    """llama-cpp-python on the bundled GGUF, configured as textgen configures one instance on this machine, and
    textgen's sync requests, one round of each in turn (after a warm-up round of each), so that a change in the
    machine's speed during the run reaches both alike; the per-round ratios give the spread."""
    from llama_cpp import Llama

    from textgen.providers.local import bundled_model_path, default_instances

    threads = max(1, (os.cpu_count() or 2) // default_instances())
    llm = Llama(
        model_path=str(bundled_model_path()),
        n_ctx=4096,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    messages = [{"role": "user", "content": PROMPT}]
    body = {
        "model_name": MODEL,
        "sync": True,
        "messages": messages,
        "config": {"max_output_tokens": max_tokens, "temperature": TEMPERATURE},
    }
    direct, through = TokenRate(0, 0.0), TokenRate(0, 0.0)
    ratios: list[float] = []
    try:
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=600) as client:
            for i in range(rounds + 1):  # the first round of each warms up
                started = time.perf_counter()
                out = llm.create_chat_completion(
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=max_tokens,
                    temperature=TEMPERATURE,
                    top_p=0.95,
                    top_k=40,
                    min_p=0.05,
                    repeat_penalty=1.0,
                    seed=SEED + i,
                )
                one_direct = TokenRate(out["usage"]["completion_tokens"], time.perf_counter() - started)  # type: ignore[index]
                body["config"]["seed"] = SEED + i  # type: ignore[index]
                started = time.perf_counter()
                response = client.post("/sse/text_generator/", json=body)
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                task = response.json()
                if task["status"] != "done":
                    raise RuntimeError(f"local generation failed: {task.get('failed_reason')}")
                one_textgen = TokenRate(task["output_tokens"], elapsed)
                if i:
                    for total, one in ((direct, one_direct), (through, one_textgen)):
                        total.tokens += one.tokens
                        total.seconds += one.seconds
                    if one_direct.per_second:
                        ratios.append(one_textgen.per_second / one_direct.per_second)
    finally:
        llm.close()
        del llm
        gc.collect()
    return Comparison(direct, through, ratios)
