"""Settlement as a pure function of (reserved, cost, balance)."""

from __future__ import annotations

import pytest

from textgen.credits import Settlement, needs_balance, settle


@pytest.mark.parametrize(
    ("reserved", "cost", "balance", "charged"),
    [
        (4000, 1500, 0, 1500),  # under the reservation: the rest goes back
        (4000, 4000, 0, 4000),  # exactly the reservation
        (4000, 0, 100, 0),  # a failure releases everything
        (4000, -5, 100, 0),  # a negative cost is never a credit
        (1000, 1500, 10_000, 1500),  # above it: the excess is charged from the balance
        (1000, 1500, 200, 1200),  # ... only as far as the balance allows
        (1000, 1500, 0, 1000),  # an empty balance: the reservation is all there is
        (1000, 1500, -50, 1000),  # a balance is never taken below zero
    ],
)
def test_settle_charges_the_cost_within_the_reservation_and_the_balance(
    reserved: int, cost: int, balance: int, charged: int
) -> None:
    result = settle(reserved, cost, balance)
    assert result == Settlement(charged=charged, returned=reserved - charged)
    assert 0 <= result.charged <= reserved + max(balance, 0)


def test_the_balance_is_needed_only_when_the_cost_exceeds_the_reservation() -> None:
    assert not needs_balance(1000, 1000)
    assert needs_balance(1000, 1001)
    # Whatever balance is passed when it is not needed, the result is the same.
    assert settle(1000, 999, 0) == settle(1000, 999, 10**9)
