"""The classifier's flow bookkeeping, run on frames through BPF_PROG_TEST_RUN with nobody
draining the ring buffer: what the ring buffer refuses is parked (map_parked, read in the
batches capture's sweep uses), and a quiet flow's tail is claimed in the kernel."""

from __future__ import annotations

import logging
import os
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.kernel import libbpf
from pipeline.kernel.loader import AGG_WINDOW_NS, FLOW_ENTRIES, load_classifier, remove_pins
from pipeline.kernel.maps import KernelRuleMaps, claim_tail, read_counters
from pipeline.kernel.structs import FlowKey, FlowState, ParkKey
from pipeline.loop import StageIO
from pipeline.rulemaps import DENY
from pipeline.settings import Settings
from pipeline.stages.capture import CaptureStage
from tests.support.stagekit import stage_settings

pytestmark = pytest.mark.kernel

SOURCE, DESTINATION = bytes([10, 203, 0, 1]), bytes([10, 203, 0, 9])
TC_ACT_SHOT = 2


def udp_frame(dst_port: int, destination: bytes = DESTINATION) -> bytes:
    """Ethernet, IPv4 and UDP headers of one datagram from port 40000 (checksums unchecked)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, SOURCE, destination)
    udp = struct.pack("!HHHH", 40000, dst_port, 8, 0)
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp


@pytest.fixture
def classifier(kernel, tmp_path):
    bpf_dir = Path(f"/sys/fs/bpf/sluice-park-{os.getpid()}")
    settings = Settings.from_env({"SLUICE_BPF_DIR": str(bpf_dir), "SLUICE_RINGBUF_PAGES": "1",
                                  "SLUICE_RUN_DIR": str(tmp_path / "run")})
    loaded = load_classifier(settings)
    maps = KernelRuleMaps(bpf_dir)
    try:
        maps.set_config(DENY, False, 1)  # enforce mode, default deny
        yield loaded
    finally:
        maps.close()
        loaded.cleanup()
        remove_pins(bpf_dir)  # and the directory


def send(classifier, dst_port: int, repeat: int = 1, destination: bytes = DESTINATION) -> int:
    """The classifier's verdict on one datagram (sent repeat times)."""
    verdict, _ = libbpf.run_program(classifier.egress_fd, udp_frame(dst_port, destination),
                                    repeat)
    return verdict


def flood(classifier, flows: range, repeat: int = 1) -> None:
    """New flows of repeat datagrams each, one destination a flow (10.204.0.0 on, port 9)."""
    for n in flows:
        send(classifier, 9, repeat, bytes([10, 204 + (n >> 16), n >> 8 & 255, n & 255]))


def parked(classifier) -> list[tuple[int, int]]:
    """(destination port, packets) of each parked record, read without taking it."""
    found = []
    for key_bytes, value_bytes in libbpf.entries(classifier.map_fd("map_parked"), ParkKey,
                                                 FlowState):
        key, value = ParkKey.from_buffer_copy(key_bytes), FlowState.from_buffer_copy(value_bytes)
        found.append((key.flow.dst_port, value.pending))
    return found


def test_a_flow_refused_twice_is_parked_as_two_whole_records(classifier):
    # Fill the one-page ring buffer with records of other flows; nobody drains it.
    for port in range(1000, 1200):
        assert send(classifier, port) == TC_ACT_SHOT
    assert parked(classifier), "the ring buffer never filled"
    assert send(classifier, 7000) == TC_ACT_SHOT
    time.sleep(AGG_WINDOW_NS / 1e9 + 0.2)  # the flow's window ends: its next packet emits
    assert send(classifier, 7000) == TC_ACT_SHOT
    assert sorted(p for p in parked(classifier) if p[0] == 7000) == [(7000, 1), (7000, 1)]
    counters = read_counters(classifier.map_fd("map_counters"))
    assert counters["parked"] == sum(packets for _, packets in parked(classifier))
    assert counters["lost"] == 0


def only_flow_key(classifier) -> bytes:
    """The key of map_flows' one entry."""
    [key] = [k for k, _ in libbpf.entries(classifier.map_fd("map_flows"), FlowKey, FlowState)]
    return key


def flow_entries(classifier) -> dict[int, int]:
    """Destination port -> pending packets of each map_flows entry to DESTINATION (the key
    holds an IPv4 address as the kernel's u32, in this host's byte order)."""
    found = {}
    for key_bytes, value in libbpf.entries(classifier.map_fd("map_flows"), FlowKey, FlowState):
        key = FlowKey.from_buffer_copy(key_bytes)
        if int.from_bytes(bytes(key.dst[:4]), sys.byteorder) == int.from_bytes(DESTINATION,
                                                                              "big"):
            found[key.dst_port] = FlowState.from_buffer_copy(value).pending
    return found


def pending_in_flows(classifier) -> int:
    """The packets pending in every map_flows entry."""
    return sum(FlowState.from_buffer_copy(value).pending for _, value in
               libbpf.entries(classifier.map_fd("map_flows"), FlowKey, FlowState))


