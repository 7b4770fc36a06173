"""Prometheus metrics: every series textgen exposes, and the one-line helpers the observation points call.

Label values come from bounded sets only: route templates (never raw paths), a fixed list of methods, the
catalog's models and providers, the failure classes below and a few fixed words. Label children are cached,
so an observation costs a dictionary lookup and an increment.

Each process counts what it does itself. A process started by ``textgen serve --workers N`` shares its
counts with its siblings through prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, one
memory-mapped file per process), so that a scrape answered by any one of them reports the sum of all N.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Protocol, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from textgen.errors import PaymentRequired, RateLimited, StorageUnavailable

T = TypeVar("T")
log = logging.getLogger("textgen.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

HTTP_REQUESTS = Counter(
    "textgen_http_requests",
    "HTTP requests answered, by method, route template and status code",
    ["method", "route", "status"],
)
HTTP_OVERHEAD = Histogram(
    "textgen_http_overhead_seconds",
    "Time in textgen per request up to the response head, excluding waits on the model provider "
    "(the figure of x-textgen-overhead-ms)",
    ["method", "route"],
    buckets=_OVERHEAD_BUCKETS,
)
UPSTREAM_SECONDS = Histogram(
    "textgen_upstream_seconds",
    "Duration of one generation by the model provider (a whole stream for streams), by model",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
FIRST_CHUNK_SECONDS = Histogram(
    "textgen_upstream_first_chunk_seconds",
    "Time from starting a streamed generation to its first chunk, by model",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
TASKS_IN_FLIGHT = Gauge(
    "textgen_tasks_in_flight",
    "Generations running now in this process (all processes of the instance under --workers), by provider",
    ["provider"],
    multiprocess_mode="livesum",
)
TASK_OUTCOMES = Counter(
    "textgen_task_outcomes",
    "Tasks finished (settled), by model, status and failure class (none for done)",
    ["model", "status", "failure"],
)
TOKENS = Counter(
    "textgen_tokens",
    "Tokens of finished tasks, by model and kind (input or output)",
    ["model", "kind"],
)
CREDITS = Counter(
    "textgen_credits_charged",
    "Credits charged for finished tasks, by model",
    ["model"],
)
WEBHOOK_ATTEMPTS = Counter(
    "textgen_webhook_attempts",
    "Webhook delivery attempts, by outcome (delivered, will_retry, gave_up) and receiver answer "
    "(2xx..5xx, or none without an HTTP answer)",
    ["outcome", "answer"],
)
REFUSALS = Counter(
    "textgen_refusals",
    "Requests refused by rate limits (429, reason rate_limit) or for want of credits (402, reason credits)",
    ["reason"],
)
LOCAL_POOL_WAIT = Histogram(
    "textgen_local_pool_wait_seconds",
    "Time a generation waited for a free instance of the embedded model",
    buckets=_WAIT_BUCKETS,
)

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
UNMATCHED = "unmatched"  # the route label of a request no route matched (404s for unknown paths)

# ---- HTTP requests -----------------------------------------------------------------------------------

_request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def request_answered(scope: MutableMapping[str, Any], status: int, overhead_seconds: float) -> None:
    """Count a request by its route template and status, and observe textgen's own time for it."""
    route = scope.get("route")
    template: str = getattr(route, "path_format", None) or UNMATCHED
    method: str = scope.get("method", "GET")
    # Keyed by the label values, so that odd methods cannot grow this cache beyond the bounded series.
    shown = method if method in _METHODS else "other"
    key = (shown, template, status)
    children = _request_children.get(key)
    if children is None:
        children = (
            HTTP_REQUESTS.labels(shown, template, str(status)),
            HTTP_OVERHEAD.labels(shown, template),
        )
        _request_children[key] = children
    children[0].inc()
    children[1].observe(overhead_seconds)


def refused(exc: Exception) -> None:
    """Count a refusal for rate or credits; any other error is not one."""
    if isinstance(exc, RateLimited):
        REFUSALS.labels("rate_limit").inc()
    elif isinstance(exc, PaymentRequired):
        REFUSALS.labels("credits").inc()


# ---- generations -------------------------------------------------------------------------------------


class GenerationWatch:
    """One generation by a provider: in flight from creation until ``done``; times it and its first chunk."""

    __slots__ = ("_gauge", "_model", "_open", "_started")

    def __init__(self, model: str, provider: str) -> None:
        self._model = model
        self._gauge = TASKS_IN_FLIGHT.labels(provider)
        self._gauge.inc()
        self._open = True
        self._started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def first_chunk(self) -> float:
        """Observe the time to the first chunk; returns it."""
        elapsed = self.elapsed()
        FIRST_CHUNK_SECONDS.labels(self._model).observe(elapsed)
        return elapsed

    def done(self) -> float:
        """The generation ended (any way): observe its duration once; returns the time since it started."""
        elapsed = self.elapsed()
        if self._open:
            self._open = False
            self._gauge.dec()
            UPSTREAM_SECONDS.labels(self._model).observe(elapsed)
        return elapsed


def generation_started(model: str, provider: str) -> GenerationWatch:
    return GenerationWatch(model, provider)


FAILURE_CLASSES = (
    "upstream",  # the model provider failed or refused (its own message)
    "timeout",  # a sync request ran out of time
    "client_disconnected",  # a stream's client went away
    "interrupted",  # the server stopped while the task was streaming
    "lease_lost",  # another worker took the task over
    "rejected",  # the stored request can no longer be served (model gone, invalid)
    "internal",  # a bug: see the server log
)


