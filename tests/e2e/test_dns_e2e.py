"""End to end, enforce mode: the whole Procfile with the DNS proxy in the client namespace,
the client's resolver pointed at it, and a local authoritative upstream in the server namespace
(tests/support/dnslab.py); the client resolves through resolv.conf and connects at once
(tests/support/tools/resolvclient.py).
"""

from __future__ import annotations

import json

import pytest

from tests.support.dnslab import NAMES, DnsLab
from tests.support.netns import Lab
from tests.support.pipeline import Pipeline, find
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
CHAIN = ["www.chain.test", "hop.middle.test", "edge.cdn.test"]

POLICY = {"defaultAction": "deny", "rules": [
    {"type": "hostname", "value": "allowed.test", "action": "allow",
     "ports": [{"port": 80, "protocol": "tcp"}]},
    {"type": "hostname", "value": "chain.test", "action": "allow",
     "ports": [{"port": 80, "protocol": "tcp"}]},
    {"type": "hostname", "value": "denied.test", "action": "deny"},
    {"type": "cidr", "value": f"{Lab.SERVER_V4}/32", "action": "allow",
     "ports": [{"port": 53, "protocol": "udp"}, {"port": 53, "protocol": "tcp"}]},
]}


@pytest.fixture
def dns_pipeline(lab, tmp_path):
    dns_lab = DnsLab(lab, tmp_path)
    pipeline = Pipeline(lab, tmp_path, POLICY)
    pipeline.env["SLUICE_DNS_UPSTREAM"] = f"{Lab.SERVER_V4}:53"
    try:
        pipeline.start()
        yield dns_lab, pipeline
        assert pipeline.stop()["dns"] == "rc=0"
        assert pipeline.sluice("detach", netns=True).returncode == 0
    finally:
        dns_lab.close()


def test_freshly_resolved_allowed_names_connect_first_time_without_retransmission(dns_pipeline):
    dns_lab, pipeline = dns_pipeline
    names = [f"n{i}.allowed.test" for i in range(NAMES)]
    outcome = dns_lab.client("resolve-connect", "80", *names)
    failed = [r for r in outcome["results"] if not r["ok"]]
    assert not failed, failed[:3]
    slowest = max(r["connect_s"] for r in outcome["results"])
    assert slowest < 1.0, f"a first SYN was retransmitted (slowest connect {slowest:.3f} s)"
    assert outcome["retransmitted"] == 0
    wait_for(lambda: len(find(pipeline.jsonl(), event_type="connection_allowed", dst_port=80))
             >= NAMES, "a connection_allowed record per name", timeout=20)
    assert not find(pipeline.jsonl(), event_type="connection_blocked")


def test_a_denied_name_is_refused_and_stored_as_dns_blocked(dns_pipeline):
    dns_lab, pipeline = dns_pipeline
    assert dns_lab.client("query", "www.denied.test")["rcode"] == "REFUSED"
    assert dns_lab.client("query", "unlisted.example")["rcode"] == "REFUSED"
    wait_for(lambda: [r for r in pipeline.rows() if r["event_type"] == "dns_blocked"
                      and r["dst_hostname"] == "www.denied.test"],
             "the dns_blocked row", timeout=15)
    [row] = [r for r in pipeline.rows() if r["dst_hostname"] == "www.denied.test"]
    assert (bool(row["blocked"]), bool(row["would_deny"]), row["host"]) == (True, False, "e2e-host")


