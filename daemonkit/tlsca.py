"""A small certificate authority for test and demo set-ups, and the files it writes.

`init_ca(dir, hosts=[...])` writes one directory in the layout GnuTLS-based clients
read directly (qemu's `tls-creds-x509,dir=DIR`, libnbd's `tls-certificates=DIR`,
nbd-client's `-cacert/-certfile/-keyfile`):

    ca-cert.pem        the CA certificate: what every peer trusts
    ca-key.pem         the CA private key (0600): keep it off servers and clients; written
                       elsewhere (`ca_key_file`) or not at all (`keep_ca_key=False`) on request
    server-cert.pem    the server certificate, SANs for localhost, 127.0.0.1, ::1 and `hosts`
    server-key.pem     its key (0600)
    client-cert.pem    a client certificate (CN = client_name), for client authentication
    client-key.pem     its key (0600)

Both daemons use it (`nbdserver tls init`, `keyservice tls init`), so it lives in
daemonkit, which neither daemon's package owns.
A real deployment uses its own CA instead: the files only need these names
(docs/tls.md). All cryptography comes from `cryptography`; keys are ECDSA P-256,
which OpenSSL, GnuTLS and every client in use here accept.

Private keys are created 0600 from the first byte (os.open with the mode), never
chmodded after a world-readable moment. The CA key is what lets anyone mint a server
certificate every peer trusts: `scripts/install` does not keep it on the host
(`keep_ca_key=False`: it exists in memory only while the leaves are signed); `tls init
--ca-key FILE` keeps it only where asked, e.g. on removable media.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca-cert.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
# Private keys that can sign a certificate (a CA made elsewhere may hold any of them).
_ISSUER_KEYS = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey,
                ed448.Ed448PrivateKey, dsa.DSAPrivateKey)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Long enough for a demo or test set-up to outlive its use; a real CA sets its own.
DEFAULT_DAYS = 825


class CaError(Exception):
    """A CA directory that cannot be used or created: the message says why."""


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes  # ECDSA P-256 when this module made the CA


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "encrypted-disks"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(hosts) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):  # ordered, no duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            entries.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(entries)


def _validity(days: int):
    now = datetime.datetime.now(datetime.UTC)
    # A minute back: a peer whose clock is slightly behind still accepts a fresh cert.
    return now - datetime.timedelta(minutes=1), now + datetime.timedelta(days=days)


def make_ca(cn: str = "encrypted-disks test CA", days: int = DEFAULT_DAYS) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert, key)


def issue(ca: Issued, cn: str, *, server: bool, hosts=(), days: int = DEFAULT_DAYS) -> Issued:
    """A leaf certificate signed by `ca`: for a server (SANs = hosts) or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (x509.CertificateBuilder()
         .subject_name(_name(cn)).issuer_name(ca.cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                      content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                        critical=False))
    if server:
        b = b.add_extension(_san(hosts), critical=False)
    return Issued(b.sign(ca.key, hashes.SHA256()), key)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret 0600 from the start; replace atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_ca(directory: Path, key_file=None) -> Issued:
    directory = Path(directory)
    key_file = Path(key_file) if key_file else directory / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    except FileNotFoundError as e:
        raise CaError(f"no CA in {directory}: {e.filename} is missing") from None
    except ValueError as e:
        raise CaError(f"cannot read the CA in {directory}: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except FileNotFoundError:
        raise CaError(f"the CA of {directory} has no private key at {key_file} (it was not kept, "
                      "or is kept elsewhere): give its place (--ca-key), or make a new CA "
                      "(--force; every peer must then trust the new ca-cert.pem)") from None
    except ValueError as e:
        raise CaError(f"cannot read the CA in {directory}: {e}") from None
    if not isinstance(key, _ISSUER_KEYS):
        raise CaError(f"the CA key in {directory} cannot sign certificates")
    return Issued(cert, key)


def init_ca(directory, *, hosts=(), server_cn: str = "localhost", client_name: str = "client",
            days: int = DEFAULT_DAYS, force: bool = False, ca_key_file=None,
            keep_ca_key: bool = True) -> list[Path]:
    """Create the CA, a server and a client certificate in `directory`; the paths written.

    The CA key goes to `ca_key_file` (default DIRECTORY/ca-key.pem), or nowhere with
    `keep_ca_key=False`. An existing CA in the directory is reused (new leaves, same
    trust; its key read from the same place) unless `force`; refusing to overwrite
    silently keeps clients that trust the old CA working.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key_path = Path(ca_key_file) if ca_key_file else directory / CA_KEY
    if (directory / CA_CERT).exists() and not force:
        ca = load_ca(directory, key_path)
        written = []
    else:
        ca = make_ca(days=days)
        written = [directory / CA_CERT]
        if keep_ca_key:
            key_path.parent.mkdir(parents=True, exist_ok=True)
            write_private(key_path, _key_pem(ca.key))
            written.append(key_path)
        if (not keep_ca_key or key_path != directory / CA_KEY) and (directory / CA_KEY).exists():
            os.unlink(directory / CA_KEY)  # a forced new CA: the old one's key must not linger
        _write_cert(directory / CA_CERT, ca.cert)
    server = issue(ca, server_cn, server=True, hosts=[*LOOPBACK_NAMES, *hosts], days=days)
    client = issue(ca, client_name, server=False, days=days)
    for cert_name, key_name, leaf in ((SERVER_CERT, SERVER_KEY, server), (CLIENT_CERT, CLIENT_KEY, client)):
        write_private(directory / key_name, _key_pem(leaf.key))
        _write_cert(directory / cert_name, leaf.cert)
        written += [directory / cert_name, directory / key_name]
    return written


def check_private_file(path) -> None:
    """Refuse a secret that any user may read or write (as ssh refuses loose keys).

    Group read stays allowed: Debian's convention for TLS keys is 0640 root:ssl-cert, and
    a group is a deliberate grant; "other" access never is. The owner must be this
    process's user or root: another user owns the file's mode too, and could widen it
    or swap the secret at any time.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CaError(f"{path}: no such file") from None
    mode = st.st_mode
    if mode & 0o027:
        raise CaError(f"{path} is readable or writable by others (mode {mode & 0o777:o}); "
                      "chmod 600 it")
    if st.st_uid not in (0, os.geteuid()):
        raise CaError(f"{path} is owned by uid {st.st_uid}, neither this user "
                      f"(uid {os.geteuid()}) nor root; chown it")
