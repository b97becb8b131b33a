"""notify's pure parts (keys, dedup, backoff, what may be logged) and its clients."""

import logging
import socket
import subprocess
import sys

import pytest

from pipeline.errors import SettingsError
from pipeline.notify import (DeliveryError, LogClient, Notification, NotificationTracker,
                             destination_key, retry_delay, sink_origin)
from pipeline.webhook import WebhookClient
from tests.support.tools.httpsink import HttpSink

T0 = 1_764_000_000_123_000_000
TOKEN = "tok-3f9a-very-secret"


@pytest.mark.parametrize("hostname, ip, port, key", [
    ("github.com", "140.82.112.3", 443, "github.com:443"),
    ("", "140.82.112.3", 443, "140.82.112.3:443"),
    ("", "fd00::1", 47, "fd00::1:47"),  # a protocol block: the protocol number
])
def test_destination_keys(hostname, ip, port, key):
    assert destination_key(hostname, ip, port) == key


class Recorder:
    """A StateMachineClient at the edge: records, or refuses while `refuse` is set."""

    def __init__(self) -> None:
        self.sent: list[Notification] = []
        self.refuse = False

    def send(self, notification: Notification) -> None:
        if self.refuse:
            raise DeliveryError("refused")
        self.sent.append(notification)


def test_the_tracker_sends_once_per_destination_and_releases_on_failure():
    client = Recorder()
    tracker = NotificationTracker(client, notified=["old.example:443"])
    assert tracker.send_notification("a.example", "1.1.1.1", 443, process="curl",
                                     first_seen_ns=T0, mode="enforce")
    assert not tracker.send_notification("a.example", "1.1.1.2", 443)   # same key
    assert tracker.send_notification("", "1.1.1.1", 443)                # another key
    assert not tracker.send_notification("old.example", "9.9.9.9", 443)  # notified before
    client.refuse = True
    with pytest.raises(DeliveryError):
        tracker.send_notification("b.example", "2.2.2.2", 80)
    client.refuse = False
    assert tracker.send_notification("b.example", "2.2.2.2", 80), "a failed key is released"
    tracker.release("a.example:443")
    assert tracker.send_notification("a.example", "1.1.1.1", 443)
    assert [n.key for n in client.sent] == [
        "a.example:443", "1.1.1.1:443", "b.example:80", "a.example:443"]
    assert (client.sent[0].process, client.sent[0].first_seen_ns) == ("curl", T0)


@pytest.mark.parametrize("attempt, rand, delay", [
    (1, 0.0, 0.5), (1, 1.0, 1.0), (2, 0.5, 1.5), (3, 0.0, 2.0), (7, 1.0, 60.0),
    (30, 0.0, 30.0),  # capped, and no overflow for a large attempt number
])
def test_retry_delays_double_with_jitter_in_the_upper_half(attempt, rand, delay):
    assert retry_delay(attempt, lambda: rand) == delay


@pytest.mark.parametrize("url, shown", [
    ("https://hooks.example.com/services/T0/B0/XYZ", "https://hooks.example.com"),
    ("http://user:pw@10.0.0.5:8080/hook?token=abc", "http://10.0.0.5:8080"),
    ("http://[fd00::5]:9000/h", "http://[fd00::5]:9000"),
])
def test_only_scheme_host_and_port_of_the_url_are_ever_shown(url, shown):
    assert sink_origin(url) == shown


def notification(key="a.example:443"):
    return Notification(key, "a.example", "1.1.1.1", 443, "TCP", "curl", T0, "enforce",
                        "connection_blocked")


def test_the_webhook_posts_json_with_the_bearer_token():
    with HttpSink() as sink:
        WebhookClient(sink.url, TOKEN, host="runner-7").send(notification())
    [request] = sink.requests
    assert request["path"] == "/hook/secret-path"
    assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["body"] == {
        "hostname": "a.example", "ip": "1.1.1.1", "port": 443, "protocol": "TCP",
        "process": "curl", "first_seen": "2025-11-24T16:00:00.123Z", "mode": "enforce",
        "event_type": "connection_blocked", "host": "runner-7"}


