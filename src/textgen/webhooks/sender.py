"""The delivery sender: claims due deliveries from the outbox and POSTs each, signed, to its receiver.

Attempts run concurrently up to a bound, each under one overall deadline, so a slow or dead receiver
holds one slot for at most the timeout and never the API or the other deliveries. A delivery is locked
while its attempt is in flight (at most one per delivery); the lock outlives the deadline, so a sender
that dies mid-attempt leaves a delivery another sender retries once the lock expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import heapq
import logging
import ssl
import time
from dataclasses import dataclass

import httpcore
import httpx
from standardwebhooks import Webhook

from textgen import __version__, metrics
from textgen.errors import ConfigurationError, StorageUnavailable
from textgen.settings import Settings
from textgen.storage.store import AttemptRecord, DeliveryRow, Store, utcnow
from textgen.webhooks.addresses import AddressPolicy, GuardedBackend, RefusedDestination
from textgen.webhooks.retry import GiveUp, Retry, RetrySchedule, parse_retry_after

log = logging.getLogger("textgen.webhooks")

MAX_RESPONSE_BYTES = 64 * 1024  # read at most this much of a receiver's answer
_ERROR_EXCERPT = 300
_LOCK_MARGIN_SECONDS = 30.0


def signature_header(secrets: list[str], msg_id: str, timestamp: int, payload: str) -> str:
    """The ``webhook-signature`` value: one ``v1,<base64 HMAC>`` per signing secret, space-separated."""
    when = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    return " ".join(Webhook(secret).sign(msg_id, when, payload) for secret in secrets)


def webhook_headers(secrets: list[str], msg_id: str, timestamp: int, payload: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "accept-encoding": "identity",
        "user-agent": f"textgen-webhooks/{__version__}",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(secrets, msg_id, timestamp, payload),
    }


@dataclass(frozen=True, slots=True)
class SendResult:
    status_code: int | None
    error: str | None
    retry_after: float | None = None


def guarded_client(
    policy: AddressPolicy, timeout: float, concurrency: int, ssl_context: ssl.SSLContext | None = None
) -> httpx.AsyncClient:
    """An HTTP client that connects only where ``policy`` allows, never follows redirects, ignores proxies."""
    context = ssl_context or httpx.create_ssl_context()
    transport = httpx.AsyncHTTPTransport(verify=context, retries=0)
    # httpx has no public hook for the network backend; its transport is a thin adapter over this pool.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=context,
        max_connections=concurrency * 2,
        max_keepalive_connections=concurrency,
        keepalive_expiry=5.0,
        retries=0,
        network_backend=GuardedBackend(policy),
    )
    return httpx.AsyncClient(
        transport=transport, follow_redirects=False, trust_env=False, timeout=httpx.Timeout(timeout)
    )


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_EXCERPT else text[: _ERROR_EXCERPT - 1] + "…"


class WebhookSender:
    def __init__(
        self,
        store: Store,
        *,
        worker_id: str,
        policy: AddressPolicy,
        schedule: RetrySchedule,
        timeout: float,
        concurrency: int,
        poll_seconds: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.policy = policy
        self.schedule = schedule
        self.timeout = timeout
        self.concurrency = concurrency
        self.poll_seconds = poll_seconds
        self.lock_seconds = timeout + _LOCK_MARGIN_SECONDS
        self._client = guarded_client(policy, timeout, concurrency, ssl_context)
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._due: list[float] = []  # monotonic times of retries this sender scheduled
        self.attempts = 0

    @classmethod
    def from_settings(
        cls, store: Store, settings: Settings, worker_id: str, policy: AddressPolicy
    ) -> WebhookSender:
        try:
            schedule = RetrySchedule.parse(settings.webhook_schedule, settings.webhook_jitter)
        except ValueError as exc:
            raise ConfigurationError(f"invalid configuration: TEXTGEN_WEBHOOK_SCHEDULE: {exc}") from exc
        return cls(
            store,
            worker_id=worker_id,
            policy=policy,
            schedule=schedule,
            timeout=settings.webhook_timeout_seconds,
            concurrency=settings.webhook_concurrency,
            poll_seconds=settings.webhook_poll_seconds,
        )

    def notify(self) -> None:
        """Wake the claim loop (a delivery was just queued in this process)."""
        self._wake.set()

    async def run(self, *, burst: bool = False) -> None:
        """Send due deliveries until stopped; with ``burst``, return once nothing is due or in flight."""
        self._stopping = False
        while not self._stopping:
            self._wake.clear()
            free = self.concurrency - len(self._inflight)
            claimed: list[DeliveryRow] = []
            if free > 0:
                try:
                    claimed = await self.store.claim_deliveries(self.worker_id, self.lock_seconds, free)
                except StorageUnavailable as exc:
                    log.warning("webhooks: cannot claim deliveries (%s); retrying", exc)
            for delivery in claimed:
                attempt = asyncio.create_task(self._attempt(delivery), name=f"webhook-{delivery.id}")
                self._inflight[delivery.id] = attempt
                attempt.add_done_callback(functools.partial(self._done, delivery.id))
            if claimed and len(self._inflight) < self.concurrency:
                continue  # more may be due
            if burst and not claimed:
                if not self._inflight:
                    return
                await asyncio.wait(list(self._inflight.values()), return_when=asyncio.FIRST_COMPLETED)
                continue
            await self._sleep()

    def _done(self, delivery_id: str, _: asyncio.Task[None]) -> None:
        self._inflight.pop(delivery_id, None)
        self._wake.set()

    async def _sleep(self) -> None:
        now = time.monotonic()
        while self._due and self._due[0] <= now:
            heapq.heappop(self._due)
        timeout = min(self.poll_seconds, self._due[0] - now) if self._due else self.poll_seconds
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(timeout, 0.0))

    async def stop(self, grace: float) -> None:
        """Stop claiming; give in-flight attempts ``grace`` seconds to finish, then unlock what is left."""
        self._stopping = True
        self._wake.set()
        if self._inflight:
            _, unfinished = await asyncio.wait(list(self._inflight.values()), timeout=grace)
            for attempt in unfinished:
                attempt.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
            if unfinished:
                try:
                    await self.store.release_deliveries(self.worker_id)
                except StorageUnavailable as exc:
                    log.warning("webhooks: could not release deliveries on shutdown (%s)", exc)
        await self._client.aclose()

    async def _attempt(self, delivery: DeliveryRow) -> None:
        attempted_at = utcnow()
        started = time.perf_counter()
        try:
            account = await self.store.account_by_id(delivery.account_id)
        except StorageUnavailable as exc:
            log.warning("webhook %s: cannot read the signing secret (%s); will retry", delivery.id, exc)
            return  # the lock expires and the delivery is claimed again
        try:
            result = await self.send(delivery, account.signing_secrets(attempted_at))
        except Exception as exc:
            log.exception("webhook %s: attempt failed unexpectedly", delivery.id)
            result = SendResult(None, f"internal error while sending: {type(exc).__name__}")
        self.attempts += 1
        duration_ms = (time.perf_counter() - started) * 1000
        number = delivery.attempt_count + 1
        decision = self.schedule.decide(number, result.status_code, result.retry_after)
        error = result.error
        next_at: dt.datetime | None = None
        if decision is None:
            outcome = "delivered"
        elif isinstance(decision, Retry):
            outcome = "pending"
            next_at = utcnow() + dt.timedelta(seconds=decision.delay)
            heapq.heappush(self._due, time.monotonic() + decision.delay)
        else:
            assert isinstance(decision, GiveUp)
            outcome = "failed"
            error = f"{error}; {decision.reason}" if error else decision.reason
        record = AttemptRecord(
            attempted_at=attempted_at,
            status_code=result.status_code,
            error=error,
            duration_ms=duration_ms,
            outcome=outcome,
            next_attempt_at=next_at,
        )
        metrics.webhook_attempt(outcome, result.status_code)
        if outcome != "delivered":
            log.info("webhook %s (task %s) attempt %d: %s", delivery.id, delivery.task_id, number, error)
        await self._record(delivery, record)

    async def _record(self, delivery: DeliveryRow, record: AttemptRecord) -> None:
        delay = 0.2
        for _ in range(6):
            try:
                if not await self.store.record_attempt(delivery.id, self.worker_id, record):
                    log.warning(
                        "webhook %s: lock lost during the attempt (another sender has it)", delivery.id
                    )
                return
            except StorageUnavailable as exc:
                log.warning("webhook %s: cannot record the attempt (%s); retrying", delivery.id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.error(
            "webhook %s: attempt not recorded; the delivery will be retried after its lock expires",
            delivery.id,
        )

    async def send(self, delivery: DeliveryRow, secrets: list[str]) -> SendResult:
        """One signed POST of the delivery's exact payload, under one overall deadline."""
        headers = webhook_headers(secrets, delivery.id, int(time.time()), delivery.payload)
        try:
            async with asyncio.timeout(self.timeout):
                request = self._client.build_request(
                    "POST", delivery.url, content=delivery.payload.encode(), headers=headers
                )
                response = await self._client.send(request, stream=True)
                try:
                    body = await _read_capped(response, MAX_RESPONSE_BYTES)
                finally:
                    await response.aclose()
        except TimeoutError:
            return SendResult(None, f"timed out after {self.timeout:g} s")
        except RefusedDestination as exc:
            return SendResult(None, f"refused: {exc}")
        except httpx.TimeoutException:
            return SendResult(None, f"timed out after {self.timeout:g} s")
        except httpx.HTTPError as exc:
            return SendResult(None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        code = response.status_code
        if 200 <= code < 300:
            return SendResult(code, None)
        if 300 <= code < 400:
            location = response.headers.get("location", "")
            text = f"HTTP {code}: redirects are not followed (Location: {location})"
            return SendResult(code, _excerpt(text))
        text = body.decode("utf-8", "replace")
        retry_after = parse_retry_after(response.headers.get("retry-after"), utcnow())
        return SendResult(code, _excerpt(f"HTTP {code}" + (f": {text}" if text.strip() else "")), retry_after)


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]
