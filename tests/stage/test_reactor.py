"""The stage loop's reactor (pipeline/reactor.py): descriptors and timers on a clock the test
moves; and the loop serving both beside its ZeroMQ sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from pipeline.loop import BaseStage
from pipeline.reactor import READ, Reactor
from tests.support.stagekit import StageThread, stage_settings
from tests.support.wait import wait_for


class SteppedClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_timers_run_in_order_when_due_on_the_given_clock_and_cancelled_ones_never():
    clock = SteppedClock()
    reactor = Reactor(clock)
    ran = []
    reactor.after(2.0, lambda: ran.append("late"))
    reactor.after(1.0, lambda: ran.append("early"))
    reactor.after(0.5, lambda: ran.append("cancelled")).cancel()
    assert reactor.next_due_in() == 1.0           # the cancelled one does not count
    reactor.run_due()
    assert ran == []
    clock.now += 1.0
    reactor.run_due()
    assert ran == ["early"] and reactor.next_due_in() == 1.0
    clock.now += 5.0
    assert reactor.next_due_in() == 0.0           # overdue: the loop does not sleep
    reactor.run_due()
    assert ran == ["early", "late"] and reactor.next_due_in() is None
    reactor.close()


def test_a_ready_descriptor_is_called_back_with_its_mask_and_an_idle_one_is_not():
    reactor = Reactor()
    left, right = socket.socketpair()
    seen = []
    reactor.register(left, READ, seen.append)
    try:
        reactor.run_ready()
        assert seen == []
        right.send(b"x")
        reactor.run_ready()
        assert seen == [READ]
        reactor.unregister(left)
        reactor.run_ready()
        assert seen == [READ]
    finally:
        reactor.close()
        left.close()
        right.close()


class TimerStage(BaseStage):
    """Arms a timer on the stage's clock and watches an eventfd, both through io.reactor."""

    name = "enrich"

    def __init__(self, clock: SteppedClock) -> None:
        self.monotonic = clock
        self.fired: list[str] = []
        self.fd = os.eventfd(0, os.EFD_NONBLOCK)

    def setup(self, io) -> None:
        self.io = io
        io.reactor.after(60.0, lambda: self.fired.append("timer"))
        io.watch_fd(self.fd, self._readable)
        io.ready = True

    def _readable(self) -> None:
        os.eventfd_read(self.fd)
        self.fired.append("fd")

    def handle(self, inbox, kind, records) -> None:
        pass

    def teardown(self) -> None:
        os.close(self.fd)


def test_the_loop_serves_the_reactor_on_the_stage_clock(tmp_path):
    clock = SteppedClock()
    stage = TimerStage(clock)
    thread = StageThread(stage, stage_settings(tmp_path)).start()
    try:
        os.eventfd_write(stage.fd, 1)
        wait_for(lambda: stage.fired == ["fd"], "the eventfd served")
        clock.now += 60.0   # a minute passes on the stage's clock, none on the wall's
        wait_for(lambda: stage.fired == ["fd", "timer"], "the timer run")
    finally:
        assert thread.finish() == 0


FROZEN_PROBE = """
import gc, sys
from pathlib import Path
from pipeline.loop import BaseStage, run_stage
from tests.support.stagekit import stage_settings

class Probe(BaseStage):
    name = "probe"
    def setup(self, io):
        self.built = [[n] for n in range(1000)]  # what a stage builds at start
        self.stop = io.stop
        io.ready = True
    def tick(self, now):
        print(gc.get_freeze_count() >= len(self.built))
        self.stop.set()

sys.exit(run_stage(Probe(), stage_settings(Path(sys.argv[1]))))
"""


def test_what_a_stage_builds_at_start_is_out_of_the_collectors_passes(tmp_path):
    result = subprocess.run([sys.executable, "-c", FROZEN_PROBE, str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "True"
