"""nbdserver's metrics, health probes, `status` and logs, against the real daemons.

Metrics are read the way Prometheus reads them (the text exposition, parsed by
prometheus_client's own parser), before and after what should move them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.platform import ROOT, connect_refused, free_port, wait_for_eio
from tests.helpers.servers import wait_until

REPRS = ("ConnectionKey(", "ClientConnectorError", "Error(")


def scrape(base: str, token: str | None = None) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of one scrape."""
    req = urllib.request.Request(base + "/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_io_moves_the_metrics_by_command(stack):
    stack.create_disk("m1", "--size", "16M")
    before = scrape(stack.api_url, _token(stack))
    h = stack.connect("m1")
    for i in range(3):
        h.pwrite(b"x" * 4096, i * 4096)
    for _ in range(2):
        h.pread(8192, 0)
    h.flush()
    for _ in range(26):  # 32 requests: the latency of every 16th is sampled
        h.pread(4096, 0)

    def all_counted():  # an I/O worker process reports its counts every second
        return sample(scrape(stack.api_url, _token(stack)), "nbdserver_io_requests_total", disk="m1", command="read") == 28
    wait_until(all_counted, 10, interval=0.1, what="the requests counted")
    after = scrape(stack.api_url, _token(stack))  # with the API token: per-disk series
    h.shutdown()

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)
    assert delta("nbdserver_io_requests_total", disk="m1", command="write") == 3
    assert delta("nbdserver_io_bytes_total", disk="m1", command="write") == 3 * 4096
    assert delta("nbdserver_io_requests_total", disk="m1", command="read") == 28
    assert delta("nbdserver_io_bytes_total", disk="m1", command="read") == 2 * 8192 + 26 * 4096
    assert delta("nbdserver_io_requests_total", disk="m1", command="flush") == 1
    timed = sum(delta("nbdserver_io_latency_seconds_count", disk="m1", command=c) for c in ("read", "write", "flush"))
    assert timed == 2
    assert sum(sample(after, "nbdserver_io_latency_seconds_bucket", disk="m1", command=c, le="+Inf")
               for c in ("read", "write", "flush")) == 2
    assert sample(after, "nbdserver_disk_state", disk="m1", state="available") == 1
    assert sample(after, "nbdserver_disk_clients", disk="m1") == 1
    # The platform's calls to the key service (the disk's unwrap when it opened).
    assert sample(after, "nbdserver_keyservice_calls_total", operation="unwrapKey", outcome="ok") >= 1
    assert sample(after, "nbdserver_keyservice_stream_connected") == 1


def test_a_refused_request_counts_by_errno(stack):
    import nbd
    stack.create_disk("m2", "--size", "16M")
    h = nbd.NBD()
    h.set_strict_mode(0)  # let a read past the end reach the server, which says EINVAL
    h.connect_uri(stack.nbd_uri("m2"))
    with pytest.raises(nbd.Error):
        h.pread(4096, 16 << 20)
    wait_until(lambda: sample(scrape(stack.api_url, _token(stack)), "nbdserver_io_errors_total", disk="m2",
                              errno="EINVAL") == 1, 10, interval=0.1, what="the EINVAL counted")
    h.shutdown()


def test_a_revocation_moves_the_revocation_metrics(stack):
    stack.customer_key("metricsvault", "mk", "mdes")
    stack.create_disk("m3", "--size", "16M", "--des", "mdes")
    h = stack.connect("m3")
    h.pread(4096, 0)
    before = scrape(stack.api_url, _token(stack))
    stack.keyservice("key", "disable", "metricsvault", "mk")
    wait_for_eio(h)
    h.shutdown()  # the EIO counted (in an I/O worker: reported as its connection ends)
    wait_until(lambda: sample(scrape(stack.api_url, _token(stack)), "nbdserver_io_errors_total", disk="m3",
                              errno="EIO") >= 1, 10, interval=0.1, what="the EIO counted")
    after = scrape(stack.api_url, _token(stack))
    assert sample(after, "nbdserver_revocations_total") - sample(before, "nbdserver_revocations_total") >= 1
    assert sample(after, "nbdserver_revocation_latency_seconds_count") > \
        sample(before, "nbdserver_revocation_latency_seconds_count")
    assert sample(after, "nbdserver_disk_lock_reason", disk="m3", reason="revoked") == 1
    assert sample(after, "nbdserver_disk_state", disk="m3", state="locked") == 1
    assert sample(after, "nbdserver_disks_locked", reason="revoked") >= 1
    stack.keyservice("key", "enable", "metricsvault", "mk")


