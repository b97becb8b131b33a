"""Loading policies: cargowall's JSON schema, the environment form, strict validation, merging."""

import json

import pytest

from pipeline.errors import PolicyError
from pipeline.policy.envform import split_entry
from pipeline.policy.load import (InvalidPolicy, load_policy, load_policy_file,
                                  policy_from_settings, policy_from_text)
from pipeline.policy.rules import Rule
from pipeline.policy.verdict import PortSpec
from pipeline.settings import Settings
from tests.support.policykit import make_policy, specs

CARGOWALL_EXAMPLE = """{
  "defaultAction": "deny",
  "rules": [
    {"type": "hostname", "value": "github.com", "ports": [{"port": 443, "protocol": "tcp"}],
     "action": "allow"},
    {"type": "cidr", "value": "8.8.8.8/32", "ports": [{"port": 53, "protocol": "udp"}],
     "action": "allow"}
  ],
  "searchDomains": [".compute.internal"],
  "sudoLockdown": {"enabled": false, "allowCommands": ["/usr/bin/apt-get"]}
}"""


def load(document, name="policy.json"):
    return policy_from_text(json.dumps(document), name)


def problems(document):
    with pytest.raises(InvalidPolicy) as caught:
        load(document)
    return list(caught.value.lines)


def test_cargowall_example_loads_unchanged():
    policy = policy_from_text(CARGOWALL_EXAMPLE, "config.json")
    assert policy.default_action == "deny"
    assert policy.rules == (
        Rule("hostname", "github.com", "allow", (PortSpec(443, "tcp"),)),
        Rule("cidr", "8.8.8.8/32", "allow", (PortSpec(53, "udp"),)),
    )
    assert policy.search_domains == (".compute.internal",)
    assert policy.source == "config.json"


@pytest.mark.parametrize("document, attribute, expected", [
    ({"DEFAULTACTION": "allow"}, "default_action", "allow"),
    ({"defaultaction": "allow", "DefaultAction": "deny"}, "default_action", "deny"),
    ({}, "default_action", "deny"),
    ({"defaultAction": ""}, "default_action", "deny"),
    ({"defaultAction": None}, "default_action", "deny"),
    ({"Rules": [{"Type": "hostname", "VALUE": "a.com", "Action": "allow"}]}, "rules",
     (Rule("hostname", "a.com", "allow"),)),
    ({"rules": [{"type": "hostname", "value": "a.com", "action": "allow", "extra": 1}],
      "unknown": {"x": 1}}, "rules", (Rule("hostname", "a.com", "allow"),)),
    ({"rules": [{"type": "hostname", "value": "a.com", "action": "allow",
                 "autoAddedType": "dns"}]}, "rules",
     (Rule("hostname", "a.com", "allow", (), "dns"),)),
    ({"searchdomains": ["Compute.Internal", ".compute.internal"]}, "search_domains",
     (".compute.internal",)),
    ({"rules": None, "searchDomains": None}, "rules", ()),
])
def test_json_keys_match_case_insensitively_and_defaults_apply(document, attribute, expected):
    assert getattr(load(document), attribute) == expected


NORMALIZED = [
    ({"type": "hostname", "value": "API.GitHub.com", "action": "allow"},
     Rule("hostname", "api.github.com", "allow")),
    ({"type": "hostname", "value": "*.Example.COM", "action": "deny"},
     Rule("hostname", "*.example.com", "deny")),
    ({"type": "cidr", "value": "10.1.2.3/8", "action": "deny"}, Rule("cidr", "10.0.0.0/8", "deny")),
    ({"type": "cidr", "value": "1.2.3.4", "action": "allow"}, Rule("cidr", "1.2.3.4/32", "allow")),
    ({"type": "cidr", "value": "2001:DB8:0:0::1", "action": "allow"},
     Rule("cidr", "2001:db8::1/128", "allow")),
    ({"type": "cidr", "value": "2001:db8::1/32", "action": "allow"},
     Rule("cidr", "2001:db8::/32", "allow")),
    ({"type": "cidr", "value": "10.0.0.0/8", "action": "allow", "ports": []},
     Rule("cidr", "10.0.0.0/8", "allow")),
    ({"type": "cidr", "value": "10.0.0.0/8", "action": "allow",
      "ports": [{"protocol": "icmp"}, {"port": 0, "protocol": "icmp"}]},
     Rule("cidr", "10.0.0.0/8", "allow", (PortSpec(0, "icmp"),))),
    ({"type": "hostname", "value": "a.com", "action": "allow",
      "ports": [{"port": 443, "protocol": "tcp"}, {"port": 443, "protocol": "tcp"}]},
     Rule("hostname", "a.com", "allow", (PortSpec(443, "tcp"),))),
    ({"type": "hostname", "value": "a.com", "action": "allow",
      "ports": [{"Port": 0, "Protocol": "all"}, {"port": 65535, "protocol": "udp"}]},
     Rule("hostname", "a.com", "allow", (PortSpec(0, "all"), PortSpec(65535, "udp")))),
]