def test_a_quiet_flows_tail_is_claimed_once_with_its_record_and_the_entry_stays(classifier):
    assert send(classifier, 7100, repeat=5) == TC_ACT_SHOT  # one record, four pending
    assert flow_entries(classifier) == {7100: 4}
    key = only_flow_key(classifier)
    claimed, last = claim_tail(classifier.claim_fd, key)
    assert claimed == 4
    assert (last.dst_ip, last.dst_port, last.src_port, last.allowed) == (
        int.from_bytes(DESTINATION, "big"), 7100, 40000, 0)
    assert claim_tail(classifier.claim_fd, key) == (0, None)  # claimed once
    # The entry stays (nothing freed that the classifier could still be adding to): the
    # flow's next packet in its window folds into it again.
    assert flow_entries(classifier) == {7100: 0}
    send(classifier, 7100)
    assert flow_entries(classifier) == {7100: 1}
    assert claim_tail(classifier.claim_fd, bytes(len(key))) == (0, None)  # no such flow


def test_claims_beside_the_classifier_count_every_packet_once(classifier):
    """Capture claims a flow's tail while the classifier, on the other CPU, folds packets
    into it: every packet is in exactly one claim or still pending. (With the entry read and
    deleted instead, packets folded into the deleted entry were lost, and the flow's next
    packet made a second record.)"""
    runs = 200_000
    send(classifier, 7200)  # the flow's first record: the rest of the runs fold
    key = only_flow_key(classifier)
    claimed, claims = 0, 0
    flooding = threading.Thread(target=send, args=(classifier, 7200, runs))
    flooding.start()
    while flooding.is_alive() or claims == 0:
        claimed += claim_tail(classifier.claim_fd, key)[0]
        claims += 1
    flooding.join()
    counters = read_counters(classifier.map_fd("map_counters"))
    assert counters["events"] + counters["ringbuf_full"] == 1, \
        "a second record of the flow: a claim removed its entry, or the runs outlasted its window"
    assert claimed > 0, "no claim overlapped the runs"
    assert claimed + flow_entries(classifier)[7200] == runs == counters["aggregated"]
    assert counters["tail_taken"] == claimed  # what the flow reported, counted by the kernel


def test_a_flood_of_new_flows_evicts_flows_with_nothing_pending_first(classifier):
    """The flow map is an LRU, and a new flow's entry is not looked up again after it is made:
    single-packet flows stay unreferenced and are evicted before a flow with packets pending
    (it was looked up for each)."""
    send(classifier, 7300, repeat=5)  # a record and four pending
    flood(classifier, range(3 * FLOW_ENTRIES))  # three times the flows map_flows holds
    assert flow_entries(classifier)[7300] == 4


def sweeping_capture(classifier, tmp_path) -> CaptureStage:
    stage = CaptureStage(kernel_ns=lambda: 0)  # no flow is due: nothing is claimed
    stage.io = StageIO("capture", stage_settings(tmp_path), None, threading.Event(),
                       logging.getLogger("sluice.capture.under-test"))
    stage.flows_fd, stage.claim_fd = classifier.map_fd("map_flows"), classifier.claim_fd
    stage.counters_fd = classifier.map_fd("map_counters")
    return stage


def test_packets_evicted_with_their_flow_are_counted_by_capture(classifier, tmp_path):
    """A flow that went quiet with packets pending, then a flood of new flows of two packets
    each (so each has a packet pending too): the LRU evicts entries with packets in them.
    Those packets are in no record; capture's sweep counts them (kernel_evicted), from the
    kernel's counters and what the flows still hold."""
    send(classifier, 7300, repeat=5)  # a record and four pending
    flood(classifier, range(2 * FLOW_ENTRIES), repeat=2)
    assert 7300 not in flow_entries(classifier), "the flow map kept the quiet flow"
    held = pending_in_flows(classifier)
    stage = sweeping_capture(classifier, tmp_path)
    stage._sweep_flows()
    assert stage.io.counters.get("kernel_evicted") == 0  # one sweep's estimate is not enough
    stage._sweep_flows()
    counters = read_counters(stage.counters_fd)
    evicted = counters["aggregated"] - held
    assert counters["tail_taken"] == 0 and evicted >= 4
    assert stage.io.counters.get("kernel_evicted") == evicted


def test_sweeps_claiming_every_flow_keep_what_the_same_flood_would_evict(classifier, tmp_path):
    """The same flood with a sweep between chunks of it that claims every flow's pending
    packets, in their window or not, as capture sweeps while it sees evictions: nothing is
    evicted, and every packet is in a record or a claim."""
    stage = sweeping_capture(classifier, tmp_path)
    tails: list[bytes] = []
    stage._journal_records = tails.extend
    send(classifier, 7300, repeat=5)
    flows = 2 * FLOW_ENTRIES
    for first in range(0, flows, flows // 8):
        flood(classifier, range(first, first + flows // 8), repeat=2)
        stage._sweep_flows(every_flow=True)
    counters = read_counters(stage.counters_fd)
    assert counters["aggregated"] == flows + 4 == counters["tail_taken"]
    assert len(tails) == flows + 1  # a claimed tail for each flow
    assert stage.io.counters.get("kernel_evicted") == 0


def test_a_sweep_reads_the_flow_map_only_while_a_packet_is_pending(classifier, tmp_path):
    """The kernel's counters say whether any flow holds a packet: after a flood of
    single-packet flows a sweep does not read map_flows at all (here a read would fail and be
    counted: the stage's descriptor is no map), and it does once a packet is folded."""
    stage = sweeping_capture(classifier, tmp_path)
    flood(classifier, range(1_000))
    stage.flows_fd = -1
    stage._sweep_flows(every_flow=True)
    assert stage.io.counters.get("map_read_errors") == 0
    send(classifier, 7400, repeat=2)  # a record and one pending
    stage._sweep_flows(every_flow=True)
    assert stage.io.counters.get("map_read_errors") == 1
