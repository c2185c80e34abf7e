"""Typed refusals of the host commands; the CLI prints the message and exits 1."""

from __future__ import annotations


class HostError(Exception):
    """Something the operator must fix; the message says what and how."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Refused(HostError):
    """The request itself is wrong (bad device name, impossible option combination)."""


class MissingSupport(HostError):
    """This machine lacks what the chosen way needs (kernel module, tool, /dev node)."""


class NotAttached(HostError):
    """No attachment of ours is on that device."""


class ExportUnreachable(HostError):
    """The NBD server or the export cannot be reached or opened."""


class ToolFailed(HostError):
    """An external tool (nbd-client, nbdfuse, losetup, fusermount3) failed."""