def test_names_reached_through_a_cname_chain_are_allowed_and_carry_the_chain(dns_pipeline):
    dns_lab, pipeline = dns_pipeline
    [whole] = dns_lab.client("resolve-connect", "80", "www.chain.test")["results"]
    assert whole["ok"] and whole["ip"] == "10.203.1.1"
    # An answer that stops at a CNAME: the client asks for the target itself, which the
    # proxy learned from the allowed name (and had already opened by resolving it ahead).
    assert dns_lab.client("query", "cut.chain.test")["rcode"] == "NOERROR"
    [target] = dns_lab.client("resolve-connect", "80", "far.cdn.test")["results"]
    assert target["ok"] and target["ip"] == "10.203.1.2"
    assert dns_lab.client("query", "other.cdn.test")["rcode"] == "REFUSED"

    def allowed(ip):
        return find(pipeline.jsonl(), event_type="connection_allowed", dst_ip=ip)

    wait_for(lambda: allowed("10.203.1.1") and allowed("10.203.1.2"), "the records", timeout=15)
    # Names and chains on connection records come from enrich's use of the dns mappings.
    [via_chain] = allowed("10.203.1.1")
    assert (via_chain.get("dst_hostname"), via_chain.get("cname_chain")) == (
        "www.chain.test", CHAIN)
    [via_target] = allowed("10.203.1.2")
    assert via_target.get("cname_chain") == ["cut.chain.test", "far.cdn.test"]


def test_a_blocked_address_resolved_later_ends_late_allowed(dns_pipeline):
    dns_lab, pipeline = dns_pipeline
    blocked = dns_lab.lab.client_run("tcp", "10.203.2.1", "80", "--timeout", "1")
    assert not blocked["ok"]
    wait_for(lambda: find(pipeline.jsonl(), event_type="connection_blocked", dst_ip="10.203.2.1"),
             "the blocked attempt", timeout=15)
    [late] = dns_lab.client("resolve-connect", "80", "late.allowed.test")["results"]
    assert late["ok"]
    wait_for(lambda: find(pipeline.jsonl(), event_type="connection_late_allowed",
                          dst_ip="10.203.2.1"), "the late-allowed record", timeout=15)
    [record] = find(pipeline.jsonl(), event_type="connection_late_allowed", dst_ip="10.203.2.1")
    assert (record["dst_hostname"], record["matched_rule"], record["dst_port"]) == (
        "late.allowed.test", "allowed.test", 80)


def test_a_cached_answer_leaves_at_once_while_open_and_asks_again_after_a_reload(dns_pipeline):
    dns_lab, pipeline = dns_pipeline
    names = ["n0.allowed.test", "n1.allowed.test", "n2.allowed.test"]
    for _ in range(2):   # fresh, then cached: already open, so released without asking
        _resolve_and_connect(dns_lab, names)
    wait_for(lambda: pipeline.counters("dns").get("already_open", 0) >= len(names),
             "cached answers released as already open", timeout=10)
    # Dropping the rule removes the names' addresses from the maps; bringing it back does
    # not put them back: only a new round trip for each answer can.
    _reload(pipeline, {**POLICY, "rules": [r for r in POLICY["rules"]
                                           if r["value"] != "allowed.test"]}, 1)
    assert not dns_lab.lab.client_run("tcp", "10.203.0.3", "80", "--timeout", "1")["ok"]
    _reload(pipeline, POLICY, 2)
    before = pipeline.counters("dns")
    _resolve_and_connect(dns_lab, names[:2])   # n2's blocked try might be late-allowed
    after = wait_for(lambda: (c := pipeline.counters("dns"))["allow_requests"] >=
                     before["allow_requests"] + 2 and c, "a round trip per answer", timeout=10)
    assert after["cache_hits"] >= before["cache_hits"] + 2


def _resolve_and_connect(dns_lab: DnsLab, names: list[str]) -> None:
    outcome = dns_lab.client("resolve-connect", "80", *names)
    assert all(r["ok"] for r in outcome["results"]), outcome["results"]
    assert outcome["retransmitted"] == 0


def _reload(pipeline: Pipeline, policy: dict, count: int) -> None:
    """Write the policy file and wait until both the policy and the dns stage took it."""
    (pipeline.tmp / "policy.json").write_text(json.dumps(policy))
    wait_for(lambda: all(pipeline.counters(stage).get("policy_reloads", 0) >= count
                         for stage in ("policy", "dns")), f"reload {count}", timeout=15)

