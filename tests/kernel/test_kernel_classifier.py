"""The real classifier, loaded by the capture stage, judging real packets on namespaced veths."""

import ipaddress
import os
import re
import subprocess
import sys

import pytest

from pipeline.errors import ExitCode
from pipeline.kernel import libbpf
from pipeline.kernel.loader import detach_instance

from pipeline.rulemaps import ALLOW, DENY
from tests.support.kernelrig import HASH_MAP, CaptureRig, create_map
from tests.support.netns import Lab

pytestmark = pytest.mark.kernel

TCP, UDP, ICMP, GRE = 6, 17, 1, 47


def net(text):
    return ipaddress.ip_network(text)


def allow_host(*addresses):
    def program(maps):
        for address in addresses:
            maps.put_cidr(net(address), ALLOW, False)
    return program


@pytest.fixture
def rig(lab, tmp_path, zmq_context, request):
    params = getattr(request, "param", {})
    rig = CaptureRig(lab, tmp_path, zmq_context, **params)
    yield rig
    rig.close()


def to(events, dst, port=None, **fields):
    return [e for e in events if e.dst_ip == dst and (port is None or e.dst_port == port)
            and all(getattr(e, k) == v for k, v in fields.items())]


def test_allowed_tcp_connection_reports_pid_and_process_name(lab, rig):
    lab.start_server(80)
    rig.start(DENY, allow_host(f"{Lab.SERVER_V4}/32"))
    result = lab.client_run("tcp", Lab.SERVER_V4, "80", "--name", "sl-allowed")
    assert result["ok"], result
    rig.receive(lambda ev: to(ev, Lab.SERVER_V4, 80), what="allowed SYN event")
    event = to(rig.events, Lab.SERVER_V4, 80)[0]
    assert event.allowed is True and event.ip_proto == TCP and event.ip_version == 4
    assert (event.pid, event.comm) == (result["pid"], "sl-allowed")
    assert event.src_ip == Lab.CLIENT_V4 and event.src_port > 0
    assert event.packets == 1


def test_denied_tcp_is_dropped_in_enforce_mode(lab, rig):
    lab.start_server(80)
    rig.start(DENY)
    result = lab.client_run("tcp", Lab.SERVER_V4, "80", "--timeout", "1.5")
    assert not result["ok"]
    rig.receive(lambda ev: to(ev, Lab.SERVER_V4, 80, allowed=False), what="denied SYN")
    assert rig.stop() == 0
    assert rig.counters()["kernel_denied"] >= 1


@pytest.mark.parametrize("rig", [{"mode": "audit"}], indirect=True)
def test_denied_tcp_passes_in_audit_mode_and_is_reported(lab, rig):
    lab.start_server(80)
    rig.start(DENY)
    result = lab.client_run("tcp", Lab.SERVER_V4, "80")
    assert result["ok"], result
    rig.receive(lambda ev: to(ev, Lab.SERVER_V4, 80, allowed=False), what="would-deny SYN")


def test_icmp_and_gre_are_protocol_blocked(lab, rig):
    rig.start(DENY)
    lab.client_run("raw", Lab.SERVER_V4, str(ICMP))
    lab.client_run("raw", Lab.SERVER_V4, str(GRE))
    for proto in (ICMP, GRE):
        rig.receive(lambda ev, proto=proto: to(ev, Lab.SERVER_V4, proto, ip_proto=proto),
                    what=f"proto {proto}")
    for event in to(rig.events, Lab.SERVER_V4):
        assert event.is_protocol_block and event.src_port == 0 and not event.allowed


def test_gre_is_blocked_even_towards_an_allowed_address(lab, rig):
    rig.start(DENY, allow_host(f"{Lab.SERVER_V4}/32"))
    lab.client_run("raw", Lab.SERVER_V4, str(GRE))
    rig.receive(lambda ev: to(ev, Lab.SERVER_V4, GRE, ip_proto=GRE), what="GRE block")


def test_ipv6_allow_and_deny_with_neighbour_discovery_passing(lab, rig):
    lab.start_server(80, 443)
    rig.start(DENY, lambda maps: (maps.put_cidr(net(f"{Lab.SERVER_V6}/128"), ALLOW, True),
                                  maps.put_port(net(f"{Lab.SERVER_V6}/128"), 80, TCP, ALLOW)))
    allowed = lab.client_run("tcp", Lab.SERVER_V6, "80")
    denied = lab.client_run("tcp", Lab.SERVER_V6, "443", "--timeout", "1.5")
    assert allowed["ok"] and not denied["ok"]
    rig.receive(lambda ev: to(ev, Lab.SERVER_V6, 80, allowed=True, ip_version=6)
                and to(ev, Lab.SERVER_V6, 443, allowed=False), what="IPv6 events")


