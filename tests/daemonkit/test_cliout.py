"""cliout, config, cliprogress and rfc3339: the pure parts of the CLIs' shared edge."""
import io
import os

import pytest

from daemonkit.cliout import CliError, apply_query, render, report_error, with_rfc3339
from daemonkit.cliprogress import ProgressLine
from daemonkit.config import ConfigError, Settings
from daemonkit.rfc3339 import format_time, parse_time


def test_table_tsv_and_json_of_a_list_of_objects():
    rows = [{"name": "a", "size": 1, "tags": {"x": 1}}, {"name": "b\tc", "size": 2, "gone": None}]
    table = render(rows, "table").splitlines()
    assert table[0].split() == ["NAME", "SIZE", "TAGS", "GONE"]
    assert table[1].split() == ["a", "1", '{"x":1}']
    assert render(rows, "tsv").splitlines() == ['a\t1\t{"x":1}\t', "b c\t2\t\t"]
    assert render(rows, "json").startswith("[\n")
    assert render(None, "table") == "" and render([], "tsv") == ""


def test_query_then_times():
    obj = {"value": [{"name": "k", "attributes": {"created": 1796543700.4, "enabled": True}}]}
    shown = with_rfc3339(obj, frozenset({"created"}))
    assert shown["value"][0]["attributes"] == {"created": "2026-12-06T07:55:00Z", "enabled": True}
    assert apply_query(shown, "value[0].attributes.created") == "2026-12-06T07:55:00Z"
    # A time past year 9999 (the API takes up to 2**40) is shown as the number it is.
    assert with_rfc3339({"exp": 2**39}, frozenset({"exp"})) == {"exp": 2**39}
    with pytest.raises(CliError) as e:
        apply_query(shown, "value[")
    assert e.value.exit_code == 2


def test_one_error_shape():
    err = CliError("no such disk", code="NotFound", status=404)
    json_out, table_out = io.StringIO(), io.StringIO()
    report_error(err, "json", json_out)
    report_error(err, "table", table_out)
    assert json_out.getvalue() == ('error: no such disk [NotFound, HTTP 404]\n'
                                   '{"error": {"code": "NotFound", "message": "no such disk", "status": 404}}\n')
    assert table_out.getvalue() == "error: no such disk [NotFound, HTTP 404]\n"


@pytest.mark.parametrize("text, seconds", [
    ("2026-12-06T07:55:00Z", 1796543700), ("2026-12-06T08:55:00+01:00", 1796543700),
    ("2026-12-06t07:55:00.5z", 1796543700.5),
])
def test_rfc3339_round_trip(text, seconds):
    assert parse_time(text) == seconds and format_time(seconds) == "2026-12-06T07:55:00Z"


@pytest.mark.parametrize("text", ["2026-12-06", "2026-12-06T07:55:00", "yesterday", "1796543700"])
def test_rfc3339_needs_a_date_a_time_and_an_offset(text):
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_time(text)


def _settings(tmp_path, monkeypatch, text, mode=0o600):
    path = tmp_path / "config"
    path.write_text(text)
    path.chmod(mode)
    monkeypatch.setenv("ENCRYPTED_DISKS_CONFIG", str(path))
    monkeypatch.delenv("X_URL", raising=False)
    monkeypatch.delenv("X_TOKEN", raising=False)
    return Settings("x", {"X_URL": "url", "X_TOKEN": "token"}, secrets=frozenset({"X_TOKEN"}))


def test_settings_environment_wins_over_the_file(tmp_path, monkeypatch):
    s = _settings(tmp_path, monkeypatch, "[x]\nx_url = http://file\n[other]\nY = 1\n")
    assert s.get("X_URL") == "http://file"  # keys are read case-insensitively
    monkeypatch.setenv("X_URL", "http://env")
    assert s.get("X_URL") == "http://env"
    assert s.get("X_TOKEN", "default") == "default"


def test_settings_with_a_secret_must_be_private(tmp_path, monkeypatch):
    s = _settings(tmp_path, monkeypatch, "[x]\nX_TOKEN = s3cret\n", mode=0o640)
    with pytest.raises(ConfigError, match="chmod 600") as e:
        s.get("X_TOKEN")
    assert "s3cret" not in str(e.value)
    os.chmod(os.environ["ENCRYPTED_DISKS_CONFIG"], 0o600)
    assert Settings("x", s.known, s.secrets).get("X_TOKEN") == "s3cret"
    # Readable by others is fine when it holds no secret.
    assert _settings(tmp_path, monkeypatch, "[x]\nX_URL = u\n", mode=0o644).get("X_URL") == "u"


def test_settings_refuse_unknown_keys(tmp_path, monkeypatch):
    s = _settings(tmp_path, monkeypatch, "[x]\nX_ULR = typo\n")
    with pytest.raises(ConfigError, match="unknown key.*X_ULR.*known: X_URL, X_TOKEN"):
        s.get("X_URL")


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_one_line_with_rate_and_time_left():
    now = [0.0]
    stream = Tty()
    line = ProgressLine("disk.create", stream, clock=lambda: now[0])
    line.update(0.0, 1 << 30)
    now[0] = 10.0
    line.update(0.25, 1 << 30)
    line.done()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.count("\r") == 2
    last = text.rsplit("\r", 1)[1]
    assert "25%" in last and "256.0 MiB of 1.0 GiB" in last and "25.6 MiB/s" in last
    assert "0:30 left" in last


def test_progress_elsewhere_is_a_plain_line_per_tenth():
    stream = io.StringIO()
    line = ProgressLine("image.create", stream, clock=lambda: 0.0)
    for f in (0.0, 0.01, 0.05, 0.12, 0.15, 0.5, 1.0):
        line.update(f)
    line.done()
    assert [ln.split(":")[1].strip() for ln in stream.getvalue().splitlines()] == ["0%", "12%", "50%", "100%"]
