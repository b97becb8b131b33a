"""A flood of events never holds back a DNS answer: in the policy stage's own loop (allow
requests are served between event batches) and across processes (the bulk stages step back
on the CPU, the answer path steps forward)."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import zmq

from pipeline import messages
from pipeline.events import AllowRequest, RawEvent
from pipeline.loop import answer_context
from pipeline.rulemaps import ALLOW, DictRuleMaps
from pipeline.stages.policy import PolicyStage
from pipeline.topology import STAGES, inbox_address
from tests.support.stagekit import StageThread, stage_settings
from tests.support.wait import wait_for

T0 = 1_764_000_000_000_000_000
BATCH = 512
BATCHES = 100
POLICY = {"defaultAction": "deny", "rules": [
    {"type": "hostname", "value": "allowed.test", "action": "allow",
     "ports": [{"port": 443, "protocol": "tcp"}]}]}


def write_policy(tmp_path: Path) -> str:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    return str(path)


class OrderedPolicy(PolicyStage):
    """The policy stage, noting how many events it had handled when it answered."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.handled = 0
        self.replied_after: int | None = None

    def handle(self, inbox: str, kind: str, records: list) -> None:
        super().handle(inbox, kind, records)
        self.handled += len(records)

    def reply(self, inbox: str, kind: str, records: list) -> bytes:
        self.replied_after = self.handled
        return super().reply(inbox, kind, records)


def test_an_allow_request_is_answered_before_an_event_backlog_is_worked_off(tmp_path, peer):
    """51,200 blocked events wait at policy; an allow request sent once policy has begun on
    them is answered (maps written first) within a few batches, long before the backlog ends.
    Counted in events handled, not in time."""
    maps = DictRuleMaps()
    settings = stage_settings(tmp_path, SLUICE_POLICY=write_policy(tmp_path),
                              SLUICE_MODE="enforce", SLUICE_ALLOW_EXISTING_CONNECTIONS="false")
    persist = peer.ctx.socket(zmq.PULL)  # takes every audit record: the audit path never fills
    persist.setsockopt(zmq.RCVHWM, 0)
    persist.setsockopt(zmq.LINGER, 0)
    persist.bind(inbox_address(settings.run_dir, "persist"))
    peer.sockets.append(persist)
    stage = OrderedPolicy(open_maps=lambda s: maps)
    running = StageThread(stage, settings).start()
    push = peer.pusher("policy")
    for batch in range(BATCHES):
        push.send(messages.encode([messages.REGISTRY["enriched_events"].from_raw(RawEvent(
            4, False, 6, 0, "10.0.0.2", f"10.204.{batch}.{n % 250 + 1}", 40000, 1000 + n, T0,
            77, "curl", 1, "", 0, "")) for n in range(BATCH)]))
    request = peer.ctx.socket(zmq.REQ)
    request.setsockopt(zmq.LINGER, 0)
    peer.sockets.append(request)
    request.connect(inbox_address(settings.run_dir, "policy-allow"))
    try:
        wait_for(lambda: stage.handled > 0, "policy at work on the backlog")
        handled_when_asked = stage.handled
        request.send(messages.encode([AllowRequest("r1", "www.allowed.test", ["192.0.2.7"], 60,
                                                   [], T0)]))
        assert request.poll(30_000), "no answer to the allow request"
        [reply] = messages.decode(request.recv())[1]
        assert (reply.request_id, reply.ok) == ("r1", True)
        assert maps.verdict("192.0.2.7", 443, 6) == ALLOW
        assert stage.replied_after is not None
        assert stage.replied_after < BATCHES * BATCH, "answered only after the whole backlog"
        # Requests are served between batches (and every few dozen events inside one): the
        # batch in hand when the request arrived, and the few its trip between threads takes.
        assert stage.replied_after - handled_when_asked <= 8 * BATCH, (
            f"{stage.replied_after - handled_when_asked} events handled before the answer")
        wait_for(lambda: stage.handled == BATCHES * BATCH, "the whole backlog", timeout=60)
    finally:
        assert running.finish() == 0


