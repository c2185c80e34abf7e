"""daemonkit.httperrors: the words both daemons' HTTP clients use for a failed call."""
import errno
import ssl
import urllib.error

from daemonkit.httperrors import describe, error_of


def test_an_api_error_answer_gives_its_code_and_message():
    body = b'{"error": {"code": "KeyNotFound", "message": "no key k1"}}'
    assert error_of(404, body) == ("KeyNotFound", "no key k1")


def test_any_other_answer_gives_the_status_and_its_head():
    code, message = error_of(502, b"<html>bad gateway</html>" + b"x" * 1000, "Bad Gateway")
    assert code == "HttpError"
    assert message.startswith("HTTP 502 Bad Gateway: <html>bad gateway</html>")
    assert len(message) < 260
    assert error_of(500, b"") == ("HttpError", "HTTP 500")
    assert error_of(400, b'{"error": "not the shape"}')[0] == "HttpError"


def test_failures_are_told_in_words_whatever_the_library_wrapped_them_in():
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 9)")
    assert describe(refused) == "connection refused"
    assert describe(urllib.error.URLError(refused)) == "connection refused"
    assert describe(urllib.error.URLError(TimeoutError("timed out"))) == "no answer in time"
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_message = "self-signed certificate"
    assert describe(urllib.error.URLError(untrusted)) == \
        "its TLS certificate is not trusted: self-signed certificate"
    assert describe(urllib.error.URLError("unknown url type: ftp")) == "unknown url type: ftp"
