"""CI presets: which preset a job gets, and what it allows and tags."""

import pytest

from pipeline.policy.autoallow import get_auto_allowed_type
from pipeline.policy.cipresets import ci_service_allows, preset_endpoints, service_endpoint
from pipeline.policy.model import Policy
from pipeline.settings import Settings


@pytest.mark.parametrize("env, preset", [
    ({}, ""),
    ({"GITHUB_ACTIONS": "true"}, "github"),
    ({"GITLAB_CI": "true"}, "gitlab"),
    ({"GITHUB_ACTIONS": "false"}, ""),
    ({"GITHUB_ACTIONS": "true", "SLUICE_CI": "off"}, ""),
    ({"SLUICE_CI": "gitlab"}, "gitlab"),
    ({"GITHUB_ACTIONS": "true", "SLUICE_CI": "gitlab"}, "gitlab"),
])
def test_the_preset_is_chosen_or_detected(env, preset):
    assert Settings.from_env(env).ci_preset == preset


def test_a_bad_preset_names_the_variable():
    from pipeline.errors import SettingsError

    with pytest.raises(SettingsError, match="^SLUICE_CI='jenkins'"):
        Settings.from_env({"SLUICE_CI": "jenkins"})


@pytest.mark.parametrize("value, endpoint", [
    ("https://pipelines.actions.example/abc/", ("pipelines.actions.example", 443)),
    ("http://cache.example:8080/x?y", ("cache.example", 8080)),
    ("registry.gitlab.example", ("registry.gitlab.example", 443)),
    ("gitlab.example:5050", ("gitlab.example", 5050)),
    ("https://[2001:db8::7]:8443/", ("2001:db8::7", 8443)),
    ("https://Token.Example./", ("token.example", 443)),
    ("", None),
    ("https://:443/", None),
    ("https://host.example:99999/", None),
])
def test_service_endpoints(value, endpoint):
    assert service_endpoint(value) == endpoint


def test_the_job_token_never_reaches_the_settings():
    settings = Settings.from_env({"CI_REPOSITORY_URL":
                                  "https://gitlab-ci-token:glcbt-SECRET@gitlab.example/g/p.git"})
    assert "SECRET" not in repr(settings)
    assert settings.ci_env["CI_REPOSITORY_URL"] == "https://gitlab.example/g/p.git"


GITHUB_ENV = {"GITHUB_ACTIONS": "true",
              "ACTIONS_RUNTIME_URL": "https://runtime.ci.test/abc/",
              "ACTIONS_RESULTS_URL": "https://results.ci.test:8443/",
              "ACTIONS_CACHE_URL": "https://runtime.ci.test/cache/",
              "ACTIONS_ID_TOKEN_REQUEST_URL": "https://198.51.100.20/token?x=1",
              "SLUICE_GITHUB_SERVICE_HOSTS": "github.com,api.github.com"}


def test_github_preset_endpoints():
    settings = Settings.from_env(GITHUB_ENV)
    assert preset_endpoints("github", settings.github_service_hosts, settings.ci_env) == {
        "github.com": {443}, "api.github.com": {443}, "runtime.ci.test": {443},
        "results.ci.test": {8443}, "198.51.100.20": {443}}


def test_github_preset_allows_and_tags():
    policy = ci_service_allows(Policy("deny"), Settings.from_env(GITHUB_ENV))
    tagged = {(r.type, r.value, tuple((p.port, p.protocol) for p in r.ports))
              for r in policy.rules if r.auto_added_type == "github_service"}
    assert tagged == {("hostname", "github.com", ((443, "tcp"),)),
                      ("hostname", "api.github.com", ((443, "tcp"),)),
                      ("hostname", "runtime.ci.test", ((443, "tcp"),)),
                      ("hostname", "results.ci.test", ((8443, "tcp"),)),
                      ("cidr", "198.51.100.20/32", ((443, "tcp"),))}
    assert get_auto_allowed_type(policy, "192.0.2.1", 443, "tcp", "runtime.ci.test") == \
        "github_service"
    assert get_auto_allowed_type(policy, "198.51.100.20", 443, "tcp") == "github_service"
    assert get_auto_allowed_type(policy, "192.0.2.1", 80, "tcp", "runtime.ci.test") == ""


def test_gitlab_preset_uses_the_default_hosts_and_the_ci_urls():
    settings = Settings.from_env({"GITLAB_CI": "true", "CI_SERVER_URL": "https://git.corp.example",
                                  "CI_REGISTRY": "registry.corp.example:5050"})
    policy = ci_service_allows(Policy("deny"), settings)
    tagged = {r.value for r in policy.rules if r.auto_added_type == "gitlab_service"}
    assert tagged == {"gitlab.com", "registry.gitlab.com", "git.corp.example",
                      "registry.corp.example"}


def test_a_host_the_policy_already_allows_keeps_the_users_rule():
    from pipeline.policy.load import policy_from_text

    policy = policy_from_text('{"defaultAction": "deny", "rules": [{"type": "hostname", '
                              '"value": "github.com", "action": "allow"}]}', "p")
    result = ci_service_allows(policy, Settings.from_env({"GITHUB_ACTIONS": "true"}))
    assert [r.auto_added_type for r in result.rules if r.value == "github.com"] == [""]


def test_no_preset_adds_nothing():
    policy = Policy("deny")
    assert ci_service_allows(policy, Settings.from_env({})) is policy
