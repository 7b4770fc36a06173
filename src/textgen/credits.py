"""Settlement: what a finished task is charged, given what was reserved for it.

A task reserves its worst-case cost when it is created. When it ends, the reservation is released and the
real cost charged. The real cost can exceed the reservation (the prompt estimate fell short); the excess is
charged only as far as the balance allows, so a balance never goes negative and ``charged`` is always what
was really taken.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Settlement:
    charged: int  # micro-credits the task costs, recorded as its credits_used
    returned: int  # micro-credits given back to the balance (negative: more was taken than reserved)


def settle(reserved: int, cost: int, balance: int) -> Settlement:
    """Settle a task: ``balance`` is the account's balance with the reservation still held.

    ``balance`` matters only when the cost exceeds the reservation.
    """
    cost = max(cost, 0)
    charged = min(cost, reserved + max(balance, 0))
    return Settlement(charged=charged, returned=reserved - charged)


def needs_balance(reserved: int, cost: int) -> bool:
    """Whether :func:`settle` needs the balance (the cost exceeds what was reserved)."""
    return cost > reserved
