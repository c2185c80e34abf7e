"""The platform API's bodies as pydantic models: requests (validated by `api.py` through
`daemonkit.bodies`) and answers (for the OpenAPI document, `openapi.py`).

Requests ignore unknown fields, as the API always did. A field's type is checked here; what
its value may be (a name's pattern, a size, a key URL, a cache mode, a set's type) is the
platform's rule, checked where every caller meets it (`platform/`), and named here only in
descriptions.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from daemonkit.bodies import RequestModel

from .platform.model import SET_TYPES, SIZE_FORMS

_SIZE = f"bytes or a string: {SIZE_FORMS}"

# -- requests --


class EncryptionSetCreate(RequestModel):
    name: str
    keyUrl: str = Field(description="the key in the key service: a URL, with or without a version")
    subscription: str | None = Field(None, description="default: the vault's")
    location: str | None = Field(None, description="default: the vault's")
    allowCrossSubscription: bool | None = None
    rotationToLatestKeyVersionEnabled: bool | None = Field(
        None, description="follow the key's latest version (no version in keyUrl)")
    # The set types are the platform's (model.SET_TYPES, checked by create_des): shown here.
    encryptionType: str | None = Field(None, json_schema_extra={"enum": list(SET_TYPES),
                                                                "default": SET_TYPES[0]})


class EncryptionSetUpdate(RequestModel):
    keyUrl: str | None = Field(None, description="rotate: re-wrap every volume's DEK under this key")
    rotationToLatestKeyVersionEnabled: bool | None = None


class DiskCreate(RequestModel):
    name: str = Field(description="with count, the prefix of NAME-0 .. NAME-(count-1)")
    size: int | str | None = Field(None, description=_SIZE + "; default: the source's")
    diskEncryptionSet: str | None = Field(None, description="default: the platform's own key")
    source: str | None = Field(None, description="snapshot:NAME or image:NAME")
    count: int | None = None
    subscription: str | None = None
    location: str | None = None
    cache: str | None = Field(None, description="writeback (default) or none (O_DIRECT)")
    storage: str | None = Field(None, description="file, or rbd:POOL (a Ceph RBD image); "
                                "default: the server's")


class DiskUpdate(RequestModel):
    """Either a resize (size) or a change of key (diskEncryptionSet or platformKey)."""
    size: int | str | None = Field(None, description=_SIZE + "; a disk only grows")
    diskEncryptionSet: str | None = None
    platformKey: bool | None = None


class SnapshotCreate(RequestModel):
    name: str
    disk: str


class ImageCreate(RequestModel):
    name: str
    source: str = Field(description="disk:NAME or snapshot:NAME")


class ImageShare(RequestModel):
    gallery: str


# -- answers --


class ErrorDetail(BaseModel):
    code: str
    message: str


class Error(BaseModel):
    error: ErrorDetail


class OperationView(BaseModel):
    """A long operation (202 answers, with Location: /operations/{id})."""
    id: str
    kind: str
    target: str
    status: str = Field(json_schema_extra={"enum": ["running", "succeeded", "failed", "interrupted"]})
    progress: float
    bytesTotal: int | None = None
    startTime: str
    result: Any = None
    error: dict[str, Any] | None = Field(None, description="code, message and status")


class Listing(BaseModel):
    value: list[dict[str, Any]]
