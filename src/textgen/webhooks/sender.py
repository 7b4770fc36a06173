"""The delivery sender: claims due deliveries from the outbox and POSTs each, signed, to its receiver.

Attempts run concurrently up to a bound, each under one overall deadline, so a slow or dead receiver
holds one slot for at most the timeout and never the API or the other deliveries. The slots are shared: one
destination (scheme, host and port) holds at most a quarter of them and one account at most half, and claims
take every account's oldest due delivery before any account's next, so one account's dead receiver delays
nobody else's webhooks. A delivery is locked while its attempt is in flight (at most one per delivery); the
lock outlives the deadline, so a sender that dies mid-attempt leaves a delivery another sender retries once
the lock expires.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import logging
import os
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import aiohttp.helpers
import yarl
from standardwebhooks import Webhook

from textgen import __version__, metrics
from textgen.claimloop import ClaimLoop
from textgen.errors import ConfigurationError, StorageUnavailable
from textgen.retry_after import parse_retry_after
from textgen.settings import Settings
from textgen.states import DeliveryStatus
from textgen.storage.accounts import AccountStore
from textgen.storage.outbox import Offer, Outbox
from textgen.storage.retrying import retrying
from textgen.storage.rows import AccountRow, AttemptRecord, DeliveryRow, utcnow
from textgen.webhooks.addresses import AddressPolicy, GuardedResolver, RefusedDestination
from textgen.webhooks.retry import GiveUp, Retry, RetrySchedule

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


def guarded_session(
    policy: AddressPolicy, concurrency: int, ssl_context: ssl.SSLContext | None = None
) -> aiohttp.ClientSession:
    """An HTTP session that connects only where ``policy`` allows (its resolver; no DNS cache), ignores
    proxies; redirects are refused per request. aiohttp, like the Gemini client: httpx cost several times its
    CPU per request at this concurrency (docs/benchmarks.md)."""
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(policy),
        use_dns_cache=False,
        limit=concurrency * 2,
        keepalive_timeout=5.0,
        ssl=ssl_context if ssl_context is not None else True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),  # each attempt runs under its own deadline
    )


def destination(url: str) -> str:
    """Where a delivery goes, as far as sharing the slots is concerned: its scheme, host and port."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return parts.netloc.lower()
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