@pytest.mark.parametrize("raw, expected", NORMALIZED)
def test_rule_values_are_normalized(raw, expected):
    assert load({"rules": [raw]}).rules == (expected,)


def rule(**fields):
    base = {"type": "hostname", "value": "a.com", "action": "allow"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


INVALID = [
    ({"defaultAction": "block"},
     'policy.json: defaultAction: unknown action "block" (use allow or deny)'),
    ({"defaultAction": "Allow"},
     'policy.json: defaultAction: unknown action "Allow" (use allow or deny)'),
    ([], "policy.json: expected a JSON object with defaultAction and rules"),
    ({"rules": {"type": "hostname"}},
     'policy.json: rules: expected a list, found {"type": "hostname"}'),
    ({"rules": ["a.com"]},
     "policy.json: rules[0]: expected an object with type, value, action and ports"),
    ({"rules": [rule(type="host")]},
     'policy.json: rules[0].type: unknown type "host" (use hostname or cidr)'),
    ({"rules": [rule(type=None)]},
     "policy.json: rules[0].type: missing type (use hostname or cidr)"),
    ({"rules": [rule(action="block")]},
     'policy.json: rules[0].action: unknown action "block" (use allow or deny)'),
    ({"rules": [rule(action=None)]},
     "policy.json: rules[0].action: missing action (use allow or deny)"),
    ({"rules": [rule(value="")]},
     'policy.json: rules[0].value: expected a hostname or CIDR, found ""'),
    ({"rules": [rule(value=None)]},
     "policy.json: rules[0].value: expected a hostname or CIDR, found null"),
    ({"rules": [rule(value=5)]},
     "policy.json: rules[0].value: expected a hostname or CIDR, found 5"),
    ({"rules": [rule(ports=[{"port": 443, "protocol": "TCP"}])]},
     'policy.json: rules[0].ports[0].protocol: unknown protocol "TCP" (use all, tcp, udp or icmp)'),
    ({"rules": [rule(ports=[{"port": 443}])]},
     "policy.json: rules[0].ports[0].protocol: missing protocol (use all, tcp, udp or icmp)"),
    ({"rules": [rule(ports=[{"protocol": "tcp"}])]},
     "policy.json: rules[0].ports[0].port: missing port"),
    ({"rules": [rule(ports=[{"port": 70000, "protocol": "tcp"}])]},
     "policy.json: rules[0].ports[0].port: port 70000 is outside 0-65535"),
    ({"rules": [rule(ports=[{"port": -1, "protocol": "udp"}])]},
     "policy.json: rules[0].ports[0].port: port -1 is outside 0-65535"),
    ({"rules": [rule(ports=[{"port": 443.5, "protocol": "tcp"}])]},
     "policy.json: rules[0].ports[0].port: expected a whole number, found 443.5"),
    ({"rules": [rule(ports=[{"port": "443", "protocol": "tcp"}])]},
     'policy.json: rules[0].ports[0].port: expected a whole number, found "443"'),
    ({"rules": [rule(ports=[{"port": True, "protocol": "tcp"}])]},
     "policy.json: rules[0].ports[0].port: expected a whole number, found true"),
    ({"rules": [rule(ports=[{"port": 8, "protocol": "icmp"}])]},
     "policy.json: rules[0].ports[0].port: icmp has no ports: use 0 or leave it out, not 8"),
    ({"rules": [rule(ports={"port": 443})]},
     'policy.json: rules[0].ports: expected a list of {port, protocol} objects, '
     'found {"port": 443}'),
    ({"rules": [rule(ports=[443])]},
     "policy.json: rules[0].ports[0]: expected an object with port and protocol"),
    ({"rules": [rule(type="cidr", value="2001:db8::/32", ports=[{"protocol": "icmp"}])]},
     "policy.json: rules[0].ports[0].protocol: icmp is IPv4-only, not for the IPv6 CIDR "
     "2001:db8::/32 (ICMPv6 always passes)"),
    ({"rules": [rule(type="cidr", value="10.0.0.300/8")]},
     'policy.json: rules[0].value: invalid CIDR "10.0.0.300/8"'),
    ({"rules": [rule(type="cidr", value="10.0.0.0/33")]},
     'policy.json: rules[0].value: invalid CIDR "10.0.0.0/33"'),
    ({"rules": [rule(type="cidr", value="github.com")]},
     'policy.json: rules[0].value: invalid CIDR "github.com"'),
    ({"rules": [rule(value="foo*.com")]},
     'policy.json: rules[0].value: "foo*.com": partial wildcard "foo*" ("*" and "**" must be '
     'whole labels)'),
    ({"rules": [rule(value="a..com")]},
     'policy.json: rules[0].value: "a..com" has an empty label (leading, trailing or doubled ".")'),
    ({"rules": [rule(value="github.com.")]},
     'policy.json: rules[0].value: "github.com." has an empty label (leading, trailing or '
     'doubled ".")'),
    ({"rules": [rule(value="**.**.com")]},
     'policy.json: rules[0].value: "**.**.com": "**.**" is redundant, "**" already matches one '
     "or more labels"),
    ({"rules": [rule(value="***.com")]},
     'policy.json: rules[0].value: "***.com": partial wildcard "***" ("*" and "**" must be '
     "whole labels)"),
    ({"rules": [rule(value="10.0.0.1")]},
     'policy.json: rules[0].value: "10.0.0.1" is an IP address: use a cidr rule'),
    ({"rules": [rule(value="exa mple.com")]},
     'policy.json: rules[0].value: "exa mple.com": label "exa mple" must be 1-63 characters of '
     'a-z, 0-9, "-" and "_"'),
    ({"rules": [rule(autoAddedType=3)]},
     "policy.json: rules[0].autoAddedType: expected a string, found 3"),
    ({"searchDomains": "corp.example.com"},
     'policy.json: searchDomains: expected a list, found "corp.example.com"'),
    ({"searchDomains": [""]}, "policy.json: searchDomains[0]: empty search domain"),
    ({"searchDomains": ["."]}, "policy.json: searchDomains[0]: empty search domain"),
    ({"searchDomains": [7]}, "policy.json: searchDomains[0]: expected a string, found 7"),
    ({"searchDomains": ["internal"]},
     'policy.json: searchDomains[0]: ".internal" needs at least two labels (a single label is '
     "a top-level domain)"),
    ({"searchDomains": ["svc.cluster.local"]},
     'policy.json: searchDomains[0]: ".svc.cluster.local" is a Kubernetes suffix, which is '
     "always stripped and never bypasses"),
    ({"searchDomains": ["co.uk"]},
     'policy.json: searchDomains[0]: ".co.uk" is a public suffix: it would match names of '
     "unrelated owners"),
    ({"searchDomains": ["github.io"]},
     'policy.json: searchDomains[0]: ".github.io" is a public suffix: it would match names of '
     "unrelated owners"),
    ({"searchDomains": ["-bad.example.com"]},
     'policy.json: searchDomains[0]: ".-bad.example.com": label "-bad" must be 1-63 characters '
     'of a-z, 0-9 and "-", not starting or ending with "-" (use punycode for other scripts)'),
    ({"searchDomains": ["bücher.example.com"]},
     'policy.json: searchDomains[0]: ".bücher.example.com": label "bücher" must be 1-63 '
     'characters of a-z, 0-9 and "-", not starting or ending with "-" (use punycode for other '
     "scripts)"),
]


@pytest.mark.parametrize("document, line", INVALID)
def test_every_validation_error_names_source_position_and_field(document, line):
    assert problems(document) == [line]


@pytest.mark.parametrize("domain", [
    ".compute.internal", "ec2.internal", "corp.example.com", "xn--bcher-kva.example.com",
    "internal.cloudapp.net", "svc.cluster.local.corp.example.com",
])
def test_good_search_domains_are_accepted(domain):
    assert load({"searchDomains": [domain]}).search_domains == ("." + domain.lstrip("."),)


def test_all_problems_are_collected_and_the_message_is_the_first():
    with pytest.raises(PolicyError) as caught:
        load({"defaultAction": "block",
              "rules": [rule(action="permit"), rule(),
                        rule(ports=[{"port": 1, "protocol": "sctp"},
                                    {"port": 99999, "protocol": "tcp"}])]})
    assert caught.value.lines == (
        'policy.json: defaultAction: unknown action "block" (use allow or deny)',
        'policy.json: rules[0].action: unknown action "permit" (use allow or deny)',
        'policy.json: rules[2].ports[0].protocol: unknown protocol "sctp" '
        '(use all, tcp, udp or icmp)',
        "policy.json: rules[2].ports[1].port: port 99999 is outside 0-65535",
    )
    assert str(caught.value) == caught.value.lines[0]


@pytest.mark.parametrize("text, line", [
    ('{"rules": [}', "p.json:1:12: invalid JSON: Expecting value"),
    ('{\n  "defaultAction": "deny",\n  "rules": [\n    {"type": "cidr",}\n  ]\n}',
     "p.json:4:21: invalid JSON: Expecting property name enclosed in double quotes"),
    ("", "p.json:1:1: invalid JSON: Expecting value"),
])
def test_invalid_json_gives_file_line_column(text, line):
    with pytest.raises(InvalidPolicy) as caught:
        policy_from_text(text, "p.json")
    assert caught.value.lines == (line,)


def test_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(InvalidPolicy) as caught:
        load_policy_file(tmp_path / "missing.json")
    missing = tmp_path / "missing.json"
    assert str(caught.value) == f"{missing}: cannot read: No such file or directory"


MERGES = [
    (["allow a.com 443/tcp", "allow a.com 80/tcp"], [("a.com", "allow", "443/tcp 80/tcp")]),
    (["allow a.com 443/tcp", "allow a.com"], [("a.com", "allow", "")]),
    (["allow a.com", "allow a.com 443/tcp"], [("a.com", "allow", "")]),
    (["allow a.com 443/tcp", "deny a.com 443/tcp"],
     [("a.com", "allow", "443/tcp"), ("a.com", "deny", "443/tcp")]),
    (["allow a.com 443/tcp", "allow b.com", "allow a.com 443/tcp 22/tcp"],
     [("a.com", "allow", "443/tcp 22/tcp"), ("b.com", "allow", "")]),
    (["allow 10.1.2.3/8 443/tcp", "allow 10.0.0.0/8 53/udp"],
     [("10.0.0.0/8", "allow", "443/tcp 53/udp")]),
    (["allow A.com 1/tcp", "allow a.com 2/tcp"], [("a.com", "allow", "1/tcp 2/tcp")]),
]


@pytest.mark.parametrize("specs_, expected", MERGES)
def test_duplicates_merge_at_the_first_position(specs_, expected):
    policy = make_policy(*specs_)
    assert [(r.value, r.action, r.ports) for r in policy.rules] == [
        (value, action, specs(ports)) for value, action, ports in expected]


def test_merge_keeps_the_first_auto_added_type():
    policy = load({"rules": [rule(autoAddedType="dns", ports=[{"port": 53, "protocol": "udp"}]),
                             rule(autoAddedType="github_service")]})
    assert policy.rules == (Rule("hostname", "a.com", "allow", (), "dns"),)


# ------------------------------------------------------------------ environment form


@pytest.mark.parametrize("entry, host, ports", [
    ("github.com", "github.com", []),
    ("github.com:443", "github.com", [443]),
    ("github.com:443;80", "github.com", [443, 80]),
    ("github.com: 443 ; 80 ;", "github.com", [443, 80]),
    ("github.com:", "github.com", []),
    ("github.com: ", "github.com", []),
    ("github.com:;", "github.com", []),
    ("10.0.0.0/8", "10.0.0.0/8", []),
    ("10.0.0.0/8:443", "10.0.0.0/8", [443]),
    ("1.2.3.4:53", "1.2.3.4", [53]),
    ("2001:db8::1", "2001:db8::1", []),
    ("2001:db8::/32", "2001:db8::/32", []),
    ("2001:db8::/32:443", "2001:db8::/32", [443]),
    ("[2001:db8::1]:443;8443", "2001:db8::1", [443, 8443]),
    ("[2001:db8::1]", "2001:db8::1", []),
    ("a.com:0;65535", "a.com", [0, 65535]),
])
def test_environment_entry_grammar(entry, host, ports):
    assert split_entry(entry) == (host, ports)


def settings(**values):
    return Settings.from_env({f"SLUICE_{k.upper()}": v for k, v in values.items()})


@pytest.mark.parametrize("values, line", [
    ({"default_action": "block"},
     'SLUICE_DEFAULT_ACTION: unknown action "block" (use allow or deny)'),
    ({"allowed_hosts": "github.com:abc"},
     'SLUICE_ALLOWED_HOSTS: "github.com:abc": port "abc" is not a number'),
    ({"allowed_hosts": "github.com:70000"},
     'SLUICE_ALLOWED_HOSTS: "github.com:70000": port 70000 is outside 0-65535'),
    ({"allowed_hosts": "github.com:-1"},
     'SLUICE_ALLOWED_HOSTS: "github.com:-1": port "-1" is not a number'),
    ({"allowed_cidrs": "2001:db8::zz:443"},
     'SLUICE_ALLOWED_CIDRS: "2001:db8::zz:443": an IPv6 address with ports needs brackets, '
     "e.g. [2001:db8::1]:443"),
    ({"allowed_cidrs": "[2001:db8::1:443"},
     'SLUICE_ALLOWED_CIDRS: "[2001:db8::1:443": "[" without a closing "]"'),
    ({"allowed_cidrs": "[2001:db8::1]443"},
     'SLUICE_ALLOWED_CIDRS: "[2001:db8::1]443": expected ":" and ports after "]", found "443"'),
    ({"blocked_cidrs": "10.0.0.300/8"},
     'SLUICE_BLOCKED_CIDRS: "10.0.0.300/8": invalid CIDR "10.0.0.300/8"'),
    ({"blocked_hosts": "*bad.com"},
     'SLUICE_BLOCKED_HOSTS: "*bad.com": "*bad.com": partial wildcard "*bad" ("*" and "**" must '
     "be whole labels)"),
    ({"allowed_hosts": "8.8.8.8:53"},
     'SLUICE_ALLOWED_HOSTS: "8.8.8.8:53": "8.8.8.8" is an IP address: use a cidr rule'),
    ({"search_domains": "corp.example.com,"}, "SLUICE_SEARCH_DOMAINS[1]: empty search domain"),
    ({"search_domains": "corp.example.com, ,x.example.com"},
     "SLUICE_SEARCH_DOMAINS[1]: empty search domain"),
    ({"search_domains": "com"},
     'SLUICE_SEARCH_DOMAINS[0]: ".com" needs at least two labels (a single label is a top-level '
     "domain)"),
])
def test_environment_errors_name_the_variable(values, line):
    with pytest.raises(InvalidPolicy) as caught:
        policy_from_settings(settings(**values))
    assert caught.value.lines == (line,)


def test_environment_rules_keep_cargowalls_creation_order():
    policy = policy_from_settings(settings(
        default_action="deny", allowed_hosts="github.com:443, api.example.com",
        allowed_cidrs="10.0.0.0/8:443;80,[2001:db8::1]:53", blocked_hosts="api.example.com",
        blocked_cidrs="10.9.0.0/16", search_domains="corp.example.com, Compute.Internal"))
    assert [(r.type, r.value, r.action, r.ports) for r in policy.rules] == [
        ("hostname", "github.com", "allow", (PortSpec(443, "all"),)),
        ("hostname", "api.example.com", "allow", ()),
        ("cidr", "10.0.0.0/8", "allow", (PortSpec(443, "all"), PortSpec(80, "all"))),
        ("cidr", "2001:db8::1/128", "allow", (PortSpec(53, "all"),)),
        ("hostname", "api.example.com", "deny", ()),
        ("cidr", "10.9.0.0/16", "deny", ()),
    ]
    assert policy.search_domains == (".corp.example.com", ".compute.internal")
    assert policy.match_hostname("api.example.com").deny_rule == "api.example.com"
    assert policy.source == "environment"


@pytest.mark.parametrize("values, default", [
    ({"default_action": "allow"}, "allow"),
    ({"default_action": ""}, None),
    ({"allowed_hosts": "a.com"}, "deny"),
    ({"search_domains": "corp.example.com"}, "deny"),
    ({}, None),
])
def test_environment_form_is_used_when_any_setting_is_set(values, default):
    policy = policy_from_settings(settings(**values))
    assert (policy.default_action if policy else None) == default


def test_load_policy_prefers_the_environment_form(tmp_path, caplog):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"defaultAction": "allow", "rules": [rule()]}))
    from_file = load_policy(settings(policy=str(path)))
    assert (from_file.default_action, from_file.source) == ("allow", str(path))
    with caplog.at_level("INFO", logger="policy"):
        from_env = load_policy(settings(policy=str(path), blocked_hosts="a.com"))
    assert (from_env.default_action, from_env.source) == ("deny", "environment")
    assert str(path) in caplog.text


def test_the_bundled_default_policy_loads():
    assert load_policy(settings()).default_action == "deny"
