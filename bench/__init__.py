"""textgen's benchmarks: overhead, a LiteLLM peer, streaming, the async queue, the embedded model and a soak.

``python -m bench`` (or ``make bench``) runs them all and writes ``docs/benchmarks.md`` and ``docs/benchmarks.png``.
"""
