"""The webhook token, the OTLP headers and the credentials of an endpoint URL never show:
not in a log line (DEBUG included), a counter, a metric or an error, whatever the sinks say."""

from __future__ import annotations

import base64
import logging
import urllib.request

from typer.testing import CliRunner

from pipeline import messages
from pipeline.cli.app import app
from pipeline.events import Notice
from pipeline.settings import Settings
from pipeline.stages.export import ExportStage
from pipeline.stages.notify import NotifyStage
from tests.support.exportkit import Store, fast_retry, free_port
from tests.support.stagekit import StageThread, stage_settings
from tests.support.tools.httpsink import HttpSink
from tests.support.tools.otlpreceiver import OtlpReceiver
from tests.support.wait import wait_for

SECRETS = {"token": "tok-S3CRET-1", "header": "hdr-S3CRET-2", "password": "pw-S3CRET-3",
           "query": "q-S3CRET-4", "path": "path-S3CRET-5", "user": "usr-S3CRET-6"}
MARK = "S3CRET"


def otlp_env(collector: OtlpReceiver, metrics_port: int) -> dict:
    host_port = collector.endpoint.split("//")[1]
    return {"SLUICE_OTLP_ENDPOINT": f"http://{SECRETS['user']}:{SECRETS['password']}@"
                                    f"{host_port}/{SECRETS['path']}?key={SECRETS['query']}",
            "SLUICE_OTLP_HEADERS": f"X-Api-Key={SECRETS['header']}",
            "SLUICE_NOTIFY_TOKEN": SECRETS["token"], "SLUICE_LOG_LEVEL": "DEBUG",
            "SLUICE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"}


def test_no_secret_in_logs_counters_metrics_or_errors(tmp_path, caplog, peer):
    caplog.set_level(logging.DEBUG)
    store = Store(f"sqlite:///{tmp_path}/audit.db")
    port = free_port()
    with OtlpReceiver() as collector, HttpSink(fail_first=2, fail_status=403) as webhook:
        env = otlp_env(collector, port)
        settings = stage_settings(tmp_path, SLUICE_NOTIFY_URL=webhook.url + f"?t={MARK}", **env)
        notify = StageThread(NotifyStage(delay=lambda attempt: 0.05), settings).start()
        peer.pusher("notify").send(messages.encode([Notice(
            "connection_blocked", "x.example", "10.7.0.1", 443, "TCP", "curl", 7, 1, "enforce")]))
        collector.answer = 401  # a permanent refusal: logged with its status
        store.add(5)
        export = StageThread(ExportStage(delay=fast_retry), settings).start()
        wait_for(lambda: export.counters().get("otlp_rejected") == 5, "the refused batch")
        collector.down()  # transient failures: logged with their reason
        store.add(5)
        wait_for(lambda: export.counters().get("otlp_failures", 0) >= 2, "failed attempts")
        collector.up()
        collector.answer = 200
        wait_for(lambda: len(collector.records()) == 5, "the later records")
        wait_for(lambda: len(webhook.delivered()) == 1, "the webhook's delivery")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert export.finish() == 0 and notify.finish() == 0
        # The secrets were used: basic authentication, the header, the path and query.
        _, path, headers = collector.requests[-1]
        assert path == f"/{SECRETS['path']}/v1/logs?key={SECRETS['query']}"
        assert headers["X-Api-Key"] == SECRETS["header"]
        assert headers["Authorization"] == "Basic " + base64.b64encode(
            f"{SECRETS['user']}:{SECRETS['password']}".encode()).decode()
        assert webhook.requests[-1]["headers"]["Authorization"] == f"Bearer {SECRETS['token']}"
    store.close()
    logged = "\n".join(caplog.messages)
    assert "HTTP 401" in logged and "cannot deliver" in logged  # the failures are told
    seen = {"logs": logged, "metrics": metrics.decode(), "settings": repr(settings)}
    for path in settings.run_dir.glob("*.*"):
        if path.suffix in (".json", ".failed"):
            seen[path.name] = path.read_text()
    result = CliRunner().invoke(app, ["settings"], env={
        **env, "SLUICE_NOTIFY_URL": "https://u:pw-S3CRET-7@hooks.example/x"})
    assert result.exit_code == 0
    seen["sluice settings"] = result.output
    for where, text in seen.items():
        assert MARK not in text, f"a secret in {where}: {text[text.find(MARK) - 80:][:160]}"


def test_a_bad_secret_setting_is_reported_without_its_value(tmp_path, caplog):
    settings = Settings.from_env({"SLUICE_OTLP_ENDPOINT": "http://u:pw-S3CRET-8@[::1",
                                  "SLUICE_OTLP_HEADERS": f"token:{MARK}",
                                  "SLUICE_RUN_DIR": str(tmp_path / "run")})
    caplog.set_level(logging.DEBUG)
    export = StageThread(ExportStage(), settings).start()
    assert export.finish() == 0
    assert "SLUICE_OTLP_ENDPOINT is not a URL" in caplog.text and MARK not in caplog.text
    settings = settings.replace(otlp_endpoint="http://127.0.0.1:9")
    export = StageThread(ExportStage(), settings).start()
    assert export.finish() == 0
    assert "SLUICE_OTLP_HEADERS entry 1" in caplog.text and MARK not in caplog.text


def test_the_run_record_of_sluice_up_leaves_the_export_secrets_out():
    from pipeline.service import _recorded

    recorded = _recorded({"SLUICE_OTLP_HEADERS": f"k={MARK}", "SLUICE_MODE": "audit",
                          "SLUICE_OTLP_ENDPOINT": f"https://u:{MARK}@c:4318",
                          "SLUICE_NOTIFY_TOKEN": MARK})
    assert recorded == {"SLUICE_MODE": "audit"}
