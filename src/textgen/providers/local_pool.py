"""A fair pool of model instances: requests wait per account and are served round-robin.

Each account waits in its own FIFO; when an instance frees up, the account at the head of the rotation
gets it and moves to the back, so one busy account cannot starve the others.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Instance(Protocol):
    @property
    def cached(self) -> str:
        """The text whose KV cache the instance holds."""
        ...

    @property
    def index(self) -> int: ...


E = TypeVar("E", bound=Instance)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(slots=True)
class _Waiter(Generic[E]):
    account: str
    prompt: str
    future: asyncio.Future[E]


class FairPool(Generic[E]):
    """Free instances and the requests waiting for one, served round-robin across accounts.

    Each account waits in its own FIFO; when an instance frees up, the account at the head of the rotation
    gets it and moves to the back. The request gets the free instance whose cached text shares the longest
    prefix with its prompt, so a conversation returns to the instance that holds its KV cache.
    """

    def __init__(self) -> None:
        self.free: list[E] = []
        self.waiting: OrderedDict[str, deque[_Waiter[E]]] = OrderedDict()

    def _best(self, prompt: str) -> E:
        engine = max(self.free, key=lambda e: (_common_prefix(e.cached, prompt), -e.index))
        self.free.remove(engine)
        return engine

    async def acquire(self, account: str, prompt: str) -> E:
        if self.free and not self.waiting:
            return self._best(prompt)
        waiter = _Waiter[E](account, prompt, asyncio.get_running_loop().create_future())
        self.waiting.setdefault(account, deque()).append(waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            queue = self.waiting.get(account)
            if queue is not None and waiter in queue:
                queue.remove(waiter)
                if not queue:
                    del self.waiting[account]
            elif waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())
            raise

    def release(self, engine: E) -> None:
        self.free.append(engine)
        while self.free and self.waiting:
            account, queue = next(iter(self.waiting.items()))
            waiter = queue.popleft()
            if queue:
                self.waiting.move_to_end(account)
            else:
                del self.waiting[account]
            waiter.future.set_result(self._best(waiter.prompt))

    def queued(self) -> dict[str, int]:
        return {account: len(queue) for account, queue in self.waiting.items()}
