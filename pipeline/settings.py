"""The one settings object, built once from SLUICE_* variables and passed down.

Each setting is a row of SETTINGS: name, variable, default, help, parser. Nothing else in
sluice reads os.environ; the README lists every variable (a test checks it).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import SettingsError

BUNDLED_POLICY = Path(__file__).resolve().parent / "data" / "default-policy.json"
GITHUB_SERVICE_HOSTS = ("github.com", "api.github.com", "githubapp.com",
                        "actions.githubusercontent.com", "github.githubassets.com")
GITLAB_SERVICE_HOSTS = ("gitlab.com", "registry.gitlab.com")
# Variables the CI system sets (not sluice settings): which CI runs the job, where its
# services are, where a step's summary and outputs go. Settings keeps only these.
CI_VARIABLES = ("GITHUB_ACTIONS", "GITLAB_CI", "ACTIONS_RUNTIME_URL", "ACTIONS_RESULTS_URL",
                "ACTIONS_CACHE_URL", "ACTIONS_ID_TOKEN_REQUEST_URL", "CI_SERVER_URL",
                "CI_API_V4_URL", "CI_REGISTRY", "CI_REPOSITORY_URL", "CI_PAGES_URL",
                "CI_DEPENDENCY_PROXY_SERVER", "CI_PROJECT_URL", "GITHUB_STEP_SUMMARY",
                "GITHUB_OUTPUT")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _text(raw: str) -> str:
    return raw.strip()


def _path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("must not be empty")
    return Path(raw.strip())


def _optional_path(raw: str) -> Path | None:
    return Path(raw.strip()) if raw.strip() else None


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _optional_positive_int(raw: str) -> int | None:
    return _positive_int(raw) if raw.strip() else None


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("must be a positive number")
    return value


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _group(raw: str) -> str:
    from .private import group_id

    group_id(raw)  # ValueError for a group this machine does not have
    return raw.strip()


def _log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return value


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    variable: str
    default: str
    help: str
    parse: Callable[[str], Any]
    secret: bool = False  # never shown: not in `sluice settings`, a repr or an error


SETTINGS: tuple[Setting, ...] = (
    Setting("mode", "SLUICE_MODE", "audit",
            "audit (report what would be blocked) or enforce (drop it)",
            _choice("audit", "enforce")),
    Setting("policy", "SLUICE_POLICY", str(BUNDLED_POLICY),
            "policy JSON file (cargowall's config.json schema); default: the bundled example",
            _path),
    Setting("interface", "SLUICE_INTERFACE", "",
            "egress interface to filter; empty = the interface of the default route", _text),
    Setting("run_dir", "SLUICE_RUN_DIR", "/run/sluice",
            "directory for ipc sockets, ready markers and counters (created mode 0700)", _path),
    Setting("bpf_dir", "SLUICE_BPF_DIR", "/sys/fs/bpf/sluice",
            "bpffs directory where this instance pins its maps (bpffs is mounted if missing)",
            _path),
    Setting("cgroup", "SLUICE_CGROUP", "",
            "cgroup v2 directory for the socket hooks; empty = the cgroup2 mount root", _text),
    Setting("db", "SLUICE_DB", "sqlite:////var/lib/sluice/audit.db",
            "SQLAlchemy URL of the audit store (SQLite file by default, PostgreSQL for a fleet)",
            _text),
    Setting("audit_log", "SLUICE_AUDIT_LOG", "/var/lib/sluice/audit.jsonl",
            "JSONL audit log, one cargowall-compatible record per line; empty = none",
            _optional_path),
    Setting("journal_dir", "SLUICE_JOURNAL_DIR", "/var/lib/sluice/journal",
            "where capture journals every kernel record before it travels (created mode 0700)",
            _path),
    Setting("journal_max_bytes", "SLUICE_JOURNAL_MAX_BYTES", "536870912",
            "disk the journal may use; records beyond it travel unjournaled (counted)",
            _positive_int),
    Setting("group", "SLUICE_GROUP", "",
            "group that may read the audit store, JSONL log and recordings sluice creates "
            "(files 0640, directories 0750); empty = root only (0600, 0700)", _group),
    Setting("log_level", "SLUICE_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR", _log_level),
    Setting("host", "SLUICE_HOST", "",
            "host name stored with every audit row; empty = this machine's host name", _text),
    Setting("counter_interval", "SLUICE_COUNTER_INTERVAL", "10",
            "seconds between counter log lines of each stage", _positive_float),
    Setting("batch_max", "SLUICE_BATCH_MAX", "512",
            "most records per pipeline message (stages batch to keep up with floods)",
            _positive_int),
    Setting("flush_interval", "SLUICE_FLUSH_INTERVAL", "0.2",
            "seconds persist may hold records before committing them", _positive_float),
    Setting("retention_days", "SLUICE_RETENTION_DAYS", "",
            "persist deletes audit rows older than this many days, in small batches (daily "
            "rollups keep counting them); empty = keep everything", _optional_positive_int),
    Setting("ringbuf_pages", "SLUICE_RINGBUF_PAGES", "1024",
            "kernel ring-buffer size in 4 KiB pages (a power of two)", _positive_int),
    Setting("dns_listen", "SLUICE_DNS_LISTEN", "127.0.0.1:53",
            "comma-separated addresses (host:port) the DNS proxy answers on", _text),
    Setting("dns_upstream", "SLUICE_DNS_UPSTREAM", "",
            "upstream resolver host[:port]; empty = the first /etc/resolv.conf nameserver "
            "that is not this proxy (nor, with the redirect, a resolver on loopback: "
            "systemd-resolved's upstreams instead)", _text),
    Setting("dns_filter", "SLUICE_DNS_FILTER", "true",
            "judge queries by the hostname rules: REFUSED in enforce mode, recorded in audit mode",
            _flag),
    Setting("dns_redirect", "SLUICE_DNS_REDIRECT", "true",
            "send every DNS query (port 53, to any resolver not on loopback) of this host and "
            "its containers to the proxy", _flag),
    Setting("dns_timeout", "SLUICE_DNS_TIMEOUT", "5",
            "seconds to wait for the upstream resolver before answering SERVFAIL", _positive_float),
    Setting("notify_url", "SLUICE_NOTIFY_URL", "",
            "webhook that receives one POST per new blocked destination; empty = log only", _text),
    Setting("notify_token", "SLUICE_NOTIFY_TOKEN", "",
            "bearer token for the webhook (never logged)", _text, secret=True),
    # The export stage (README "Export"). Checked by that stage, which reports a bad value
    # in one line and goes on without that sink: a typo here must not stop the firewall.
    Setting("otlp_endpoint", "SLUICE_OTLP_ENDPOINT", "",
            "OTLP/HTTP collector base URL (/v1/logs is appended); every audit record is sent "
            "there as a log record; empty = off", _text),
    Setting("otlp_headers", "SLUICE_OTLP_HEADERS", "",
            "extra HTTP headers for the collector, key=value,key=value (never logged)", _text,
            secret=True),
    Setting("syslog", "SLUICE_SYSLOG", "",
            "unix:///dev/log, udp://host:port or tcp://host:port: one RFC 5424 line per "
            "blocked, would-deny, late-allowed or refused-DNS record; empty = off", _text),
    Setting("metrics_listen", "SLUICE_METRICS_LISTEN", "",
            "host:port where the export stage serves Prometheus /metrics; empty = off", _text),
    Setting("record", "SLUICE_RECORD", "",
            "record everything that enters enrich to this file, for replay; empty = off",
            _optional_path),
    Setting("record_max_bytes", "SLUICE_RECORD_MAX_BYTES", "268435456",
            "rotate the recording when it reaches this size", _positive_int),
    # The policy in environment form (cargowall's CARGOWALL_* grammar); see README "Policy".
    Setting("default_action", "SLUICE_DEFAULT_ACTION", "",
            "environment policy: allow or deny when no rule matches (empty = deny)", _text),
    Setting("allowed_hosts", "SLUICE_ALLOWED_HOSTS", "",
            "environment policy: comma-separated host[:port;port] entries to allow", _text),
    Setting("allowed_cidrs", "SLUICE_ALLOWED_CIDRS", "",
            "environment policy: comma-separated CIDR[:port;port] entries to allow", _text),
    Setting("blocked_hosts", "SLUICE_BLOCKED_HOSTS", "",
            "environment policy: comma-separated host[:port;port] entries to deny", _text),
    Setting("blocked_cidrs", "SLUICE_BLOCKED_CIDRS", "",
            "environment policy: comma-separated CIDR[:port;port] entries to deny", _text),
    Setting("search_domains", "SLUICE_SEARCH_DOMAINS", "",
            "environment policy: comma-separated search domains stripped before matching", _text),
    Setting("auto_allow_cloud_metadata", "SLUICE_AUTO_ALLOW_CLOUD_METADATA", "false",
            "allow 169.254.169.254:80/tcp and the cloud's resolvers at start-up", _flag),
    Setting("allow_existing_connections", "SLUICE_ALLOW_EXISTING_CONNECTIONS", "true",
            "allow connections already open when sluice starts (scanned before attach)", _flag),
    # CI presets (README "CI"): the services the CI job itself needs, auto-allowed and tagged.
    Setting("ci", "SLUICE_CI", "auto",
            "CI preset: github, gitlab, off, or auto (github when GITHUB_ACTIONS=true, gitlab "
            "when GITLAB_CI=true)", _choice("auto", "github", "gitlab", "off")),
    Setting("github_service_hosts", "SLUICE_GITHUB_SERVICE_HOSTS", ",".join(GITHUB_SERVICE_HOSTS),
            "github preset: comma-separated hosts allowed on 443/tcp (plus the hosts of "
            "ACTIONS_RUNTIME_URL, ACTIONS_RESULTS_URL, ACTIONS_CACHE_URL, "
            "ACTIONS_ID_TOKEN_REQUEST_URL)", _text),
    Setting("gitlab_service_hosts", "SLUICE_GITLAB_SERVICE_HOSTS", ",".join(GITLAB_SERVICE_HOSTS),
            "gitlab preset: comma-separated hosts allowed on 443/tcp (plus the hosts of the "
            "job's CI_* URLs)", _text),
    # The gate (`sluice down`, `sluice report`); their flags override these.
    Setting("fail_on_block", "SLUICE_FAIL_ON_BLOCK", "false",
            "exit non-zero when a destination was blocked (would be, in audit mode) that "
            "the expected-blocks file does not list", _flag),
    Setting("expected_blocks", "SLUICE_EXPECTED_BLOCKS", "",
            "file of destinations expected to be blocked, one `name:port` per line; "
            "empty = none", _optional_path),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str
    policy: Path
    interface: str
    run_dir: Path
    bpf_dir: Path
    cgroup: str
    db: str
    audit_log: Path | None
    journal_dir: Path
    journal_max_bytes: int
    group: str
    log_level: str
    host: str
    counter_interval: float
    batch_max: int
    flush_interval: float
    retention_days: int | None
    ringbuf_pages: int
    dns_listen: str
    dns_upstream: str
    dns_filter: bool
    dns_redirect: bool
    dns_timeout: float
    notify_url: str
    notify_token: str
    otlp_endpoint: str
    otlp_headers: str
    syslog: str
    metrics_listen: str
    record: Path | None
    record_max_bytes: int
    default_action: str
    allowed_hosts: str
    allowed_cidrs: str
    blocked_hosts: str
    blocked_cidrs: str
    search_domains: str
    auto_allow_cloud_metadata: bool
    allow_existing_connections: bool
    ci: str
    github_service_hosts: str
    gitlab_service_hosts: str
    fail_on_block: bool
    expected_blocks: Path | None
    ci_env: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def audit_mode(self) -> bool:
        return self.mode == "audit"

    @property
    def gid(self) -> int | None:
        """SLUICE_GROUP's gid; None when files are for root alone."""
        from .private import group_id

        return group_id(self.group)

    @property
    def host_name(self) -> str:
        return self.host or socket.gethostname()

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Parse every SLUICE_* variable; a bad one raises SettingsError naming it."""
        values: dict[str, Any] = {"ci_env": ci_environment(environ)}
        for setting in SETTINGS:
            raw = environ.get(setting.variable, setting.default)
            try:
                values[setting.name] = setting.parse(raw)
            except ValueError as err:
                raise SettingsError(f"{setting.variable}={shown(setting, raw)!r}: {err}") from None
        for name, raw in overrides.items():
            if raw is None:
                continue
            setting = _BY_NAME[name]
            try:
                values[name] = setting.parse(str(raw)) if isinstance(raw, str) else raw
            except ValueError as err:
                raise SettingsError(f"--{name.replace('_', '-')} {shown(setting, str(raw))!r}: "
                                    f"{err}") from None
        return cls(**values)

    def __repr__(self) -> str:
        # Secrets never reach a log line, even through a repr.
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for setting in SETTINGS:
            if isinstance(values[setting.name], str):
                values[setting.name] = shown(setting, values[setting.name])
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in values.items()) + ")"

    @property
    def ci_preset(self) -> str:
        """github, gitlab or "" (none): SLUICE_CI, or detected from the CI's own variables."""
        if self.ci in ("github", "gitlab"):
            return self.ci
        if self.ci == "auto":
            if self.ci_env.get("GITHUB_ACTIONS", "").lower() == "true":
                return "github"
            if self.ci_env.get("GITLAB_CI", "").lower() == "true":
                return "gitlab"
        return ""

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def shown(setting: Setting, value: str) -> str:
    """A setting's value as it may appear in a log line or an error: secrets hidden, a URL
    as scheme://host[:port] only (user info, a path or a query can each carry a secret:
    many webhooks are one)."""
    if setting.secret:
        return "<hidden>" if value else ""
    scheme, sep, rest = without_credentials(value).partition("://")
    if not sep or scheme == "unix":
        return value
    authority, slash, more = rest.partition("/")
    authority, query, _ = authority.partition("?")
    return f"{scheme}://{authority}" + ("/<hidden>" if more.strip("/") or query else "")


def without_credentials(value: str) -> str:
    """A URL without user and password (CI_REPOSITORY_URL carries a job token)."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def ci_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {name: without_credentials(environ[name].strip()) for name in CI_VARIABLES
            if environ.get(name, "").strip()}


def configure_logging(settings: Settings, name: str) -> logging.Logger:
    """Short format: honcho already prefixes the time and the process name."""
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    return logging.getLogger(name)