def test_metrics_listener_hides_disk_names_from_strangers(make_stack):
    """On --metrics-listen, a client off loopback without the token sees sums, no names."""
    import socket
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a source address
        address = probe.getsockname()[0]
    except OSError:
        address = "127.0.0.1"
    finally:
        probe.close()
    if address.startswith("127."):
        pytest.skip("this host has no address off loopback")
    port = free_port()
    stack = make_stack(nbd_args=["--metrics-listen", f"0.0.0.0:{port}"])
    assert f"metrics=0.0.0.0:{port}" in stack.nb.ready_line
    stack.create_disk("secretname", "--size", "16M")
    h = stack.connect("secretname")
    h.pread(4096, 0)
    h.shutdown()
    text = urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=30).read().decode()
    assert "secretname" not in text
    outside = scrape(f"http://{address}:{port}")
    assert sample(outside, "nbdserver_io_requests_total", disk="(all)", command="read") >= 1
    # The token is not taken on this plain-HTTP listener (it would cross the network in
    # clear), and a loopback peer proves nothing (a proxy on the host is one).
    token = stack.nb.token_file.read_text().strip()
    assert "secretname" not in urllib.request.urlopen(urllib.request.Request(
        f"http://{address}:{port}/metrics", headers={"Authorization": f"Bearer {token}"}),
        timeout=30).read().decode()
    assert "secretname" not in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                      timeout=30).read().decode()
    # Names: with the token on the API listener; without it there, none either.
    assert "secretname" not in _raw_metrics(stack, None)
    assert "secretname" in _raw_metrics(stack, token)
    status = urllib.request.urlopen(f"http://{address}:{port}/readyz", timeout=30).status
    assert status == 200


def test_health_ready_then_503_past_the_grace_period_and_status(make_stack):
    stack = make_stack(lease=0.5, grace=2)
    stack.create_disk("h1", "--size", "16M")
    h = stack.connect("h1")  # a PMK disk in use: its scope is checked every lease
    status, body = stack.api("GET", "/healthz", token=None)
    assert status == 200 and body == {"status": "ok"}
    status, body = stack.api("GET", "/readyz", token=None)
    assert status == 200 and body["status"] == "ready", body
    assert body["disks"] == 1 and body["lockedDisks"] == 0 and body["keyService"]["streamConnected"]
    shown = stack.nbdserver("status")
    assert shown["ready"] is True and shown["nbd"] == stack.nb.nbd_address, shown

    stack.stop_keyservice()
    wait_until(lambda: stack.api("GET", "/readyz", token=None)[0] == 503, 30,
               interval=0.1, what="/readyz 503 past the grace period")
    status, body = stack.api("GET", "/readyz", token=None)
    assert "grace period" in " ".join(body["problems"]), body
    r = stack.nbdserver("status", check=False)
    assert r.returncode == 1 and json.loads(r.stdout)["ready"] is False, (r.stdout, r.stderr)
    h.shutdown()

    stack.start_keyservice()
    wait_until(lambda: stack.api("GET", "/readyz", token=None)[0] == 200, 30,
               interval=0.1, what="/readyz 200 again")


