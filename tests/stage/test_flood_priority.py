"""A flood of events never holds back a DNS answer: in the policy stage's own loop (allow
requests are served between event batches) and across processes (the bulk stages step back
on the CPU, the answer path steps forward)."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.message
import zmq

from pipeline import messages
from pipeline.events import AllowRequest, RawEvent
from pipeline.hostfiles import process_start
from pipeline.lending import AnswerLender, thread_file
from pipeline.loop import REALTIME_WINDOW_S, Counters, RealtimeThread, answer_context
from pipeline.rulemaps import ALLOW, DictRuleMaps
from pipeline.stages.policy import PolicyStage
from pipeline.topology import STAGES, inbox_address
from tests.support.exportkit import free_port
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


def stage_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a stage run as its own process, as honcho would start it."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")},
            "SLUICE_RUN_DIR": str(tmp_path / "run"), "SLUICE_HOST": "test-host",
            "SLUICE_DB": f"sqlite:///{tmp_path}/audit.db",
            "SLUICE_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
            "SLUICE_JOURNAL_DIR": str(tmp_path / "journal"),
            "SLUICE_BPF_DIR": str(tmp_path / "no-bpffs"), "SLUICE_COUNTER_INTERVAL": "0.1",
            "SLUICE_POLICY": write_policy(tmp_path)}


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


def test_policy_and_the_bulk_stages_run_as_started_and_policy_answers_on_a_real_time_socket(
        tmp_path):
    """policy (it judges a flood's events; dns lends it real-time for each answer), and
    persist and notify (bulk work) as real processes, each leading its own session as honcho
    starts them: each keeps the nice value it was started with, and its session's autogroup
    stays as made. In policy, the socket thread of its request/reply inbox runs real-time (as
    root); no other thread of these stages does."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    procs = {stage: subprocess.Popen(
        [sys.executable, "-c", "from pipeline.cli.entry import main; main()", "run", stage],
        env=stage_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
        for stage in ("notify", "policy", "persist")}
    try:
        for stage in procs:  # the loop writes counters only once its stage is set up
            wait_for(lambda s=stage: (tmp_path / "run" / f"{s}.counters.json").exists(),
                     f"{stage} running", timeout=30)
        for stage, proc in procs.items():
            assert nice_of(proc.pid) == own, stage
            assert autogroup_nice_of(proc.pid) in (None, 0), stage  # a new session's: 0
        # The answer context's I/O thread and its reaper; the event feeds' context and the
        # stage's own thread, which handles event batches, stay ordinary.
        root = os.geteuid() == 0
        assert realtime_threads(procs["policy"].pid) == (
            ["ZMQbg/IO/0", "ZMQbg/Reaper"] if root else [])
        assert len(list(Path(f"/proc/{procs['policy'].pid}/task").iterdir())) >= 5
        assert realtime_threads(procs["notify"].pid) == []
        assert realtime_threads(procs["persist"].pid) == []
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = {stage: proc.wait(10) for stage, proc in procs.items()}
    assert codes == {"notify": 0, "policy": 0, "persist": 0}


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


