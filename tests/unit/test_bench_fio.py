"""bench.fio: the fio command line and the parse of fio's JSON report (no fio is run)."""

import json

import pytest

from bench import fio
from bench.workloads import SUITE

RANDREAD = SUITE["randread"]
SEQWRITE = SUITE["seqwrite"]


def report(read=None, write=None, error=0) -> dict:
    empty = {"iops": 0.0, "bw_bytes": 0, "io_bytes": 0, "total_ios": 0,
             "clat_ns": {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}}
    return {"fio version": "fio-3.33", "jobs": [{
        "jobname": "w", "error": error, "read": read or empty, "write": write or empty}]}


def side(iops=71707.1, bw=293743176, p50=156672, p99=2244608, p999=None) -> dict:
    pct = {fio.P50: p50, fio.P99: p99}
    if p999 is not None:
        pct[fio.P999] = p999
    return {"iops": iops, "bw_bytes": bw, "io_bytes": bw * 2, "total_ios": int(iops * 2),
            "clat_ns": {"min": 1, "max": 9, "mean": 5.0, "stddev": 1.0, "N": 10,
                        "percentile": pct}}


def test_command_carries_the_fixed_settings():
    argv = fio.command(RANDREAD, "nbd://127.0.0.1:1234/disk", size=1 << 30, runtime=5,
                       output="/x/out.json")
    assert argv[0] == "fio"
    for opt in ("--ioengine=nbd", "--uri=nbd://127.0.0.1:1234/disk", "--rw=randread",
                "--bs=4096", "--iodepth=16", "--numjobs=1", "--direct=0",
                f"--size={1 << 30}", "--time_based", "--runtime=5", "--ramp_time=1",
                "--clat_percentiles=1", "--percentile_list=50:99:99.9", "--output-format=json",
                "--output=/x/out.json"):
        assert opt in argv


def test_fractional_seconds_become_milliseconds():
    argv = fio.command(RANDREAD, "nbd://h:1/", size=4096, runtime=2.5, ramp=0.5)
    assert "--runtime=2500ms" in argv and "--ramp_time=500ms" in argv


def test_parse_skips_the_nbd_engines_chatter_before_the_json():
    text = "fio: connected to NBD server\n" + json.dumps(report(read=side()), indent=2)
    s = fio.sample(fio.parse_report(text), RANDREAD)
    assert s.iops == pytest.approx(71707.1)
    assert s.bw_bytes == 293743176
    assert s.clat_p50_us == pytest.approx(156.672)
    assert s.clat_p99_us == pytest.approx(2244.608)


def test_write_workloads_read_the_write_section():
    r = report(read=side(iops=1), write=side(iops=500, bw=500 << 20, p50=2000, p99=9000))
    s = fio.sample(r, SEQWRITE)
    assert (s.iops, s.clat_p50_us, s.clat_p99_us) == (500, 2.0, 9.0)


@pytest.mark.parametrize("text, message", [
    ("", "no JSON"),
    ("fio: connected\n{not json", "not valid JSON"),
    ('{"jobs": []}', "no jobs"),
])
def test_unparseable_output_is_a_typed_error(text, message):
    with pytest.raises(fio.FioOutputError, match=message):
        fio.parse_report(text)


def test_a_failed_job_or_an_idle_direction_is_an_error():
    with pytest.raises(fio.FioOutputError, match="failed with error 5"):
        fio.sample(report(read=side(), error=5), RANDREAD)
    with pytest.raises(fio.FioOutputError, match="no write I/O"):
        fio.sample(report(read=side()), SEQWRITE)


def test_p999_is_parsed_and_absent_in_old_reports_is_none():
    s = fio.sample(report(read=side(p999=9_876_543)), RANDREAD)
    assert s.clat_p999_us == pytest.approx(9876.543)
    assert fio.sample(report(read=side()), RANDREAD).clat_p999_us is None
    # fio keys the table by the percentile printed with six decimals.
    assert fio.P999 == "99.900000" and "99.9" in fio.PERCENTILES.split(":")


def test_multi_connection_workloads_run_one_job_per_connection_grouped():
    argv = fio.command(SUITE["randwrite-4conn"], "nbd://h:1/d", size=1 << 20, runtime=1)
    assert "--numjobs=4" in argv and "--group_reporting" in argv and "--iodepth=16" in argv


def test_device_baseline_is_psync_direct_16_threads_on_the_file():
    argv = fio.device_command(SUITE["randread-cold"], "/data/dev.img", size=1 << 30, runtime=3,
                              output="/x/o.json")
    for opt in ("--filename=/data/dev.img", "--ioengine=psync", "--direct=1", "--numjobs=16",
                "--group_reporting", "--rw=randread", "--bs=4096", "--runtime=3",
                "--percentile_list=50:99:99.9", "--output=/x/o.json"):
        assert opt in argv
    assert not any(a.startswith(("--uri", "--iodepth")) for a in argv)


def test_sequential_fill_writes_the_whole_export_in_1mib_requests_once():
    argv = fio.sequential_fill("nbd://h:1/d", size=64 << 20, output="/x/f.json")
    for opt in ("--ioengine=nbd", "--uri=nbd://h:1/d", "--rw=write", "--bs=1M",
                f"--size={64 << 20}", "--output=/x/f.json"):
        assert opt in argv
    assert "--time_based" not in argv  # once over the image, not for a time


def test_version_string():
    assert fio.version_string("fio-3.33\n") == "3.33"
