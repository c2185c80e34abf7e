"""Fixtures for TLS tests: certificate directories made by our CA tooling, and TLS servers.

`pki` is made once per session (key generation is the slow part): `good` is the CA the
server trusts, with server, client and PSK material; `rogue` is another CA, whose client
certificate a verifying server must refuse and whose CA certificate makes a client
refuse our server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from daemonkit.tlsca import init_ca
from nbdserver.tls import write_psk_file
from tests.helpers.images import DISK_SIZE
from tests.helpers.servers import BaselineServer, stop_healthy

PSK_IDENTITY = "alice"


@dataclass(frozen=True)
class Pki:
    good: Path         # ca-cert, server-*, client-*, keys.psk (alice)
    rogue: Path        # another CA with its own client certificate
    no_client: Path    # only good's ca-cert.pem: a client without a certificate
    wrong_psk: Path    # alice with another key


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    good, rogue, no_client, wrong_psk = (root / n for n in ("good", "rogue", "noclient", "wrongpsk"))
    init_ca(good, hosts=["nbd.test"])
    init_ca(rogue)
    write_psk_file(good / "keys.psk", PSK_IDENTITY)
    no_client.mkdir()
    (no_client / "ca-cert.pem").write_bytes((good / "ca-cert.pem").read_bytes())
    wrong_psk.mkdir()
    write_psk_file(wrong_psk / "keys.psk", PSK_IDENTITY)
    return Pki(good, rogue, no_client, wrong_psk)


@pytest.fixture
def tls_server(tmp_path):
    """start(*tls_args) -> a BaselineServer exporting `disk` (64 MiB, writable, default);
    each must be healthy (no traceback) and stop cleanly on SIGTERM."""
    started: list[BaselineServer] = []

    def start(*tls_args: str, exports=None) -> BaselineServer:
        exports = exports or [f"disk={tmp_path / 'disk.img'},size={DISK_SIZE}"]
        srv = BaselineServer(tmp_path, exports, extra_args=list(tls_args),
                             name=f"tlsserver{len(started)}").start()
        started.append(srv)
        return srv

    yield start
    stop_healthy(started, skip_exited=False)


def cert_uri(srv, certs: Path, export: str = "disk") -> str:
    return f"nbds://{srv.host}:{srv.port}/{export}?tls-certificates={certs}"


def psk_uri(srv, psk_file: Path, identity: str = PSK_IDENTITY, export: str = "disk") -> str:
    return f"nbds://{identity}@{srv.host}:{srv.port}/{export}?tls-psk-file={psk_file}"
