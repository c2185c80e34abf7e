"""The platform API's OpenAPI document: made from the routes of `api.build_app`, the
operations below (one per method and path) and the models of `apimodels.py`.

    python -m nbdserver.openapi          # rewrite docs/platform-openapi.json
    python -m nbdserver.openapi --check  # exit 1 if the committed one is stale

tests/platform/test_platform_openapi.py fails when the committed document differs from a
fresh one; a route added to the API without an operation here makes `document()` fail.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiohttp import web

from daemonkit.openapi import Answer, Api, Operation, Query, document, write_or_check

from . import apimodels as m
from .api import build_app

PATH = Path(__file__).resolve().parent.parent / "docs" / "platform-openapi.json"

API = Api(
    title="nbdserver platform", version="1.0",
    description="Encryption sets, disks, snapshots and images of the encrypted disk platform. "
                "Every call but /healthz, /readyz and /metrics needs the bearer token of "
                "DATA_DIR/api.token. See docs/platform.md.",
    error_model=m.Error, error_statuses=(400, 401, 403, 404, 409, 413, 503, 504, 507))

_NONE = {204: Answer("Deleted")}
_STARTED = {202: Answer("Started: follow the operation (Location: /operations/{id})", m.OperationView,
                        headers={"Location": {"type": "string"}})}
_LIST = {200: Answer("Success", m.Listing)}


def _ok(model=None) -> dict[int, Answer]:
    return {200: Answer("Success", model)}


OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/healthz"): Operation("Liveness: the process answers", "service", public=True,
                                   errors=False),
    ("GET", "/readyz"): Operation("Readiness: the store, the key service and the NBD listener",
                                  "service", answers={200: Answer("Ready"), 503: Answer("Not ready")},
                                  public=True, errors=False),
    ("GET", "/metrics"): Operation("Prometheus metrics; per-disk series only with the token on the "
                                   "API listener", "service", answers={200: Answer("Metrics")},
                                   public=True, errors=False),
    ("GET", "/status"): Operation("The readiness report with the NBD and key service addresses",
                                  "service"),
    ("GET", "/info"): Operation("Where clients reach the disks (the NBD address)", "service"),
    ("GET", "/operations"): Operation("Long operations, running first, then newest first",
                                      "operations"),
    ("GET", "/operations/{id}"): Operation("A long operation's progress and result", "operations",
                                           answers=_ok(m.OperationView)),
    ("POST", "/encryption-sets"): Operation(
        "Create a disk encryption set (its managed identity is made in the key service)",
        "encryption sets", body=m.EncryptionSetCreate, answers={201: Answer("Created")}),
    ("GET", "/encryption-sets"): Operation("List encryption sets", "encryption sets", answers=_LIST),
    ("GET", "/encryption-sets/{name}"): Operation(
        "Show an encryption set, with its identity's access to the key", "encryption sets"),
    ("PATCH", "/encryption-sets/{name}"): Operation(
        "Rotate to another key (version), or turn automatic rotation on or off; online",
        "encryption sets", body=m.EncryptionSetUpdate),
    ("DELETE", "/encryption-sets/{name}"): Operation(
        "Delete an encryption set that no volume uses", "encryption sets", answers=_NONE),
    ("POST", "/disks"): Operation("Create a disk, or count of them; empty or from a snapshot or "
                                  "image", "disks", body=m.DiskCreate, answers=_STARTED),
    ("GET", "/disks"): Operation("List disks", "disks", answers=_LIST),
    ("GET", "/disks/{name}"): Operation("Show a disk", "disks"),
    ("GET", "/disks/{name}/key-envelope"): Operation("A disk's key envelope (its DEK wrapped, never "
                                                     "unwrapped)", "disks"),
    ("GET", "/disks/{name}/usage"): Operation("A disk's allocated bytes", "disks"),
    ("PATCH", "/disks/{name}"): Operation("Grow a disk (online), or move it to another encryption "
                                          "set or the platform key", "disks", body=m.DiskUpdate),
    ("DELETE", "/disks/{name}"): Operation(
        "Delete a disk", "disks", answers=_NONE,
        query=(Query("force", description="1, true or yes: also while clients are attached"),)),
    ("POST", "/snapshots"): Operation("Snapshot a disk (a copy of its ciphertext and envelope)",
                                      "snapshots", body=m.SnapshotCreate, answers=_STARTED),
    ("GET", "/snapshots"): Operation("List snapshots", "snapshots", answers=_LIST),
    ("GET", "/snapshots/{name}"): Operation("Show a snapshot", "snapshots"),
    ("DELETE", "/snapshots/{name}"): Operation("Delete a snapshot", "snapshots", answers=_NONE),
    ("POST", "/images"): Operation("Make an image of a disk or snapshot", "images",
                                   body=m.ImageCreate, answers=_STARTED),
    ("GET", "/images"): Operation("List images", "images", answers=_LIST),
    ("GET", "/images/{name}"): Operation("Show an image", "images"),
    ("DELETE", "/images/{name}"): Operation("Delete an image", "images", answers=_NONE),
    ("POST", "/images/{name}/share"): Operation("Share an image to a gallery", "images",
                                                body=m.ImageShare),
}


def _key(route: web.AbstractRoute) -> tuple[str, str]:
    return route.method, route.resource.canonical if route.resource is not None else ""


def _operation_id(route: web.AbstractRoute) -> str:
    method, path = _key(route)
    return f"{method.lower()}{path.replace('/', '_').replace('{', '').replace('}', '')}"


def routes_only() -> web.Application:
    """The API's app for its route table: nothing is called, so no platform is needed, and
    readiness and metrics are given so that their routes exist."""
    return build_app(SimpleNamespace(oplog=None), token="",  # type: ignore[arg-type]
                     readiness=lambda: (True, {}), metrics=lambda per_disk: None)


def build() -> dict[str, Any]:
    return document(API, routes_only(), lambda route: OPERATIONS[_key(route)], _operation_id)


def main(argv: list[str]) -> int:
    return write_or_check(argv, PATH, build, "nbdserver.openapi")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
