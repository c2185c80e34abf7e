"""No secret in the clear where it could leak: data directories, logs, core dumps.

A workload over the whole platform (a platform-key disk, two customer-key disks, one of
them under an imported RSA key whose PEM the test knows, writes, a snapshot, a
revocation and its return, an extra identity and its token) and then a byte scan of both
daemons' data directories (SQLite files and WAL included) and of everything they logged,
for: every disk's DEK (and each XTS half, raw, hex and base64), the imported private key
(PEM, PKCS#8 and PKCS#1 DER, the private exponent), the identity's client secret and the
bearer tokens the test holds.

What may hold a secret by design, and is checked to be 0600 instead: the key service's
admin credential, the platform's API token and master key file.

Core dumps: the DEKs must be in nbdserver's memory while a disk is served, and the
private keys in the key service's while it unwraps; a core file would write them out.
Both daemons call harden_process() at start (RLIMIT_CORE 0, PR_SET_DUMPABLE 0), checked
here in /proc/PID/limits (the hard limit too: the process cannot raise it again).
"""

from __future__ import annotations

import base64
import os
import stat

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.helpers.platform import Stack, _http, scan_for, wait_for_eio, wait_for_io
from tests.reliability.crashlog import DurabilityClient

BY_DESIGN = ("admin.credential", "api.token", "master.key", "platform.key")


def forms(name: str, secret: bytes) -> dict[str, bytes]:
    return {f"{name} (raw)": secret, f"{name} (hex)": secret.hex().encode(),
            f"{name} (HEX)": secret.hex().upper().encode(),
            f"{name} (base64)": base64.b64encode(secret).rstrip(b"="),
            f"{name} (base64url)": base64.urlsafe_b64encode(secret).rstrip(b"=")}


def core_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max core file size"):
                return " ".join(line.split()[4:6])
    raise AssertionError("no core limit line")


def test_no_secret_in_data_dirs_logs_or_core_dumps(tmp_path, seeded_rng):
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pkcs8 = priv.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    pkcs1 = priv.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                               serialization.NoEncryption())
    d = priv.private_numbers().d.to_bytes(256, "big")
    (tmp_path / "imported.pem").write_bytes(pem)
    with Stack(tmp_path / "stack", lease=1) as stack:
        for daemon in (stack.ks, stack.nb):
            assert core_limit(daemon.pid) == "0 0", f"{daemon.name} may dump core"
        stack.customer_key("secvault", "k1", "des1")
        stack.keyservice("key", "import", "secvault", "k2", "--pem", tmp_path / "imported.pem")
        shown = stack.nbdserver("des", "create", "des2", "--key-url", stack.key_url("secvault", "k2"))
        stack.grant("secvault", shown["identity"]["objectId"])
        disks = {"pmk": (), "cmk": ("--des", "des1"), "imported": ("--des", "des2")}
        for name, args in disks.items():
            stack.create_disk(name, "--size", "8M", *args)
            c = DurabilityClient(stack.nbd_uri(name), 0, 0, seeded_rng, depth=8)
            c.run(total=200)
            c.close()
        stack.nbdserver("snapshot", "create", "snap", "--disk", "cmk")
        h = stack.connect("cmk")
        stack.keyservice("key", "disable", "secvault", "k1")
        wait_for_eio(h)
        stack.keyservice("key", "enable", "secvault", "k1")
        wait_for_io(h)
        h.shutdown()
        status, ident = stack.ks_api("POST", "/identities", {"displayName": "scanner",
                                                             "type": "servicePrincipal"})
        assert status in (200, 201), ident
        status, tok = _http(stack.ks_url, "POST", "/oauth2/token", {
            "grant_type": "client_credentials", "client_id": ident["clientId"],
            "client_secret": ident["clientSecret"]})
        assert status == 200, tok
        deks = {name: stack.dek(name) for name in disks}
        stack.assert_healthy()
        admin_token = stack._admin_token
        ks_dir, nb_dir = stack.ks_dir, stack.nb_dir
        stack.stop_nbdserver()
        stack.stop_keyservice()
        logs = stack.logs()
    needles = {}
    for name, dek in deks.items():
        assert len(dek) == 64
        needles |= forms(f"DEK {name}", dek) | forms(f"DEK {name} half 1", dek[:32]) \
            | forms(f"DEK {name} half 2", dek[32:])
    needles |= {"private key PEM": b"".join(pem.splitlines()[1:-1])[:64],
                "private key PKCS#8": pkcs8[-600:], "private key PKCS#1": pkcs1[-600:]}
    needles |= forms("private exponent", d)
    needles |= {"client secret": ident["clientSecret"].encode(),
                "scanner token": tok["access_token"].encode()}
    if admin_token:
        needles["admin token"] = admin_token.encode()
    hits = [h for h in scan_for(needles, [ks_dir, nb_dir], [logs])]
    by_design = [h for h in hits if any(h.endswith(n) for n in BY_DESIGN)]
    assert not [h for h in hits if h not in by_design], "secrets in the clear:\n" + "\n".join(hits)
    for root in (ks_dir, nb_dir):
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f in BY_DESIGN or f.endswith((".credential", ".key", ".token")):
                    mode = stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode)
                    assert mode == 0o600, f"{dirpath}/{f} is {oct(mode)}"
    print(f"\nsecrets: {len(needles)} needles over {ks_dir} {nb_dir} and {len(logs)} bytes of logs: "
          f"no hit outside the 0600 credential files ({len(by_design)} by design)")