@pytest.mark.parametrize("vlans", [[100], [200, 100]], ids=["802.1Q", "QinQ"])
def test_tagged_frames_are_judged_like_untagged(lab, rig, vlans):
    # This kernel may lack 8021q, so the tagged frames are built by hand and sent on the
    # client's veth through a packet socket, which egress TC sees like any other frame.
    rig.start(DENY, lambda maps: (maps.put_cidr(net(f"{Lab.SERVER_V4}/32"), ALLOW, True),
                                  maps.put_port(net(f"{Lab.SERVER_V4}/32"), 80, TCP, ALLOW)))
    tags = [arg for vid in vlans for arg in ("--vlan", str(vid))]
    send = ("frame", Lab.SERVER_V4, "--interface", lab.client_if, *tags)
    assert lab.client_run(*send[:2], "80", *send[2:])["ok"]
    assert lab.client_run(*send[:2], "443", *send[2:])["dropped"] == 1
    rig.receive(lambda ev: to(ev, Lab.SERVER_V4, 80, allowed=True)
                and to(ev, Lab.SERVER_V4, 443, allowed=False), what="tagged SYN events")


def test_subnet_rule_with_a_port_allows_every_address_on_that_port_only(lab, rig):
    lab.start_server(80, 443)
    subnet = net(Lab.SUBNET)
    rig.start(DENY, lambda maps: (maps.put_cidr(subnet, ALLOW, True),
                                  maps.put_port(subnet, 443, TCP, ALLOW)))
    for host in range(1, 6):
        address = f"10.202.0.{host}"
        assert lab.client_run("tcp", address, "443")["ok"], address
        assert not lab.client_run("tcp", address, "80", "--timeout", "1")["ok"], address


def test_udp_flood_to_one_destination_is_aggregated_with_exact_packet_counts(lab, rig):
    rig.start(DENY)
    sent = lab.client_run("udp", Lab.SERVER_V4, "9999", "--count", "5000")["sent"]
    assert sent == 5000
    rig.receive(lambda ev: sum(e.packets for e in to(ev, Lab.SERVER_V4, 9999)) >= sent,
                timeout=8, what="every flooded packet accounted for")
    events = to(rig.events, Lab.SERVER_V4, 9999)
    assert sum(e.packets for e in events) == sent
    assert len(events) < 50, "a flood of one flow must not be one event per packet"


@pytest.mark.parametrize("rig", [{"mode": "audit"}], indirect=True)
def test_a_stop_reports_the_packets_of_flows_still_in_their_window(lab, rig):
    """An audit-mode stop removes the maps: packets a flow sent after its record, within its
    window (not yet due for the sweep), are claimed at the stop, not lost with the maps."""
    rig.start(DENY)
    assert lab.client_run("udp", Lab.SERVER_V4, "9998", "--count", "50")["sent"] == 50
    rig.receive(lambda ev: to(ev, Lab.SERVER_V4, 9998), what="the flow's first record")
    assert rig.stop() == 0
    rig.receive(lambda ev: sum(e.packets for e in to(ev, Lab.SERVER_V4, 9998)) >= 50,
                what="the packets still pending at the stop")
    assert sum(e.packets for e in to(rig.events, Lab.SERVER_V4, 9998)) == 50


def test_a_detach_says_what_the_maps_held_that_no_capture_reported(lab, rig):
    """After an enforce-mode stop the classifier goes on enforcing, and its records wait in
    the pinned maps for the next capture; `sluice detach` removes them, and says so."""
    rig.start(DENY)
    assert rig.stop() == 0
    assert lab.client_run("udp", Lab.SERVER_V4, "9997", "--count", "5")["sent"] == 5
    assert lab.client_run("udp", Lab.SERVER_V4, "9996")["sent"] == 1
    [line] = [part for part in detach_instance(rig.settings) if "not reported" in part]
    ring = re.search(r"(\d+) record\(s\) in the ring buffer", line)
    assert ring and int(ring.group(1)) >= 2, line  # a record for each flow's first packet
    assert line.endswith("4 packet(s) pending in 1 flow(s)"), line


