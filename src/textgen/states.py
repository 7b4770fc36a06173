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


TERMINAL = (TaskStatus.DONE, TaskStatus.FAILED)
