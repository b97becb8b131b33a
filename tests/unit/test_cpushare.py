"""The DNS proxy's real-time share of one CPU (pipeline/cpushare.py): table-driven."""

import pytest

from pipeline.cpushare import RealtimeShare

# (seconds since the first look, the thread's CPU seconds in all, allowed, renews in)
STEPS = [
    (0.00, 5.000, True, 0.10),   # the first look opens a window: its CPU so far is not counted
    (0.05, 5.020, True, 0.05),   # 20 ms of a 25 ms share
    (0.06, 5.025, False, 0.04),  # the share is spent
    (0.09, 5.030, False, 0.01),  # and stays spent to the window's end
    (0.10, 5.031, True, 0.10),   # a new window: whole again
    (0.15, 5.040, True, 0.05),
    (0.42, 5.200, True, 0.10),   # a quiet spell: the window opens at this look
    (0.43, 5.240, False, 0.09),
]


def test_the_share_is_spent_within_a_window_and_renewed_with_the_next():
    share = RealtimeShare(0.25, 0.1)
    for now, cpu, allowed, renews in STEPS:
        assert share.allows(now, cpu) is allowed, (now, cpu)
        assert share.renews_in(now) == pytest.approx(renews), (now, cpu)


def test_before_its_first_look_the_share_is_whole():
    assert RealtimeShare(0.25, 0.1).renews_in(3.0) == 0.0


@pytest.mark.parametrize("share, window", [(0, 0.1), (1, 0.1), (1.5, 0.1), (0.25, 0)])
def test_a_share_outside_zero_to_one_or_an_empty_window_is_refused(share, window):
    with pytest.raises(ValueError, match="real-time share"):
        RealtimeShare(share, window)