def test_unreachable_key_service_is_said_in_words(make_stack):
    stack = make_stack(lease=60, grace=3600)
    stack.create_disk("u1", "--size", "16M")
    stack.stop_keyservice()
    stack.restart_nbdserver()
    assert connect_refused(stack, "u1")  # opening needs an unwrap: refused, and logged
    r = stack.nbdserver("disk", "create", "u2", "--size", "16M", "--quiet", check=False)
    shown = json.dumps(stack.disk("u1"))
    wait_until(lambda: "cannot be opened" in stack.nb.stderr_text(), 10, what="the open failure logged")
    log = stack.nb.stderr_text()
    assert "unreachable: connection refused" in log, log[-3000:]
    assert "unreachable: connection refused" in r.stderr, r.stderr
    for text in (log, r.stdout, r.stderr, shown):
        for needle in REPRS:
            assert needle not in text, (needle, text[-3000:])
    stack.start_keyservice()


def test_json_logs_carry_request_ids(make_stack):
    stack = make_stack(nbd_args=["--log-format", "json", "--log-level", "debug"])
    stack.create_disk("j1", "--size", "16M")
    stack.create_disk("j2", "--size", "16M")
    held = stack.connect("j2")  # open (its DEK held) when the server stops
    h = stack.connect("j1")
    h.shutdown()
    stack.nbdserver("disk", "delete", "j1")
    wait_until(lambda: "detached from" in stack.nb.stderr_text(), 10, what="the disconnect logged")
    lines = [json.loads(line) for line in stack.nb.stderr_text().splitlines() if line.strip()]
    changes = [r for r in lines if r.get("kind") == "disk"]
    assert {r["action"] for r in changes} >= {"create", "delete"}, changes
    for r in changes:
        assert r["level"] == "INFO" and len(r["request_id"]) == 32 and r["who"] == "api-token", r
    attach = [r for r in lines if r.get("export") == "j1" and "attached to" in r["message"]]
    assert attach and attach[0]["tls"] is False and attach[0]["peer"], lines[-20:]
    assert any(r["message"].startswith("operation ") for r in lines)
    # A routine stop says nothing worse than INFO about the disks it closes.
    stack.stop_nbdserver()
    held.shutdown()
    records = [json.loads(x) for x in stack.nb.stderr_text().splitlines() if x.strip()]
    stop = next(i for i, r in enumerate(records) if r["message"].startswith("shutting down"))
    tail = records[stop:]
    assert [r for r in tail if "j2 closed" in r["message"]], tail
    # (nbdserver.iopool's own shutdown messages are the I/O workers' business.)
    assert not [r for r in tail if r["level"] in ("WARNING", "ERROR") and r["logger"] != "nbdserver.iopool"], tail


def test_unknown_log_level_is_a_usage_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nbdserver.cli", "serve", "--data-dir", str(tmp_path),
                        "--keyservice-url", "http://127.0.0.1:1", "--keyservice-credential",
                        str(tmp_path / "c"), "--log-level", "LOUD"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "--log-level" in r.stderr and "LOUD" in r.stderr, r.stderr


def test_the_dashboard_shows_only_exported_metrics(stack):
    """Every metric docs/grafana-dashboard.json queries is one the daemons export."""
    import re
    exported = set()
    for url in (stack.api_url, stack.ks_url):
        text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
        exported |= {re.sub(r"_total$", "", n) for n in re.findall(r"^# TYPE (\S+) ", text, re.M)}
    dashboard = (ROOT / "docs" / "grafana-dashboard.json").read_text()
    queried = set(re.findall(r"\b((?:nbdserver|keyservice)_[a-z_]+)", dashboard))
    base = {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in queried}
    assert queried and base <= exported, sorted(base - exported)


def _raw_metrics(stack, token) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(stack.api_url + "/metrics", headers=headers)
    return urllib.request.urlopen(req, timeout=30).read().decode()


def _token(stack) -> str:
    return stack.nb.token_file.read_text().strip()
