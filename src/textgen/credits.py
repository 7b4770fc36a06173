"""Settlement: what a finished task is charged, given what was reserved for it.

A task reserves its worst-case cost when it is created. When it ends, the reservation is released and the
real cost charged, never more than the reservation: the reservation is the most a request can cost, so a
balance never goes negative and ``charged`` is always what was really taken.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Settlement:
    charged: int  # micro-credits the task costs, recorded as its credits_used
    returned: int  # micro-credits given back to the balance


def settle(reserved: int, cost: int) -> Settlement:
    """Settle a task that reserved ``reserved`` and cost ``cost`` (both in micro-credits)."""
    charged = min(max(cost, 0), max(reserved, 0))
    return Settlement(charged=charged, returned=reserved - charged)
