"""How many generations each provider runs at once in this process, and how many it runs now.

Every generation holds a slot of its provider while it runs, whatever its mode: a sync request or a stream
takes one when it starts (and is never refused for want of one: its client is waiting), the worker takes
one for each task it claims, and claims only as many tasks as a provider has free slots. A burst of tasks
for one provider therefore never holds back another's, and a process never leases work it cannot start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class Slot:
    """One provider slot held by one generation; giving it back twice is harmless."""

    __slots__ = ("_capacity", "_held", "provider")

    def __init__(self, capacity: Capacity, provider: str) -> None:
        self._capacity = capacity
        self.provider = provider
        self._held = True

    def give_back(self) -> None:
        if self._held:
            self._held = False
            self._capacity._free(self.provider)


class Capacity:
    def __init__(self, limits: dict[str, int], on_free: Callable[[], object] | None = None) -> None:
        self.limits = dict(limits)
        self.in_use = dict.fromkeys(limits, 0)
        self._on_free = on_free
        # Set by the worker when a provider had no room for it: the next freed slot wakes it.
        self.wanted = False

    def room(self, provider: str) -> int:
        """Free slots of ``provider`` (0 when it runs as much as it can, or more)."""
        return max(self.limits.get(provider, 0) - self.in_use.get(provider, 0), 0)

    def providers(self) -> Iterable[str]:
        return self.limits.keys()

    def take(self, provider: str) -> Slot:
        """Hold a slot of ``provider``, even past its limit (the caller decided this generation runs)."""
        self.in_use[provider] = self.in_use.get(provider, 0) + 1
        return Slot(self, provider)

    def _free(self, provider: str) -> None:
        self.in_use[provider] -= 1
        if self.wanted and self._on_free is not None:
            self.wanted = False
            self._on_free()