def nice_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def autogroup_nice_of(pid: int) -> int | None:
    """The nice value of the process's session autogroup; None without autogroups."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split("nice")[1])
    except OSError:
        return None


def realtime_threads(pid: int) -> list[str]:
    """The names of the process's threads under a real-time policy (SCHED_FIFO or SCHED_RR)."""
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        if int(fields[38]) in (os.SCHED_FIFO, os.SCHED_RR):  # field 41 of proc(5): policy
            names.append((task / "comm").read_text().strip())
    return sorted(names)


def stepped(own: int, step: int) -> int:
    """The nice value a stage started at own ends at; raising needs root (CAP_SYS_NICE)."""
    if step < 0 and os.geteuid() != 0:
        return own
    return max(-20, min(19, own + step))


def test_the_answer_path_steps_forward_on_the_cpu_and_bulk_work_stays_as_started(tmp_path):
    """policy (it answers the DNS proxy) and notify (bulk work) as real processes, each
    leading its own session as honcho starts them: each moves by its topology's cpu_step,
    its session's autogroup with it. In policy, the socket thread of its request/reply
    inbox runs real-time (as root); no other thread of either stage does."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert STAGES["policy"].cpu_step < 0 == STAGES["notify"].cpu_step
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")},
           "SLUICE_RUN_DIR": str(tmp_path / "run"), "SLUICE_HOST": "test-host",
           "SLUICE_DB": f"sqlite:///{tmp_path}/audit.db",
           "SLUICE_JOURNAL_DIR": str(tmp_path / "journal"),
           "SLUICE_BPF_DIR": str(tmp_path / "no-bpffs"), "SLUICE_COUNTER_INTERVAL": "0.1",
           "SLUICE_POLICY": write_policy(tmp_path)}
    procs = {stage: subprocess.Popen(
        [sys.executable, "-c", "from pipeline.cli.entry import main; main()", "run", stage],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for stage in ("notify", "policy")}
    try:
        for stage in procs:  # the loop writes counters only once its stage is set up
            wait_for(lambda s=stage: (tmp_path / "run" / f"{s}.counters.json").exists(),
                     f"{stage} running", timeout=30)
        for stage, proc in procs.items():
            nice = stepped(own, STAGES[stage].cpu_step)
            assert nice_of(proc.pid) == nice, stage
            if autogroup_nice_of(proc.pid) is not None and nice != own:
                assert autogroup_nice_of(proc.pid) == nice, stage
        # The answer context's I/O thread and its reaper; the event feeds' context and the
        # stage's own thread, which handles event batches, stay ordinary.
        root = os.geteuid() == 0
        assert realtime_threads(procs["policy"].pid) == (
            ["ZMQbg/IO/0", "ZMQbg/Reaper"] if root else [])
        assert len(list(Path(f"/proc/{procs['policy'].pid}/task").iterdir())) >= 5
        assert realtime_threads(procs["notify"].pid) == []
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = {stage: proc.wait(10) for stage, proc in procs.items()}
    assert codes == {"notify": 0, "policy": 0}


def test_without_the_right_to_real_time_the_answer_context_is_ordinary_and_says_so(
        monkeypatch, caplog):
    """libzmq aborts a thread it cannot schedule as asked: where real-time scheduling is
    refused, the answer context asks for none, with one line saying what that costs."""
    def refuse(*_):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    ctx = answer_context(logging.getLogger("sluice.test"))
    try:
        assert ctx.get(zmq.THREAD_SCHED_POLICY) == -1  # libzmq's default: as started
        sock = ctx.socket(zmq.REP)  # starts the context's threads: no abort
        sock.close(linger=0)
    finally:
        ctx.term()
    assert [r.getMessage() for r in caplog.records] == [
        "cannot run the answer path's socket thread real-time (needs CAP_SYS_NICE or "
        "RLIMIT_RTPRIO): a flood may delay DNS answers"]
