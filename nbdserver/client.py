"""Client of the disk platform's HTTP API (the `nbdserver` client commands use it).

The API is at $NBDSERVER_API (default http://127.0.0.1:8080); the bearer token is
$NBDSERVER_TOKEN, else the file $NBDSERVER_TOKEN_FILE (default
/var/lib/nbdserver/api.token of a local server). Every failure, a refusal of the
platform or an API that cannot be reached, is an `ApiError` carrying the message to
show; the CLI turns it into `error: MESSAGE` and exit status 1, once, at its edge.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

DEFAULT_API = "http://127.0.0.1:8080"
DEFAULT_TOKEN_FILE = "/var/lib/nbdserver/api.token"
TIMEOUT = 600  # seconds: a synchronous call may wait on the key service and on disk I/O
POLL_INTERVAL = 0.2  # seconds between two looks at a running operation


class ApiError(Exception):
    """The platform refused a call (its message, code and status) or could not be reached."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def token() -> str | None:
    """The bearer token: $NBDSERVER_TOKEN, else the token file's content, else None."""
    if os.environ.get("NBDSERVER_TOKEN"):
        return os.environ["NBDSERVER_TOKEN"]
    path = os.environ.get("NBDSERVER_TOKEN_FILE", DEFAULT_TOKEN_FILE)
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def api(method: str, path: str, body: dict | None = None) -> Any:
    """One API call; returns the decoded JSON answer (None for an empty one).

    Keys of `body` whose value is None are left out: the API reads a missing field as
    "not given", which is what an unset CLI option means."""
    base = os.environ.get("NBDSERVER_API", DEFAULT_API).rstrip("/")
    data = json.dumps({k: v for k, v in body.items() if v is not None}).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    bearer = token()
    if bearer:
        req.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read())["error"]
            msg = f"{err.get('message')} [{err.get('code')}, HTTP {e.code}]"
        except Exception:
            msg = f"HTTP {e.code}"
        raise ApiError(msg) from None
    except urllib.error.URLError as e:
        raise ApiError(f"cannot reach the nbdserver API at {base}: {e.reason}") from None


def wait_operation(op: dict, progress: Callable[[str, int], None] | None = None) -> Any:
    """Follow a long operation until it ends; return its result, or raise its error.

    `progress(kind, percent)` is called when the percentage changes, and with 100 at
    the end of a successful operation."""
    last = None
    while op["status"] == "running":
        pct = int(op.get("progress", 0) * 100)
        if progress and pct != last:
            progress(op["kind"], pct)
        last = pct
        time.sleep(POLL_INTERVAL)
        op = api("GET", f"/operations/{op['id']}")
    if op["status"] == "failed":
        err = op["error"]
        raise ApiError(f"{err['message']} [{err['code']}, HTTP {err.get('status')}]")
    if progress:
        progress(op["kind"], 100)
    return op["result"]