def failure_class(reason: str | None) -> str:
    """The bounded class of a task's ``failed_reason`` (a free text) for the outcome label."""
    if not reason:
        return "upstream"
    if reason.startswith("timed out after"):
        return "timeout"
    if reason == "client disconnected":
        return "client_disconnected"
    if reason.startswith("interrupted:"):
        return "interrupted"
    if reason == "lease lost":
        return "lease_lost"
    if reason.startswith(("internal error", "generation failed:")):
        return "internal"
    if reason.startswith(("model_name:", "stored request is invalid")):
        return "rejected"
    return "upstream"


class FinishedTask(Protocol):
    @property
    def model_name(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def failed_reason(self) -> str | None: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def credits_used(self) -> int: ...


_MICRO = 1_000_000


F = TypeVar("F", bound=FinishedTask | None)


def task_finished(task: F) -> F:
    """Count a settled task and return it (None, an outcome another worker recorded, counts nothing)."""
    if task is None:
        return task
    model = task.model_name
    status = str(task.status)
    failure = "none" if status == "done" else failure_class(task.failed_reason)
    TASK_OUTCOMES.labels(model, status, failure).inc()
    if task.input_tokens:
        TOKENS.labels(model, "input").inc(task.input_tokens)
    if task.output_tokens:
        TOKENS.labels(model, "output").inc(task.output_tokens)
    if task.credits_used:
        CREDITS.labels(model).inc(task.credits_used / _MICRO)
    return task


async def local_pool_wait(acquiring: Awaitable[T]) -> T:
    """Await an instance of the embedded model, observing how long that took."""
    started = time.perf_counter()
    got = await acquiring
    LOCAL_POOL_WAIT.observe(time.perf_counter() - started)
    return got


# ---- webhooks ----------------------------------------------------------------------------------------

_WEBHOOK_OUTCOMES = {"delivered": "delivered", "pending": "will_retry", "failed": "gave_up"}


def webhook_attempt(outcome: str, status_code: int | None) -> None:
    """Count one delivery attempt by what it led to and the receiver's answer."""
    answer = f"{status_code // 100}xx" if status_code is not None and 100 <= status_code < 600 else "none"
    WEBHOOK_ATTEMPTS.labels(_WEBHOOK_OUTCOMES.get(outcome, "gave_up"), answer).inc()


# ---- database-wide gauges ----------------------------------------------------------------------------


class QueueDepth:
    """Tasks pending and running, and webhook deliveries waiting, read from the database at scrape time.

    Every process sees the same database, so these are the same from every scrape target; the read is
    cached for ``ttl`` seconds so that scrapes (of many targets, or frequent ones) cost one query each.
    """

    def __init__(self, read: Callable[[], Awaitable[tuple[dict[str, int], int]]], ttl: float = 5.0) -> None:
        self._read = read
        self._ttl = ttl
        self._lock = asyncio.Lock()
        self._at = -math.inf
        self._families: list[Metric] = []

    async def families(self) -> list[Metric]:
        async with self._lock:
            if time.monotonic() - self._at >= self._ttl:
                try:
                    tasks, deliveries = await self._read()
                except StorageUnavailable as exc:
                    log.warning("metrics: cannot read the queue depth (%s)", exc)
                    return []  # absent rather than stale
                queue = GaugeMetricFamily(
                    "textgen_queue_tasks",
                    "Tasks waiting (pending) and running, in the whole database",
                    labels=["status"],
                )
                for status in ("pending", "running"):
                    queue.add_metric([status], tasks.get(status, 0))
                backlog = GaugeMetricFamily(
                    "textgen_webhook_backlog",
                    "Webhook deliveries still to be made (pending), in the whole database",
                    value=deliveries,
                )
                self._families = [queue, backlog]
                self._at = time.monotonic()
            return self._families


# ---- exposition --------------------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess_dir(path: str) -> None:
    """Start a multiprocess run on an empty directory (counts of an earlier run must not carry over)."""
    os.makedirs(path, exist_ok=True)
    for name in glob.glob(os.path.join(path, "*.db")):
        os.remove(name)


def process_exiting() -> None:
    """A process stops: its in-flight gauges leave the sum (counters stay, as counts do)."""
    path = multiprocess_dir()
    if path is not None:
        mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]


def _prune_dead(path: str) -> None:
    # A process that died without process_exiting() (SIGKILL) would hold its in-flight count forever.
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid = name.rsplit("_", 1)[-1].removesuffix(".db")
        if pid.isdigit() and not _alive(int(pid)):
            mark_process_dead(int(pid), path)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process stays a zombie until its parent reaps it; it runs nothing any more
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class _Collected:
    def __init__(self, base: Any, extra: Iterable[Metric]) -> None:
        self._base = base
        self._extra = list(extra)

    def collect(self) -> Iterable[Metric]:
        yield from self._base.collect()
        yield from self._extra


def exposition(accept: str | None, extra: Iterable[Metric] = ()) -> tuple[bytes, str]:
    """The scrape body and its content type (Prometheus text, or OpenMetrics when asked for)."""
    path = multiprocess_dir()
    base: Any = REGISTRY
    if path is not None:
        _prune_dead(path)
        base = CollectorRegistry()
        MultiProcessCollector(base, path=path)  # type: ignore[no-untyped-call]
    encoder, content_type = choose_encoder(accept or "")
    return encoder(_Collected(base, extra)), content_type  # type: ignore[arg-type]
