"""Time to load and program a 10,000-rule policy, against baselines measured in the same run.

The policy file mixes hostname rules (exact and globs), subnets with ports, single hosts with
ports and IPv6 subnets. Timed:

- baseline json: json.load of the file (the least any loader does);
- baseline naive: json.load plus one map write per rule straight into DictRuleMaps, with no
  validation, merging, accumulator or diff;
- sluice load: load_policy_file (strict validation, normalization, merging, indexes);
- sluice program: Firewall.program into empty DictRuleMaps;
- sluice reload: Firewall.program of the same policy with 1% of its rules changed (the diff).

Each step runs several times; the best time is reported, and for sluice's steps also the
first run, before the parse caches (networks, globs) are warm.

Usage: .venv/bin/python benchmarks/policy_program.py [--rules 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.firewall.writer import Firewall
from pipeline.policy.load import load_policy_file, policy_from_text
from pipeline.rulemaps import ALLOW, DENY, DictRuleMaps

PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}


def make_rule(i: int) -> dict:
    """Four kinds in turn: a hostname or glob, a subnet with ports, a host, an IPv6 subnet."""
    action = "deny" if i % 13 == 0 else "allow"
    kind = i % 4
    if kind == 0:
        value = f"*.svc{i}.example.com" if i % 8 == 0 else f"api{i}.example{i % 97}.com"
        return {"type": "hostname", "value": value, "action": action,
                "ports": [{"port": 443, "protocol": "tcp"}]}
    if kind == 1:
        return {"type": "cidr", "value": f"10.{i // 256 % 256}.{i % 256}.0/24", "action": action,
                "ports": [{"port": 443, "protocol": "tcp"}, {"port": 53, "protocol": "udp"}]}
    if kind == 2:
        return {"type": "cidr", "value": f"172.{16 + i // 65536 % 16}.{i // 256 % 256}.{i % 256}",
                "action": action, "ports": [{"port": 8080 + i % 5, "protocol": "tcp"}]}
    return {"type": "cidr", "value": f"2001:db8:{i:x}::/48", "action": action}


def make_document(count: int, salt: int = 0) -> dict:
    rules = [make_rule(i) for i in range(count)]
    for i in range(0, count, 100):  # 1% of the rules differ between documents
        rules[i] = make_rule(count + i + salt)
    return {"defaultAction": "deny", "rules": rules, "searchDomains": [".corp.example.com"]}


def naive_program(path: Path) -> DictRuleMaps:
    maps = DictRuleMaps()
    for rule in json.loads(path.read_text())["rules"]:
        if rule["type"] != "cidr":
            continue
        network = ipaddress.ip_network(rule["value"], strict=False)
        action = ALLOW if rule["action"] == "allow" else DENY
        maps.put_cidr(network, action, bool(rule.get("ports")))
        for port in rule.get("ports", []):
            maps.put_port(network, port["port"], PROTOCOL_NUMBERS[port["protocol"]], action)
    return maps


def timed(step, repeat: int) -> tuple[float, float, object]:
    """(first run, best run, result) in seconds."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - start)
    return times[0], min(times), result


def programmed(policy) -> Firewall:
    firewall = Firewall(DictRuleMaps())
    firewall.program(policy, audit_mode=False)
    return firewall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "policy.json"
        path.write_text(json.dumps(make_document(args.rules)))
        _, json_time, _ = timed(lambda: json.loads(path.read_text()), args.repeat)
        _, naive_time, _ = timed(lambda: naive_program(path), args.repeat)
        load_cold, load_time, policy = timed(lambda: load_policy_file(path), args.repeat)
    program_cold, program_time, firewall = timed(lambda: programmed(policy), args.repeat)
    changed = policy_from_text(json.dumps(make_document(args.rules, salt=7)), "changed")
    reload_time = min(_timed_reload(policy, changed) for _ in range(args.repeat))
    entries = len(firewall.cidrs) + len(firewall.ports)
    cold, best = load_cold + program_cold, load_time + program_time
    print(f"policy: {len(policy.rules)} rules -> {entries} map entries")
    print(f"baseline json.load:            {json_time * 1e3:8.1f} ms")
    print(f"baseline naive load+write:     {naive_time * 1e3:8.1f} ms")
    print(f"sluice load_policy_file:       {load_time * 1e3:8.1f} ms  (first run "
          f"{load_cold * 1e3:.1f} ms; {load_time / json_time:.1f}x json.load)")
    print(f"sluice program (empty maps):   {program_time * 1e3:8.1f} ms  (first run "
          f"{program_cold * 1e3:.1f} ms)")
    print(f"sluice load + program:         {best * 1e3:8.1f} ms  ({best / naive_time:.1f}x naive; "
          f"first run {cold * 1e3:.1f} ms, {cold / naive_time:.1f}x)")
    print(f"sluice reload with 1% changed: {reload_time * 1e3:8.1f} ms")


def _timed_reload(policy, changed) -> float:
    firewall = programmed(policy)
    start = time.perf_counter()
    firewall.program(changed, audit_mode=False)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
