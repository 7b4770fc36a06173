"""Settlement as a pure function of (reserved, cost)."""

from __future__ import annotations

import pytest

from textgen.credits import Settlement, settle


@pytest.mark.parametrize(
    ("reserved", "cost", "charged"),
    [
        (4000, 1500, 1500),  # under the reservation: the rest goes back
        (4000, 4000, 4000),  # exactly the reservation
        (4000, 0, 0),  # a failure before the first token releases everything
        (4000, -5, 0),  # a negative cost is never a credit
        (1000, 1001, 1000),  # one past the reservation: never more than was reserved
        (1000, 10**9, 1000),
        (0, 500, 0),  # nothing reserved, nothing charged
    ],
)
def test_settle_charges_the_cost_never_more_than_the_reservation(
    reserved: int, cost: int, charged: int
) -> None:
    result = settle(reserved, cost)
    assert result == Settlement(charged=charged, returned=reserved - charged)
    assert 0 <= result.charged <= reserved
