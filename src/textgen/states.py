"""The domain's states, shared by storage, the services and the API schemas."""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (TaskStatus.DONE, TaskStatus.FAILED)


class TaskMode(StrEnum):
    ASYNC = "async"
    SYNC = "sync"
    STREAM = "stream"


class DeliveryStatus(StrEnum):
    """A webhook delivery's state: retried while pending, then delivered or given up (failed)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Cancellation(StrEnum):
    """What a request to cancel a task did."""

    CANCELLED = "cancelled"  # nobody was running it: it has ended
    REQUESTED = "requested"  # a process runs it and has been asked to stop
    FINISHED = "finished"  # it had already finished: nothing changed


CANCELLED_REASON = "cancelled"

TERMINAL = (TaskStatus.DONE, TaskStatus.FAILED)
