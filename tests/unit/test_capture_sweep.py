"""capture's sweep decision (which quiet flows get their tail reported), on times passed in."""

from __future__ import annotations

import pytest

from pipeline.events import FLAG_MID_STREAM
from pipeline.kernel.loader import AGG_WINDOW_NS, MIDSTREAM_WINDOW_NS
from pipeline.stages.capture import tail_due

LAST = 5_000_000_000


@pytest.mark.parametrize("flags, quiet_ns, due", [
    (0, 0, False),
    (0, AGG_WINDOW_NS - 1, False),
    (0, AGG_WINDOW_NS, True),
    (FLAG_MID_STREAM, AGG_WINDOW_NS, False),        # a mid-stream denial waits longer
    (FLAG_MID_STREAM, MIDSTREAM_WINDOW_NS - 1, False),
    (FLAG_MID_STREAM, MIDSTREAM_WINDOW_NS, True),
    (0, -1, False),                                 # emitted after the sweep read its clock
])
def test_a_flow_tail_is_due_once_the_flow_was_quiet_for_its_window(flags, quiet_ns, due):
    assert tail_due(flags, LAST, LAST + quiet_ns) is due