@dataclass(frozen=True, slots=True)
class FairShare:
    """How many attempts one destination, and one account, may have in flight in a sender of ``slots``."""

    per_destination: int
    per_account: int

    @classmethod
    def of(cls, slots: int) -> FairShare:
        return cls(per_destination=max(1, slots // 4), per_account=max(1, slots // 2))

    def choose(
        self, offers: list[Offer], room: int, accounts: Counter[int], destinations: Counter[str]
    ) -> list[str]:
        """The offers to take, in their order, passing over those whose destination or account already has
        its share in flight (``accounts`` and ``destinations`` count the attempts in flight now)."""
        accounts, destinations = Counter(accounts), Counter(destinations)
        taken: list[str] = []
        for offer in offers:
            if len(taken) == room:
                break
            where = destination(offer.url)
            if accounts[offer.account_id] >= self.per_account or destinations[where] >= self.per_destination:
                continue
            accounts[offer.account_id] += 1
            destinations[where] += 1
            taken.append(offer.id)
        return taken


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_EXCERPT else text[: _ERROR_EXCERPT - 1] + "…"


class WebhookSender(ClaimLoop[DeliveryRow]):
    def __init__(
        self,
        outbox: Outbox,
        accounts: AccountStore,
        *,
        worker_id: str,
        policy: AddressPolicy,
        schedule: RetrySchedule,
        timeout: float,
        concurrency: int,
        poll_seconds: float,
        wake: asyncio.Event,
        ssl_context: ssl.SSLContext | None = None,
        claim_interval: float = 0.0,
    ) -> None:
        super().__init__(
            name="webhook",
            capacity=concurrency,
            poll_seconds=poll_seconds,
            wake=wake,
            log=log,
            claim_interval=claim_interval,
        )
        self.outbox = outbox
        self.accounts = accounts
        self.worker_id = worker_id
        self.policy = policy
        self.schedule = schedule
        self.timeout = timeout
        self.lock_seconds = timeout + _LOCK_MARGIN_SECONDS
        self._session: aiohttp.ClientSession | None = None  # made in the running loop, on first use
        self._ssl_context = ssl_context
        self._due: list[float] = []  # monotonic times of retries this sender scheduled
        self.attempts = 0
        self.share = FairShare.of(concurrency)
        self._busy: dict[str, tuple[int, str]] = {}  # in flight: delivery id -> (account, destination)
        self._signers: dict[str, AccountRow] = {}  # claimed: delivery id -> its account, read with the batch

    @property
    def concurrency(self) -> int:
        return self.capacity

    @classmethod
    def from_settings(
        cls,
        outbox: Outbox,
        accounts: AccountStore,
        settings: Settings,
        *,
        worker_id: str,
        policy: AddressPolicy,
        wake: asyncio.Event,
    ) -> WebhookSender:
        try:
            schedule = RetrySchedule.parse(settings.webhook_schedule, settings.webhook_jitter)
        except ValueError as exc:
            raise ConfigurationError(f"invalid configuration: TEXTGEN_WEBHOOK_SCHEDULE: {exc}") from exc
        return cls(
            outbox,
            accounts,
            worker_id=worker_id,
            policy=policy,
            schedule=schedule,
            timeout=settings.webhook_timeout_seconds,
            concurrency=settings.webhook_concurrency,
            poll_seconds=settings.webhook_poll_seconds,
            wake=wake,
            claim_interval=settings.claim_interval_seconds,
        )

    async def claim(self, room: int) -> list[DeliveryRow]:
        accounts = Counter(account for account, _ in self._busy.values())
        destinations = Counter(where for _, where in self._busy.values())
        counted = {"offers": 0, "taken": 0}

        def choose(offers: list[Offer]) -> list[str]:
            taken = self.share.choose(offers, room, accounts, destinations)
            counted.update(offers=len(offers), taken=len(taken))
            return taken

        claimed = await self.outbox.claim(self.worker_id, self.lock_seconds, room, choose=choose)
        # Drained: every due delivery offered was taken (none passed over for its share) and room is left.
        self.drained = counted["offers"] == counted["taken"] == len(claimed) < room
        for delivery in claimed:
            self._busy[delivery.id] = (delivery.account_id, destination(delivery.url))
        # The signing secrets of every account in the batch, read once for the batch (read again per attempt
        # if this fails: the attempt then says why it could not sign).
        try:
            signers = await self.accounts.accounts_by_id({delivery.account_id for delivery in claimed})
        except StorageUnavailable:
            signers = {}
        for delivery in claimed:
            if delivery.account_id in signers:
                self._signers[delivery.id] = signers[delivery.account_id]
        return claimed

    def key(self, item: DeliveryRow) -> str:
        return item.id

    async def handle(self, item: DeliveryRow) -> None:
        try:
            await self._attempt(item)
        finally:
            self._busy.pop(item.id, None)
            self._signers.pop(item.id, None)

    async def give_back(self, keys: list[str]) -> None:
        try:
            await self.outbox.release(self.worker_id, keys)
        except StorageUnavailable as exc:
            log.warning("webhooks: could not release deliveries on shutdown (%s)", exc)

    def poll_timeout(self) -> float:
        now = time.monotonic()
        while self._due and self._due[0] <= now:
            heapq.heappop(self._due)
        return min(self.poll_seconds, self._due[0] - now) if self._due else self.poll_seconds

    async def stop(self, grace_seconds: float) -> None:
        """Stop claiming; give in-flight attempts ``grace`` seconds to finish, then unlock what is left."""
        await super().stop(grace_seconds)
        if self._session is not None:
            await self._session.close()

    async def _attempt(self, delivery: DeliveryRow) -> None:
        attempted_at = utcnow()
        started = time.perf_counter()
        try:
            account = self._signers.pop(delivery.id, None) or await self.accounts.account_by_id(
                delivery.account_id
            )
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
            outcome = DeliveryStatus.DELIVERED
        elif isinstance(decision, Retry):
            outcome = DeliveryStatus.PENDING
            next_at = utcnow() + dt.timedelta(seconds=decision.delay)
            heapq.heappush(self._due, time.monotonic() + decision.delay)
        else:
            assert isinstance(decision, GiveUp)
            outcome = DeliveryStatus.FAILED
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
        if outcome != DeliveryStatus.DELIVERED:
            log.info("webhook %s (task %s) attempt %d: %s", delivery.id, delivery.task_id, number, error)
        await self._record(delivery, record)

    async def _record(self, delivery: DeliveryRow, record: AttemptRecord) -> None:
        def retry(exc: StorageUnavailable, _attempt: int) -> None:
            log.warning("webhook %s: cannot record the attempt (%s); retrying", delivery.id, exc)

        try:
            held = await retrying(
                lambda: self.outbox.record_attempt(delivery.id, self.worker_id, record),
                attempts=6,
                on_retry=retry,
            )
        except StorageUnavailable:
            log.error(
                "webhook %s: attempt not recorded; the delivery will be retried after its lock expires",
                delivery.id,
            )
            return
        if not held:
            log.warning("webhook %s: lock lost during the attempt (another sender has it)", delivery.id)

    async def send(self, delivery: DeliveryRow, secrets: list[str]) -> SendResult:
        """One signed POST of the delivery's exact payload, under one overall deadline."""
        headers = webhook_headers(secrets, delivery.id, int(time.time()), delivery.payload)
        if self._session is None:
            self._session = guarded_session(self.policy, self.concurrency, self._ssl_context)
        try:
            async with asyncio.timeout(self.timeout):
                # aiohttp connects to the URL's host as yarl reads it (IDNA applied: full-width digits become
                # an IPv4 address) and asks no resolver about an IP address: those are checked here.
                url = yarl.URL(delivery.url)
                host = url.raw_host or ""
                if aiohttp.helpers.is_ip_address(host):
                    await self.policy.resolve(host, url.port if url.port is not None else 0)
                async with self._session.post(
                    delivery.url, data=delivery.payload.encode(), headers=headers, allow_redirects=False
                ) as response:
                    body = await _read_capped(response, MAX_RESPONSE_BYTES)
        except TimeoutError:
            return SendResult(None, f"timed out after {self.timeout:g} s")
        except RefusedDestination as exc:
            return SendResult(None, f"refused: {exc}")
        except (aiohttp.ClientError, ValueError) as exc:
            return SendResult(None, _describe(exc))
        code = response.status
        if 200 <= code < 300:
            return SendResult(code, None)
        if 300 <= code < 400:
            location = response.headers.get("location", "")
            text = f"HTTP {code}: redirects are not followed (Location: {location})"
            return SendResult(code, _excerpt(text))
        text = body.decode("utf-8", "replace")
        retry_after = parse_retry_after(response.headers.get("retry-after"), utcnow())
        return SendResult(code, _excerpt(f"HTTP {code}" + (f": {text}" if text.strip() else "")), retry_after)


def _describe(exc: Exception) -> str:
    """A failed attempt as its account reads it: what failed, never the address this server's DNS gave for a
    name (aiohttp's connection errors quote it)."""
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLSError: the receiver's TLS handshake or certificate was refused"
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        return f"ConnectError: {os.strerror(errno) if errno else type(exc.os_error).__name__}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit and (chunk := await response.content.readany()):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:limit]
