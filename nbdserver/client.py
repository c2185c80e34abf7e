"""Client of the disk platform's HTTP API (the `nbdserver` client commands use it).

Settings (`SETTINGS`: the environment first, then section [nbdserver] of the settings
file, `daemonkit.config`): the API is at NBDSERVER_API (default http://127.0.0.1:8080);
the bearer token is NBDSERVER_TOKEN, else the file NBDSERVER_TOKEN_FILE (default
/var/lib/nbdserver/api.token of a local server); each request waits at most
NBDSERVER_TIMEOUT seconds. Every failure, a refusal of the platform or an API that
cannot be reached, is an `ApiError` carrying the message, code, status and exit code
to show; the CLI reports it once, at its edge.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from daemonkit.cliout import EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE, CliError
from daemonkit.config import ConfigError, Settings
from daemonkit.httperrors import describe, error_of

DEFAULT_API = "http://127.0.0.1:8080"
DEFAULT_TOKEN_FILE = "/var/lib/nbdserver/api.token"
# Seconds per request: a synchronous change may wait out the platform's own deadline for
# an operation (platform.operations.DEADLINE, 120 s); past that something is stuck.
DEFAULT_TIMEOUT = 130.0
POLL_INTERVAL = 0.2  # seconds between two looks at a running operation

SETTINGS = Settings("nbdserver", {
    "NBDSERVER_API": f"URL of the platform API (default {DEFAULT_API})",
    "NBDSERVER_TOKEN": "the API's bearer token itself (a settings file holding it must be 0600)",
    "NBDSERVER_TOKEN_FILE": f"file holding the bearer token (default {DEFAULT_TOKEN_FILE})",
    "NBDSERVER_CA": "CA certificate that signed an https:// API's (default: the system's CAs)",
    "NBDSERVER_TIMEOUT": f"seconds one request may take, (0, 3600] (default {DEFAULT_TIMEOUT:g})",
}, secrets=frozenset({"NBDSERVER_TOKEN"}))


class ApiError(CliError):
    """The platform refused a call (its message, code and status) or could not be reached."""

    def __init__(self, message: str, *, code: str = "Error", status: int | None = None,
                 exit_code: int | None = None):
        if exit_code is None:
            exit_code = EXIT_UNAVAILABLE if status is None or status >= 500 else EXIT_REFUSED
        super().__init__(message, code=code, status=status, exit_code=exit_code)


def request_timeout() -> float:
    try:
        return SETTINGS.seconds("NBDSERVER_TIMEOUT", DEFAULT_TIMEOUT)
    except ConfigError as e:
        raise ApiError(str(e), code="BadSettings", exit_code=EXIT_USAGE) from None


def token() -> str | None:
    """The bearer token: NBDSERVER_TOKEN, else the token file's content, else None."""
    direct = SETTINGS.get("NBDSERVER_TOKEN")
    if direct:
        return direct
    path = SETTINGS.get("NBDSERVER_TOKEN_FILE", DEFAULT_TOKEN_FILE)
    try:
        with open(path or DEFAULT_TOKEN_FILE) as f:
            return f.read().strip()
    except OSError:
        return None


def api(method: str, path: str, body: dict | None = None) -> Any:
    """One API call; returns the decoded JSON answer (None for an empty one).

    Keys of `body` whose value is None are left out: the API reads a missing field as
    "not given", which is what an unset CLI option means."""
    base = (SETTINGS.get("NBDSERVER_API") or DEFAULT_API).rstrip("/")
    data = json.dumps({k: v for k, v in body.items() if v is not None}).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    bearer = token()
    if bearer:
        req.add_header("Authorization", f"Bearer {bearer}")
    timeout = request_timeout()
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=_tls_context(base)) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        code, message = error_of(e.code, e.read(), str(e.reason or ""))
        raise ApiError(message, code=code, status=e.code) from None
    except urllib.error.URLError as e:
        raise ApiError(f"cannot reach the nbdserver API at {base}: {describe(e)}",
                       code="ServiceUnavailable") from None
    except (TimeoutError, OSError) as e:
        raise ApiError(f"the nbdserver API at {base} did not answer within {timeout:g} s "
                       f"(NBDSERVER_TIMEOUT): {describe(e)}", code="ServiceUnavailable") from None


def _tls_context(base: str) -> ssl.SSLContext | None:
    """For an https:// API: verify its certificate (and name) against NBDSERVER_CA, else
    the system's CAs. None for http:// (the server refuses that off loopback)."""
    if not base.startswith("https://"):
        return None
    ca = SETTINGS.get("NBDSERVER_CA")
    if not ca:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise ApiError(f"cannot load the CA certificate {ca} (NBDSERVER_CA): {describe(e)}",
                       code="BadSettings", exit_code=EXIT_USAGE) from None


def use_api_ca(ctx, param, value) -> None:
    """`nbdserver --api-ca FILE`: the same as NBDSERVER_CA for this command."""
    if value:
        os.environ["NBDSERVER_CA"] = value


def operation_error(op: dict) -> ApiError:
    err = op.get("error") or {}
    return ApiError(str(err.get("message", "the operation failed")), code=str(err.get("code", "Error")),
                    status=err.get("status"),
                    exit_code=EXIT_UNAVAILABLE if op.get("status") == "interrupted" else None)


def wait_operation(op: dict, progress: Callable[[dict], None] | None = None,
                   on_answer: Callable[[], None] | None = None) -> Any:
    """Follow a long operation until it ends; return its result, or raise its error.

    `progress(op)` is called with every look at the running operation and once at the
    end of a successful one; `on_answer()` after every answer (the CLI re-arms its
    deadline there)."""
    while op["status"] == "running":
        if progress:
            progress(op)
        time.sleep(POLL_INTERVAL)
        op = api("GET", f"/operations/{op['id']}")
        if on_answer:
            on_answer()
    if op["status"] != "succeeded":
        raise operation_error(op)
    if progress:
        progress(op)
    return op.get("result")