class ThreadCpu:
    """A thread's CPU time as the test sets it (the seam RealtimeThread reads it through)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def in_own_thread(work):
    """Run work on a thread of its own (scheduling changes stay with that thread)."""
    result, failure = [], []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as err:  # noqa: BLE001 (re-raised on the test's thread)
            failure.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if failure:
        raise failure[0]
    return result[0]


def test_a_real_time_thread_keeps_to_its_share_and_keeps_its_nice_value(caplog):
    """Real-time while within its share of a window; past it, ordinary (with the nice value
    it had) until the next window, counted every time and logged once; ordinary again when
    the stage ends. Without the right to real-time, start says so and the thread stays as it
    was."""
    cpu, counters = ThreadCpu(), Counters()

    def work():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 3)  # this thread only
        thread = RealtimeThread(0.25, logging.getLogger("sluice.test"), counters, cpu)
        if not thread.start():
            return [("refused", os.sched_getscheduler(0))]
        seen = [("started", os.sched_getscheduler(0))]
        budget = 0.25 * REALTIME_WINDOW_S
        for now, used, what in [(0.0, 0.0, "window opens"), (0.01, budget * 0.9, "within"),
                                (0.02, budget * 1.1, "spent"),
                                (REALTIME_WINDOW_S, budget * 1.2, "renewed"),
                                (REALTIME_WINDOW_S + 0.01, budget * 2.3, "spent again")]:
            cpu.seconds = used
            renews_in = thread.follow(now)
            seen.append((what, os.sched_getscheduler(0), renews_in is not None,
                         os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        cpu.seconds = budget * 2.4  # within the share: real-time when the stage ends
        thread.follow(REALTIME_WINDOW_S + 0.02 + REALTIME_WINDOW_S)
        thread.end()
        seen.append(("ended", os.sched_getscheduler(0)))
        return seen

    seen = in_own_thread(work)
    if os.geteuid() != 0 and seen[0][0] == "refused":
        assert seen == [("refused", os.SCHED_OTHER)]
        return
    realtime = os.SCHED_RR | os.SCHED_RESET_ON_FORK
    ordinary = os.SCHED_OTHER | os.SCHED_RESET_ON_FORK
    assert seen == [("started", realtime),
                    ("window opens", realtime, False, 3), ("within", realtime, False, 3),
                    ("spent", ordinary, True, 3), ("renewed", realtime, False, 3),
                    ("spent again", ordinary, True, 3), ("ended", ordinary)]
    assert counters.get("realtime_share_spent") == 2
    assert [r.getMessage() for r in caplog.records] == [
        "used its real-time share of the CPU (25% of one CPU every 0.1 s): an ordinary thread "
        "until the share is renewed (counted: realtime_share_spent; logged once)"]


def main_thread_policy(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[38])


def test_the_dns_proxy_answers_real_time_and_a_query_flood_runs_past_its_share_ordinary(
        tmp_path):
    """dns as a real process, leading its own session as honcho starts it: it steps forward by
    its topology's cpu_step, its session's autogroup with it; its own thread and its answer
    context's two run real-time (as root), nothing else. A flood of queries on
    loopback (bounded: at most 5 s) spends the share: the proxy goes on as an ordinary thread,
    counts it, and is real-time again once the flood is over."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert STAGES["dns"].cpu_step < 0
    silent_upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes, never answers
    silent_upstream.bind(("127.0.0.1", 0))
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")},
           "SLUICE_RUN_DIR": str(tmp_path / "run"), "SLUICE_HOST": "test-host",
           "SLUICE_JOURNAL_DIR": str(tmp_path / "journal"),
           "SLUICE_BPF_DIR": str(tmp_path / "no-bpffs"), "SLUICE_COUNTER_INTERVAL": "0.1",
           "SLUICE_POLICY": write_policy(tmp_path), "SLUICE_DNS_REDIRECT": "false",
           "SLUICE_DNS_LISTEN": f"127.0.0.1:{port}",
           "SLUICE_DNS_UPSTREAM": f"127.0.0.1:{silent_upstream.getsockname()[1]}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from pipeline.cli.entry import main; main()", "run", "dns"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    counters = tmp_path / "run" / "dns.counters.json"
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        wait_for(counters.exists, "dns running", timeout=30)
        nice = stepped(own, STAGES["dns"].cpu_step)
        assert nice_of(proc.pid) == nice
        if autogroup_nice_of(proc.pid) is not None and nice != own:
            assert autogroup_nice_of(proc.pid) == nice
        if os.geteuid() != 0:
            assert realtime_threads(proc.pid) == []
            return
        main_comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
        assert realtime_threads(proc.pid) == sorted([main_comm, "ZMQbg/IO/0", "ZMQbg/Reaper"])
        assert main_thread_policy(proc.pid) == os.SCHED_RR
        queries = [dns.message.make_query(f"n{i}.flood.test", "A").to_wire()
                   for i in range(2000)]
        flood.setblocking(False)
        deadline, sent = time.monotonic() + 5, 0
        spent = 0
        while time.monotonic() < deadline and not spent:
            for wire in queries:
                try:
                    flood.sendto(wire, ("127.0.0.1", port))
                    sent += 1
                except BlockingIOError:
                    time.sleep(0.001)
            spent = json.loads(counters.read_text())["counters"].get("realtime_share_spent", 0)
        assert spent, f"{sent} queries in 5 s never spent the share"
        wait_for(lambda: main_thread_policy(proc.pid) == os.SCHED_RR,
                 "the proxy real-time again after the flood")
    finally:
        flood.close()
        silent_upstream.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        log = proc.stderr.read()
    assert code == 0
    assert log.count("used its real-time share of the CPU") == (1 if os.geteuid() == 0 else 0)


def blocked_batch(n: int) -> bytes:
    return messages.encode([messages.REGISTRY["enriched_events"].from_raw(RawEvent(
        4, False, 6, 0, "10.0.0.2", f"10.204.0.{i + 1}", 40000, 1000 + i, T0, 77, "curl", 1,
        "", 0, "")) for i in range(n)])


