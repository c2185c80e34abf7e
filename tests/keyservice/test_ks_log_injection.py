"""Names are matched whole and log lines cannot be forged (issue 19, item 9), against the
real daemon.

The attacks: vault "cust\\n" was accepted beside "cust" (`$` matches before a trailing
newline), and `%0A` in a URL path became a newline in the log, so a client could write a
line of its choosing into the service's log.
"""
import urllib.request

import pytest

from daemonkit.httplog import escape
from keyservice.domain.errors import BadRequest
from keyservice.domain.names import check_key_name, check_vault_name, check_version


def test_names_with_a_trailing_newline_are_refused(daemon):
    status, body = daemon.http("POST", "/vaults", {"name": "cust\n", "location": "l", "subscription": "s"})
    assert status == 400 and "Invalid vault name" in body["error"]["message"]
    assert daemon.http("POST", "/vaults", {"name": "cust", "location": "l", "subscription": "s"})[0] == 201
    status, body = daemon.http("POST", "/vaults/cust/keys/k%0A/create", {"key_size": 2048})
    assert status == 400 and "Invalid key name" in body["error"]["message"]
    status, body = daemon.http("GET", "/vaults/cust/keys/k/" + "a" * 32 + "%0A")
    assert status == 400


@pytest.mark.parametrize("check,value", [(check_vault_name, "cust\n"), (check_key_name, "k1\n"),
                                         (check_version, "a" * 32 + "\n")])
def test_name_rules_match_the_whole_string(check, value):
    with pytest.raises(BadRequest):
        check(value)
    check(value[:-1])


def test_a_newline_in_the_path_logs_one_line(daemon):
    req = urllib.request.Request(daemon.url + "/vaults/a%0AINJECTED%20forged%20line%0D%1B[2J",
                                 headers={"Authorization": f"Bearer {daemon.token(daemon.admin)}"})
    try:
        urllib.request.urlopen(req, timeout=30)
    except urllib.error.HTTPError as e:
        rid = e.headers["x-ms-request-id"]
        assert e.code == 400
    log = daemon.stderr().splitlines()
    mine = [line for line in log if rid in line]
    assert len(mine) == 1, mine
    assert "a\\nINJECTED forged line\\r\\x1b[2J" in mine[0]
    assert not any(line.startswith("INJECTED") for line in log)


def test_escape_caps_and_keeps_printable_text():
    assert escape("/vaults/cust/keys/k1") == "/vaults/cust/keys/k1"
    assert escape("a\\b") == "a\\\\b"  # a literal backslash cannot pose as an escape
    assert escape("x" * 1000).endswith("...[744 more]")
