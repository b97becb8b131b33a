"""End to end, enforce mode, an empty allowlist and a fake GitHub Actions environment: the
job's own service hosts (named by ACTIONS_*_URL, served by the test's DNS) connect at the
first SYN, tagged github_service; anything else stays blocked."""

import json

import pytest

from tests.support.dnslab import ZONE, DnsLab
from tests.support.netns import Lab
from tests.support.pipeline import Pipeline, find
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
SERVICES = {"runtime.ci.test": "10.203.0.50", "results.ci.test": "10.203.0.51",
            "cache.ci.test": "10.203.0.52", "token.ci.test": "10.203.0.53"}
ACTIONS = {"GITHUB_ACTIONS": "true",
           "ACTIONS_RUNTIME_URL": "https://runtime.ci.test/_apis/pipelines/",
           "ACTIONS_RESULTS_URL": "https://results.ci.test/",
           "ACTIONS_CACHE_URL": "https://cache.ci.test/AbCd/",
           "ACTIONS_ID_TOKEN_REQUEST_URL": "https://token.ci.test/idtoken?api-version=2.0"}


def test_github_service_hosts_connect_at_the_first_syn_with_an_empty_allowlist(lab, tmp_path):
    zone = {**ZONE, **{name: {"A": [ip], "ttl": 60} for name, ip in SERVICES.items()},
            "other.ci.test": {"A": ["10.203.0.54"], "ttl": 60}}
    dns_lab = DnsLab(lab, tmp_path, zone)
    lab.start_server(443)
    pipeline = Pipeline(lab, tmp_path, {"defaultAction": "deny"})
    pipeline.env.update(ACTIONS, SLUICE_DNS_UPSTREAM=f"{Lab.SERVER_V4}:53")
    try:
        pipeline.start()
        status = json.loads(pipeline.sluice("status", "--json").stdout)
        assert status["layers"]["policy"]["auto_allowed"]["github_service"] == 5 + len(SERVICES)

        outcome = dns_lab.client("resolve-connect", "443", *SERVICES)
        assert [r["ok"] for r in outcome["results"]] == [True] * len(SERVICES), outcome
        assert outcome["retransmitted"] == 0, "a first SYN was dropped"
        assert dns_lab.client("query", "other.ci.test")["rcode"] == "REFUSED"
        assert not lab.client_run("tcp", "10.203.0.54", "443", "--timeout", "1")["ok"]

        def allowed(ip):
            return find(pipeline.jsonl(), event_type="connection_allowed", dst_ip=ip)

        wait_for(lambda: all(allowed(ip) for ip in SERVICES.values()), "the records", timeout=15)
        for name, ip in SERVICES.items():
            [record] = allowed(ip)
            assert (record["dst_hostname"], record["auto_allowed_type"], record["dst_port"]) == (
                name, "github_service", 443)
        assert not find(pipeline.jsonl(), event_type="connection_blocked", dst_port=443,
                        dst_hostname="runtime.ci.test")
        assert pipeline.stop()["policy"] == "rc=0"
        assert pipeline.sluice("detach", netns=True).returncode == 0
    finally:
        dns_lab.close()
