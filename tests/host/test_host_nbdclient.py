"""nbdserver/host/nbdclient.py: the exact nbd-client command lines and their refusals.

The kernel NBD driver is not on our machines, so nbd-client never runs here: these
argv lists are what `nbdserver attach --via nbd` would execute (docs/operations.md)."""

from __future__ import annotations

import pytest

from nbdserver.host.errors import Refused
from nbdserver.host.nbdclient import (
    ExportProbe,
    attach_argv,
    check_connections,
    check_disk_name,
    check_nbd_device,
    detach_argv,
)

MULTI = ExportProbe(size=1 << 30, multi_conn=True)
SINGLE = ExportProbe(size=1 << 30, multi_conn=False)


def test_attach_command_line_with_multi_conn():
    assert attach_argv("10.0.0.5", 10809, "/dev/nbd3", "data-1", 4) == [
        "nbd-client", "-N", "data-1", "10.0.0.5", "10809", "/dev/nbd3", "-b", "4096", "-C", "4", "-p"]


def test_attach_command_line_single_connection_has_no_C():
    assert attach_argv("srv", 10810, "/dev/nbd0", "d", 1) == [
        "nbd-client", "-N", "d", "srv", "10810", "/dev/nbd0", "-b", "4096", "-p"]


def test_attach_without_persist():
    assert "-p" not in attach_argv("srv", 10809, "/dev/nbd0", "d", 1, persist=False)


def test_detach_command_line():
    assert detach_argv("/dev/nbd12") == ["nbd-client", "-d", "/dev/nbd12"]


@pytest.mark.parametrize("device", ["/dev/sda", "/dev/nbd", "/dev/nbd01", "/dev/nbdx", "nbd0",
                                    "/dev/nbd0/../sda", "/dev/nbd0 ", "", "/dev/loop0", "/dev/nbd12345"])
def test_refuses_what_is_not_an_nbd_device(device):
    with pytest.raises(Refused, match="not an NBD device"):
        check_nbd_device(device)
    with pytest.raises(Refused):
        detach_argv(device)


@pytest.mark.parametrize("disk", ["", "-x", "a/b", "../etc", "a b", "x" * 81, "é"])
def test_refuses_bad_disk_names(disk):
    with pytest.raises(Refused, match="invalid disk name"):
        check_disk_name(disk)


def test_refuses_bad_port():
    with pytest.raises(Refused, match="port"):
        attach_argv("srv", 0, "/dev/nbd0", "d", 1)


def test_connections_default_to_one():
    assert check_connections(None, MULTI) == 1
    assert check_connections(None, SINGLE) == 1


def test_several_connections_only_with_multi_conn():
    assert check_connections(8, MULTI) == 8
    assert check_connections(1, SINGLE) == 1
    with pytest.raises(Refused, match="does not offer multi-conn"):
        check_connections(2, SINGLE)


@pytest.mark.parametrize("n", [0, -1, 17, 400])
def test_connections_out_of_range(n):
    with pytest.raises(Refused, match="between 1 and 16"):
        check_connections(n, MULTI)


def test_attach_command_line_with_tls():
    assert attach_argv("srv.example", 10809, "/dev/nbd0", "d", 2, tls_dir="/etc/ed/tls/") == [
        "nbd-client", "-N", "d", "srv.example", "10809", "/dev/nbd0", "-b", "4096", "-C", "2",
        "-x", "-cacertfile", "/etc/ed/tls/ca-cert.pem", "-certfile", "/etc/ed/tls/client-cert.pem",
        "-keyfile", "/etc/ed/tls/client-key.pem", "-p"]
