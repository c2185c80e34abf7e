"""The key service's metrics, probes, `status` and logs, against the real daemon."""

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def _vault_and_key(d, vault: str) -> None:
    status, body = d.http("POST", "/vaults", {"name": vault, "location": "local", "subscription": "s1"})
    assert status in (200, 201), body
    status, body = d.http("POST", f"/vaults/{vault}/keys/k1/create", {"kty": "RSA", "key_size": 2048})
    assert status == 200, body


def test_operations_and_wrap_latency_move(daemon):
    _vault_and_key(daemon, "obsv1")
    before = scrape(daemon.url)
    value = base64.urlsafe_b64encode(os.urandom(64)).rstrip(b"=").decode()
    status, wrapped = daemon.http("POST", "/vaults/obsv1/keys/k1/wrapkey", {"alg": "RSA-OAEP-256", "value": value})
    assert status == 200, wrapped
    status, _ = daemon.http("POST", "/vaults/obsv1/keys/k1/unwrapkey",
                            {"alg": "RSA-OAEP-256", "value": wrapped["value"]})
    assert status == 200
    status, _ = daemon.http("GET", "/vaults/obsv1/keys/nokey")
    assert status == 404
    after = scrape(daemon.url)  # no token: nothing in it is a tenant's

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)
    assert delta("keyservice_operations_total", operation="KeyWrap", result="ok") == 1
    assert delta("keyservice_operations_total", operation="KeyUnwrap", result="ok") == 1
    assert delta("keyservice_operations_total", operation="KeyGet", result="KeyNotFound") == 1
    assert delta("keyservice_operation_latency_seconds_count", operation="KeyUnwrap") == 1
    assert delta("keyservice_audit_entries") >= 3
    assert sample(after, "keyservice_audit_chains") >= 1
    text = urllib.request.urlopen(daemon.url + "/metrics", timeout=30).read().decode()
    assert "obsv1" not in text


def test_event_subscribers_counted(daemon):
    req = urllib.request.Request(daemon.url + "/events", headers={
        "Authorization": f"Bearer {daemon.token(daemon.admin)}"})
    before = sample(scrape(daemon.url), "keyservice_event_subscribers")
    with urllib.request.urlopen(req, timeout=30) as stream:
        assert stream.readline()  # the stream is open once its first line came
        assert sample(scrape(daemon.url), "keyservice_event_subscribers") == before + 1


def test_health_ready_and_status(daemon):
    for path in ("/healthz", "/readyz"):
        status, body = daemon.http("GET", path, token=None)
        assert status == 200, body
    status, body = daemon.http("GET", "/readyz", token=None)
    assert body["status"] == "ready" and body["auditEntries"] >= 1, body
    r = daemon.cli("status")
    shown = json.loads(r.stdout)
    assert shown["ready"] is True and shown["url"] == daemon.url and shown["auditEntries"] >= 1, shown


def test_status_of_a_stopped_service_exits_3(tmp_path):
    env = dict(os.environ, KEYSERVICE_URL=f"http://127.0.0.1:{free_port()}")
    r = subprocess.run([sys.executable, "-m", "keyservice", "status"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 3 and "connection refused" in r.stderr, (r.returncode, r.stderr)


def test_json_log_lines_and_metrics_listener(make_daemon):
    port = free_port()
    d = make_daemon(extra_args=["--log-format", "json", "--metrics-listen", f"127.0.0.1:{port}"])
    status, _ = d.http("GET", "/vaults")
    assert status == 200
    assert sample(scrape(f"http://127.0.0.1:{port}"), "keyservice_operations_total",
                  operation="VaultList", result="ok") == 1
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=30).status == 200
    d.stop()
    lines = [json.loads(x) for x in d.stderr().splitlines() if x.strip()]
    calls = [r for r in lines if r.get("operation") == "VaultList"]
    assert calls and len(calls[0]["request_id"]) == 36 and calls[0]["level"] == "INFO", lines
    assert not [r for r in lines if r["level"] in ("WARNING", "ERROR")], lines


def test_unknown_log_level_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "keyservice", "serve", "--data-dir", str(tmp_path / "d"),
                        "--log-level", "chatty"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--log-level" in r.stderr and "chatty" in r.stderr, r.stderr


def test_metrics_listener_caps_connections(make_daemon):
    """A flood of connections to --metrics-listen is turned away, not served."""
    import socket

    from daemonkit.metrics import LISTENER_LIMITS
    from tests.helpers.servers import wait_until
    port = free_port()
    make_daemon(extra_args=["--metrics-listen", f"127.0.0.1:{port}"])
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(LISTENER_LIMITS.max_connections)]

    def turned_away() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            try:
                return s.recv(64).startswith(b"HTTP/1.1 503")
            except TimeoutError:
                return False  # accepted: the held ones are not all counted yet
    try:
        wait_until(turned_away, 15, interval=0.05, what="a connection past the cap answered 503")
    finally:
        for s in held:
            s.close()
    # Served again once the listener has seen the held ones close (not at once: a close is
    # noticed by the daemon's loop, and until then they still count against the cap).
    def served() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30).status == 200
        except urllib.error.HTTPError as e:
            assert e.code == 503, e  # only the cap may refuse it
            return False
    wait_until(served, 15, interval=0.05, what="the listener to serve again")
