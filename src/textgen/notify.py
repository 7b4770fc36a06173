"""Waking the worker and the webhook sender when work is queued, in this process and (PostgreSQL) in others.

Whoever queues work decides whom to wake (``Wakeups``): this process's own worker or sender through an
event, other processes through ``pg_notify``, which storage issues inside the transaction that queues the
work when asked to (delivered only on commit). A ``Listener`` on its own asyncpg connection wakes this
process's worker or webhook sender at once. Polling stays the
fallback: a notification lost while the listener reconnects only costs one poll interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

log = logging.getLogger("textgen.notify")

TASKS_CHANNEL = "textgen_tasks"
DELIVERIES_CHANNEL = "textgen_deliveries"
CANCEL_CHANNEL = "textgen_cancel"  # the payload is the id of a task to stop
APPLICATION_NAME = "textgen-listener"  # how the listener shows in pg_stat_activity

Wake = Callable[[], None]


class Wakeups:
    """Whom to wake when a task or a webhook delivery is queued.

    ``tasks`` and ``deliveries`` are the events this process's worker and webhook sender wait on. On
    PostgreSQL a queued task also NOTIFYs other processes' workers; a queued delivery NOTIFYs other
    processes' senders only while no sender runs here (one that does is woken in-process, and the senders
    elsewhere find what it cannot take at once by polling).
    """

    def __init__(self, *, postgres: bool) -> None:
        self.postgres = postgres
        self.tasks = asyncio.Event()
        self.deliveries = asyncio.Event()
        self._local_senders = 0
        # The providers whose tasks were queued since the worker last looked ("" for any provider).
        self._task_hints: set[str] = set()

    def sender_started(self) -> None:
        self._local_senders += 1

    def sender_stopped(self) -> None:
        self._local_senders = max(self._local_senders - 1, 0)

    @property
    def notify_tasks(self) -> bool:
        """Whether a transaction that queues a task should NOTIFY other processes."""
        return self.postgres

    @property
    def notify_deliveries(self) -> bool:
        """Whether a transaction that queues a delivery should NOTIFY other processes."""
        return self.postgres and self._local_senders == 0

    def task_queued(self, provider: str = "") -> None:
        """Wake the worker: a task of ``provider`` (of any provider when empty) may be claimable."""
        self._task_hints.add(provider)
        self.tasks.set()

    def take_task_hints(self) -> set[str]:
        """The providers named by wake-ups since the last call ("" stands for any)."""
        hints, self._task_hints = self._task_hints, set()
        return hints

    def delivery_queued(self) -> None:
        self.deliveries.set()


def asyncpg_dsn(database_url: str) -> str:
    """The plain libpq URL asyncpg connects with, from a ``postgresql+asyncpg://`` URL."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class Listener:
    """Holds one dedicated connection that LISTENs on a few channels; reconnects when it drops."""

    def __init__(
        self,
        dsn: str,
        channels: Mapping[str, Sequence[Wake]],
        *,
        receivers: Mapping[str, Callable[[str], None]] | None = None,
        retry_seconds: float = 1.0,
    ) -> None:
        """``channels`` wake without a payload; each of ``receivers`` is handed its channel's payload instead
        (and ``channels`` wake alone when the connection is made again, as notifications may have been lost)."""
        self._dsn = dsn
        self._channels = {name: list(wakes) for name, wakes in channels.items()}
        self._receivers = dict(receivers or {})
        self._retry_seconds = retry_seconds
        self.connected = asyncio.Event()
        self.received = 0

    def _wake_all(self) -> None:
        for wakes in self._channels.values():
            for wake in wakes:
                wake()

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        self.received += 1
        receiver = self._receivers.get(channel)
        if receiver is not None:
            receiver(payload)
            return
        for wake in self._channels.get(channel, ()):
            wake()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting after a lost connection."""
        while True:
            try:
                await self._listen_once()
            except Exception as exc:  # whatever broke the connection, keep trying: polling covers the gap
                log.warning("notifications: listener connection failed (%s); polling meanwhile", exc)
            await asyncio.sleep(self._retry_seconds)

    async def _listen_once(self) -> None:
        lost = asyncio.Event()
        conn: Any = await asyncpg.connect(
            self._dsn, timeout=10, server_settings={"application_name": APPLICATION_NAME}
        )
        try:
            conn.add_termination_listener(lambda _c: lost.set())
            for channel in dict.fromkeys([*self._channels, *self._receivers]):
                await conn.add_listener(channel, self._on_notify)
            self.connected.set()
            # Work queued while no one listened would otherwise wait for the next poll.
            self._wake_all()
            while not lost.is_set():
                # asyncpg notices a dead connection only when it uses it: a cheap query every few seconds.
                try:
                    await asyncio.wait_for(lost.wait(), 5)
                except TimeoutError:
                    await conn.execute("SELECT 1", timeout=5)
        finally:
            self.connected.clear()
            if not conn.is_closed():
                conn.terminate()
