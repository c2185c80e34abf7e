"""What anonymous NBD clients learn (issue 19, item 12).

Before: a locked disk told any client that asked for it the lock's reason (the key URL:
vault, key, why it failed), a refusal said whether the disk existed, NBD_OPT_LIST named
every disk and its encryption set. Now refusals are generic and the same for a locked
and an unknown disk, the reason goes to the server's log, descriptions are for
authenticated clients only, and listing follows `--export-list`.
"""

from __future__ import annotations

import struct
import subprocess

import pytest

from daemonkit.tlsca import init_ca
from nbdserver.protocol.constants import (
    NBD_CMD_READ,
    NBD_OPT_GO,
    NBD_OPT_LIST,
    NBD_REP_ACK,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_SERVER,
    NBD_REPLY_TYPE_ERROR,
)
from tests.helpers.images import DISK_SIZE, need_tool
from tests.helpers.nbdraw import RawClient
from tests.helpers.platform import Stack
from tests.helpers.servers import wait_until

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.timeout(180)


def raw_list(address) -> list[tuple[int, int, bytes]]:
    with RawClient(address) as c:
        c.start()
        c.send_option(NBD_OPT_LIST)
        return c.replies_until_final()


def listed(replies) -> dict[str, str]:
    """name -> description of NBD_REP_SERVER replies."""
    out = {}
    for _, rtype, data in replies:
        if rtype == NBD_REP_SERVER:
            (n,) = struct.unpack_from(">I", data)
            out[data[4:4 + n].decode()] = data[4 + n:].decode()
    return out


def go_refusal(address, name: str) -> tuple[int, bytes]:
    with RawClient(address) as c:
        c.start()
        n = name.encode()
        c.send_option(NBD_OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
        _, rtype, data = c.replies_until_final()[-1]
        return rtype, data


def nbdinfo_list(uri: str) -> subprocess.CompletedProcess:
    need_tool("nbdinfo")
    return subprocess.run(["nbdinfo", "--list", uri], capture_output=True, text=True, timeout=60)


def test_anonymous_listing_names_no_descriptions(server_factory, tmp_path):
    secret_path = tmp_path / "tenant-a-secret-name.img"
    srv = server_factory([f"disk={secret_path},size={DISK_SIZE}"])  # the runner's default: all
    replies = raw_list(srv.address)
    assert replies[-1][1] == NBD_REP_ACK
    assert listed(replies) == {"disk": ""}  # the description ("file PATH") is not sent
    assert str(secret_path) not in nbdinfo_list(srv.uri()).stdout


def test_listing_can_be_refused(server_factory, tmp_path):
    srv = server_factory([f"hidden-disk={tmp_path / 'd.img'},size={DISK_SIZE}"],
                         extra_args=["--export-list", "none"])
    replies = raw_list(srv.address)
    assert [r[1] for r in replies] == [NBD_REP_ERR_POLICY]
    assert b"hidden-disk" not in b"".join(r[2] for r in replies)
    r = nbdinfo_list(srv.uri())
    assert r.returncode != 0 and "hidden-disk" not in r.stdout
    # Clients that know the name still connect.
    h = nbd.NBD()
    h.connect_uri(srv.uri("hidden-disk"))
    assert h.get_size() == DISK_SIZE
    h.shutdown()


def test_listing_for_verified_client_certificates_only(server_factory, tmp_path):
    certs = tmp_path / "pki"
    init_ca(certs)
    disk = f"disk={tmp_path / 'd.img'},size={DISK_SIZE}"
    common = ["--tls-mode", "required", "--tls-dir", str(certs), "--export-list", "authenticated"]
    verifying = server_factory([disk], extra_args=[*common, "--tls-verify-clients"])
    uri = f"nbds://127.0.0.1:{verifying.port}/?tls-certificates={certs}"
    r = nbdinfo_list(uri)
    assert r.returncode == 0 and "disk" in r.stdout and "file " in r.stdout, r.stderr
    assert "client certificate CN=client" in verifying.stderr_text()

    # TLS without a client certificate: encrypted, but anonymous.
    anonymous = server_factory([f"disk={tmp_path / 'd2.img'},size={DISK_SIZE}"], extra_args=common)
    r = nbdinfo_list(f"nbds://127.0.0.1:{anonymous.port}/?tls-certificates={certs}")
    assert r.returncode != 0 and "d2.img" not in r.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("visibility")).start()
    yield s
    try:
        s.nb.assert_healthy()
        s.ks.assert_healthy()
    finally:
        s.close()


def test_locked_disk_refused_like_an_unknown_one(stack):
    c = stack.customer_key("secretvault", "k1", "des-secret")
    stack.create_disk("cmkdisk", "--size", "16M", "--des", c["des"])
    addr = tuple(stack.nb.nbd_address.rsplit(":", 1))
    addr = (addr[0], int(addr[1]))
    attached = RawClient.connected(addr, "cmkdisk", structured=True)

    # `nbdserver serve` lists to authenticated clients only; these are anonymous.
    replies = raw_list(addr)
    assert [r[1] for r in replies] == [NBD_REP_ERR_POLICY]
    assert b"cmkdisk" not in b"".join(r[2] for r in replies)

    stack.keyservice("key", "disable", "secretvault", "k1")
    stack.wait_serving("cmkdisk", "locked")

    locked = go_refusal(addr, "cmkdisk")
    unknown = go_refusal(addr, "nodisk")
    assert locked[0] == unknown[0] == NBD_REP_ERR_UNKNOWN
    assert locked[1] == b"export 'cmkdisk' is not available"
    assert unknown[1] == b"export 'nodisk' is not available"

    # The attached client's I/O fails with EIO, and the message names no key either.
    attached.request(NBD_CMD_READ, 0, 4096, cookie=7)
    flags, ctype, cookie, payload = attached.chunk()
    assert ctype == NBD_REPLY_TYPE_ERROR and cookie == 7
    assert b"secretvault" not in payload and b"k1" not in payload and b"disabled" not in payload
    attached.close()

    # The operator still learns why, from the log.
    wait_until(lambda: "export 'cmkdisk' refused: locked:" in stack.nb.stderr_text(), 10,
               what="the refusal's reason in the server log")
    line = next(ln for ln in stack.nb.stderr_text().splitlines()
                if "export 'cmkdisk' refused: locked:" in ln)
    assert "disabled" in line or "secretvault" in line, line
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(stack.nbd_uri("cmkdisk"))
    stack.keyservice("key", "enable", "secretvault", "k1")
    stack.wait_serving("cmkdisk", "available")
    h = stack.connect("cmkdisk")
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()
