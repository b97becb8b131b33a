"""When a stopping stage has taken all its upstream stages will send (pipeline/stopping.py)."""

import pytest

from pipeline.stopping import QUIET_S, Upstream, inputs_ended, upstream_state
from pipeline.topology import upstreams


@pytest.mark.parametrize("ready, stopping, ended, state", [
    (None, None, None, Upstream.GONE),        # never started, or gone after its lingering
    (None, 41, 41, Upstream.GONE),            # a stale stopping marker names no live run
    (41, None, None, Upstream.RUNNING),       # not stopping (this stage stops alone)
    (41, 41, None, Upstream.STOPPING),        # its last records are on their way
    (41, 41, 41, Upstream.ENDED),
    (41, None, 41, Upstream.ENDED),           # its feed end came before its marker was seen
    (42, 42, 41, Upstream.STOPPING),          # a feed end of an earlier run vouches for none
])
def test_an_upstreams_state_comes_from_its_markers_and_its_feed_end(ready, stopping, ended,
                                                                   state):
    assert upstream_state(ready, stopping, ended) is state


def test_no_end_while_an_upstream_owes_its_feed_end_however_quiet():
    assert not inputs_ended([Upstream.ENDED, Upstream.STOPPING], quiet_s=60)


def test_every_upstream_ended_or_none_at_all_ends_at_once():
    assert inputs_ended([Upstream.ENDED, Upstream.ENDED], quiet_s=0)
    assert inputs_ended([], quiet_s=0)


@pytest.mark.parametrize("other", [Upstream.RUNNING, Upstream.GONE])
def test_an_upstream_that_sends_no_feed_end_is_waited_for_only_until_a_quiet_moment(other):
    """A gone stage may have left messages in the inbox: they are taken first."""
    assert not inputs_ended([Upstream.ENDED, other], quiet_s=QUIET_S / 2)
    assert inputs_ended([Upstream.ENDED, other], quiet_s=QUIET_S)


def test_each_stage_waits_for_the_stages_that_feed_its_event_inboxes():
    assert upstreams("capture") == ()
    assert upstreams("enrich") == ("capture", "dns")
    assert upstreams("policy") == ("enrich",)  # dns's allow requests are not a feed
    assert set(upstreams("persist")) == {"policy", "notify", "dns"}
