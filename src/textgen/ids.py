"""Random identifiers (task, delivery and request ids) from the operating system's random source, read in
blocks: one ``getrandom`` call per 256 ids instead of one per id. On the event loop a call that releases the
GIL lets the database thread take it for up to a switch interval, so a per-request system call costs far more
than its own time under load."""

from __future__ import annotations

import os
import threading
import uuid

_BLOCK = 4096


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._offset = 0

    def take(self, size: int) -> bytes:
        assert size <= _BLOCK
        with self._lock:
            if self._offset + size > len(self._buffer):
                self._buffer, self._offset = os.urandom(_BLOCK), 0
            start = self._offset
            self._offset = start + size
            return self._buffer[start : start + size]

    def forget(self) -> None:
        """A forked child must not hand out the bytes its parent will hand out too."""
        self._buffer, self._offset = b"", 0
        self._lock = threading.Lock()


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.forget)


def random_uuid() -> uuid.UUID:
    """A version 4 UUID, as ``uuid.uuid4()`` makes."""
    return uuid.UUID(bytes=_pool.take(16), version=4)


def random_hex(nbytes: int) -> str:
    return _pool.take(nbytes).hex()