def test_dns_lends_policys_thread_real_time_for_a_request_and_takes_it_back(
        tmp_path, peer, kernel):
    """policy as a real process says which thread answers its REP inbox; a lend (as dns makes
    before each allow request) makes that thread real-time. Answering does not end the lend
    (the lender may have lent again for a request still on its way); the lender's take_back
    does, the nice value kept. A lend no request follows is given back by policy once its
    batches of events have found it unused for LEND_GRACE_S: the flood is never judged
    real-time for long. Lending needs root, so the kernel gate runs it (a failure, not a
    pass, in CI without it)."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from pipeline.cli.entry import main; main()", "run", "policy"],
        env=stage_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    counters = Counters()
    lender = AnswerLender(run, "policy-allow", logging.getLogger("sluice.test"), counters)
    request = peer.ctx.socket(zmq.REQ)
    request.setsockopt(zmq.LINGER, 0)
    peer.sockets.append(request)
    try:
        wait_for(lambda: (run / "policy.counters.json").exists(), "policy running", timeout=30)
        assert (run / "policy-allow.thread").read_text().split()[0] == str(proc.pid)
        nice = nice_of(proc.pid)
        assert main_thread_policy(proc.pid) == os.SCHED_OTHER
        lender.lend()
        assert main_thread_policy(proc.pid) == os.SCHED_RR
        request.connect(inbox_address(run, "policy-allow"))
        request.send(messages.encode([AllowRequest("r1", "www.allowed.test", ["192.0.2.7"], 60,
                                                   [], T0)]))
        assert request.poll(30_000), "no answer to the allow request"
        assert messages.decode(request.recv())[1][0].request_id == "r1"
        time.sleep(0.5)  # policy's own give-back, when it had one, came within microseconds
        assert main_thread_policy(proc.pid) == os.SCHED_RR, "the answer ended the lend"
        lender.take_back()
        assert main_thread_policy(proc.pid) == os.SCHED_OTHER
        assert nice_of(proc.pid) == nice
        assert counters.get("priority_taken_back") == 1

        lender.lend()  # and no request follows
        assert main_thread_policy(proc.pid) == os.SCHED_RR
        deadline = time.monotonic() + 10
        while main_thread_policy(proc.pid) == os.SCHED_RR and time.monotonic() < deadline:
            peer.pusher("policy").send(blocked_batch(8))
            time.sleep(0.005)
        assert main_thread_policy(proc.pid) == os.SCHED_OTHER, "an unused lend kept"
        assert nice_of(proc.pid) == nice
        assert counters.get("priority_lent") == 2
        wait_for(lambda: json.loads((run / "policy.counters.json").read_text())["counters"]
                 .get("lent_priority_returned") == 1, "policy counted the unused lend's return")
    finally:
        lender.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
    assert code == 0
    assert not (run / "policy-allow.thread").exists(), "the thread file outlived policy"


def test_a_lender_lends_only_to_the_process_the_thread_file_names_while_it_lives(
        tmp_path, caplog):
    """No thread file: nothing lent. A file whose pid has since been given to another
    process (its start time differs), or whose process has ended: nothing lent, no error.
    Without the right to real-time: one line, and no more attempts."""
    counters = Counters()
    lender = AnswerLender(tmp_path, "answers", logging.getLogger("sluice.test"), counters)
    path = thread_file(tmp_path, "answers")
    child = subprocess.Popen(["sleep", "60"])
    try:
        lender.lend()  # no file yet
        start = int(process_start(child.pid))
        path.write_text(f"{child.pid} {start + 1}\n")  # the pid, but another process's
        lender.lend()
        assert main_thread_policy(child.pid) == os.SCHED_OTHER
        path.write_text(f"{child.pid} {start}\n")
        os.utime(path, ns=(time.time_ns(), time.time_ns()))  # seen as changed on any clock
        lender.lend()
        root = os.geteuid() == 0
        assert main_thread_policy(child.pid) == (os.SCHED_RR if root else os.SCHED_OTHER)
        assert counters.get("priority_lent") == (1 if root else 0)
        child.kill()
        child.wait()
        lender.lend()  # that process has ended
        assert lender.pid is None
        assert counters.get("priority_lent") == (1 if root else 0)
        assert [r.getMessage() for r in caplog.records] == ([] if root else [
            "cannot lend real-time scheduling to the thread that answers answers (needs "
            "CAP_SYS_NICE): a flood may delay its answers"])
    finally:
        child.kill()
        child.wait()
        lender.close()


def test_a_stage_run_in_a_thread_names_no_answering_thread(tmp_path):
    """Only a stage that is its process's main thread may be lent real-time: one run in a
    test's thread (sharing the test's process) writes no thread file."""
    maps = DictRuleMaps()
    settings = stage_settings(tmp_path, SLUICE_POLICY=write_policy(tmp_path),
                              SLUICE_ALLOW_EXISTING_CONNECTIONS="false")
    running = StageThread(PolicyStage(open_maps=lambda s: maps), settings).start()
    try:
        wait_for(lambda: (settings.run_dir / "policy-allow.sock").exists(), "policy bound")
        assert not (settings.run_dir / "policy-allow.thread").exists()
    finally:
        assert running.finish() == 0
