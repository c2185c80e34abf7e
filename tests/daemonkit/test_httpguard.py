"""httpguard.RequestProgress, the pure part of the slowloris guard: where a connection's
bytes are, fed in every possible split."""
import pytest

from daemonkit.httpguard import BODY, CHUNKED, HEADERS, IDLE, RequestProgress

GET = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
POST = b"POST /vaults HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
CHUNK = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"


def feed_split(data: bytes, at: int):
    p = RequestProgress()
    phases = [p.feed(data[:at]), p.feed(data[at:])]
    return p.phase, phases


@pytest.mark.parametrize("data", [GET, POST, CHUNK, GET + POST + CHUNK])
def test_complete_requests_end_idle_in_any_split(data):
    for at in range(len(data) + 1):
        assert feed_split(data, at)[0] == IDLE, at


def test_phases():
    p = RequestProgress()
    assert p.phase == HEADERS  # a new connection owes headers
    assert p.feed(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n") == (HEADERS, False)
    assert p.feed(b"\r\nabc") == (BODY, False)
    assert p.feed(b"defghij") == (IDLE, False)
    assert p.feed(b"G") == (HEADERS, True)  # the next request's first byte
    assert p.feed(b"ET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n") == (CHUNKED, False)
    assert p.feed(b"0\r\n\r\n") == (IDLE, False)


def test_a_drip_stays_in_headers():
    p = RequestProgress()
    for b in b"GET / HTTP/1.1\r\nX-a: " + b"b" * 1000:
        assert p.feed(bytes([b]))[0] == HEADERS