def test_no_token_no_authorization_header():
    with HttpSink() as sink:
        WebhookClient(sink.url).send(notification())
    assert "Authorization" not in sink.requests[0]["headers"]


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("sink_args, message", [
    ({"fail_first": 1}, "HTTP 500"),
    ({"fail_first": 1, "fail_status": 401}, "HTTP 401"),
])
def test_failures_say_why_without_url_or_token(sink_args, message):
    with HttpSink(**sink_args) as sink:
        with pytest.raises(DeliveryError) as failure:
            WebhookClient(sink.url, TOKEN).send(notification())
    assert str(failure.value) == message
    assert failure.value.__cause__ is None and failure.value.__context__ is None


def test_an_unreachable_sink_fails_without_url_or_token():
    url = f"http://127.0.0.1:{unused_port()}/hook/secret-path"
    with pytest.raises(DeliveryError) as failure:
        WebhookClient(url, TOKEN).send(notification())
    assert str(failure.value) == "connection refused"
    assert failure.value.__context__ is None


def test_a_stalled_sink_times_out():
    with HttpSink(delay=2) as sink:
        with pytest.raises(DeliveryError, match="^timed out$"):
            WebhookClient(sink.url, TOKEN, timeout=0.2).send(notification())


def test_a_redirect_is_a_failure_and_the_token_does_not_follow_it():
    with HttpSink() as elsewhere:
        with HttpSink(fail_first=1, fail_status=307, redirect_to=elsewhere.url) as sink:
            with pytest.raises(DeliveryError, match="^HTTP 307$"):
                WebhookClient(sink.url, TOKEN).send(notification())
    assert elsewhere.requests == []


@pytest.mark.parametrize("url", ["ftp://example.com/x", "not a url", "https:///nohost"])
def test_a_webhook_url_must_be_http_and_is_not_repeated_in_the_error(url):
    with pytest.raises(SettingsError) as failure:
        WebhookClient(url)
    assert url not in str(failure.value)


def test_the_client_repr_shows_neither_path_nor_token():
    text = repr(WebhookClient("https://hooks.example.com/services/XYZ", TOKEN))
    assert text == "WebhookClient(https://hooks.example.com)"


def test_without_a_webhook_each_notification_is_one_log_line(caplog):
    caplog.set_level(logging.WARNING)
    LogClient(logging.getLogger("sluice.notify")).send(notification())
    assert caplog.messages == [
        "blocked destination a.example:443 (1.1.1.1 TCP, process curl, enforce mode, "
        "first seen 2025-11-24T16:00:00.123Z)"]


def test_log_client_summarizes_a_flood_of_new_destinations(caplog):
    import logging

    from pipeline.notify import LogClient, Notification

    now = [100.0]
    client = LogClient(logging.getLogger("notify-test"), per_second=3, clock=lambda: now[0])
    sample = Notification(key="x:1", hostname="", ip="192.0.2.1", port=1, protocol="UDP",
                          process="p", first_seen_ns=1, mode="audit",
                          event_type="connection_blocked")
    with caplog.at_level(logging.WARNING, logger="notify-test"):
        for _ in range(10):
            client.send(sample)
        now[0] += 1.5
        client.send(sample)
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if line.startswith("blocked destination")]) == 4
    assert "7 more new blocked destinations were not logged" in lines[3]


def test_the_notify_stage_without_a_url_leaves_sqlalchemy_and_http_unloaded():
    """Its memory of delivered destinations, the only use of SQL here, is for a webhook,
    and so is the HTTP client."""
    probe = ("import sys, pipeline.stages.notify; "
             "print([m for m in ('sqlalchemy', 'urllib.request', 'ssl') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout == "[]\n"