@pytest.mark.parametrize("rig", [{"SLUICE_RINGBUF_PAGES": "1"}], indirect=True)
def test_ring_buffer_loss_is_counted_and_packet_counts_still_add_up(lab, rig):
    rig.start(DENY)
    sent = lab.client_run("udp", Lab.SERVER_V4, "20000", "--count", "3000", "--spread", "3000")
    rig.receive(lambda ev: sum(e.packets for e in to(ev, Lab.SERVER_V4)) >= sent["sent"],
                timeout=10, what="packets of lost records reported by the flow sweep")
    rig.stop()
    counters = rig.counters()
    assert counters["kernel_ringbuf_full"] > 0
    assert sum(e.packets for e in to(rig.events, Lab.SERVER_V4)) == sent["sent"]


def test_a_pin_an_older_sluice_left_is_removed_at_load(lab, rig):
    """map_overflow (before parked records had keys of their own) is a pin no map of this
    sluice adopts: bcc would take it whatever its key size."""
    rig.bpf_dir.mkdir(parents=True, exist_ok=True)
    fd = create_map(HASH_MAP, 24, 104, 16, b"map_overflow")  # shaped as that one
    old_pin = rig.bpf_dir / "map_overflow"
    try:
        assert libbpf.lib().bpf_obj_pin(fd, str(old_pin).encode()) == 0
    finally:
        os.close(fd)
    rig.start(DENY)
    assert not old_pin.exists()
    assert (rig.bpf_dir / "map_parked").exists()


def test_a_start_that_fails_after_the_load_exits_in_one_line_and_can_be_detached(
        lab, tmp_path, zmq_context):
    """Hooks that cannot attach (SLUICE_CGROUP is no cgroup) stop an enforce-mode start after
    the classifier is loaded and the attachment saved, before the ring buffer is mapped:
    teardown closes what set-up got to, the error stays one line, and detach clears it all."""
    not_a_cgroup = tmp_path / "not-a-cgroup"
    not_a_cgroup.mkdir()
    rig = CaptureRig(lab, tmp_path, zmq_context)
    rig.env["SLUICE_CGROUP"] = str(not_a_cgroup)
    try:
        rig.run_dir.mkdir(parents=True)
        proc = lab.spawn_in_client_net(
            [sys.executable, "-m", "pipeline.cli.app", "run", "capture"], rig.env,
            stderr=subprocess.PIPE, text=True)
        rc, stderr = proc.wait(60), proc.stderr.read()
    finally:
        rig.close()  # detaches, and fails the test if a pin is left
    assert rc == ExitCode.KERNEL, stderr
    assert "Traceback" not in stderr, stderr
    assert "DNS redirect: hook(s)" in stderr and "enforce mode does not run without it" in stderr
    assert (rig.run_dir / "capture.failed").read_text().count("\n") == 1


@pytest.mark.parametrize(("rig", "restart_pages"), [({"SLUICE_RINGBUF_PAGES": "1"}, "4"),
                                                     ({"SLUICE_RINGBUF_PAGES": "4"}, "1")],
                         indirect=["rig"], ids=["larger", "smaller"])
def test_a_restart_with_another_ring_buffer_size_reads_the_pinned_one_and_says_so(
        lab, rig, restart_pages):
    """An enforce-mode stop keeps the maps pinned and the next start adopts them as they are:
    with SLUICE_RINGBUF_PAGES changed meanwhile, capture reads the ring buffer at the size it
    has (by the setting a larger one failed to map, and a smaller one was read at the wrong
    places once its records passed the first page) and says why the setting waits."""
    rig.start(DENY)
    assert rig.stop() == 0
    rig.inbox.close(0)
    rig.env["SLUICE_RINGBUF_PAGES"] = restart_pages
    rig.start(DENY)
    sent = lab.client_run("udp", Lab.SERVER_V4, "20000", "--count", "300", "--spread", "300")
    assert sent["sent"] == 300
    rig.receive(lambda ev: len(to(ev, Lab.SERVER_V4)) >= 300, what="a record for each flow")
    assert {e.dst_port for e in to(rig.events, Lab.SERVER_V4)} == set(range(20000, 20300))
    assert rig.stop() == 0
    log = rig.proc.stderr.read()
    pinned = rig.settings.ringbuf_pages
    assert f"the ring buffer holds {pinned} page(s), not SLUICE_RINGBUF_PAGES={restart_pages}" \
        in log, log
