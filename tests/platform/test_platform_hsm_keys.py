"""A disk encryption set on an RSA-HSM key (issue 18), end to end: the platform does not
know or care that the customer's key lives in a PKCS#11 token (SoftHSM2 here). The disk
is created, served over NBD, locked when the owner disables the key and unlocked when
they enable it, as on a software key; the DEK's envelope is unwrapped in the token."""

from __future__ import annotations

from tests.helpers.platform import connect_refused, pattern, wait_for_eio, wait_for_io
from tests.helpers.softhsm import make_token


def test_disk_on_an_rsa_hsm_key(make_stack, tmp_path):
    token = make_token(tmp_path / "hsm")
    stack = make_stack(ks_args=token.serve_args())
    stack.keyservice("vault", "create", "hsmv", "--location", "local", "--subscription", "sub1",
                     "--enable-purge-protection")
    bundle = stack.keyservice("key", "create", "hsmv", "k1", "--kty", "RSA-HSM", "--size", "2048")
    assert bundle["key"]["kty"] == "RSA-HSM"
    shown = stack.nbdserver("des", "create", "des-hsm", "--key-url", stack.key_url("hsmv", "k1"))
    stack.grant("hsmv", shown["identity"]["objectId"])
    stack.create_disk("hsm1", "--size", "16M", "--des", "des-hsm")
    env = stack.nbdserver("disk", "key-envelope", "hsm1")
    assert env["kid"].endswith(bundle["key"]["kid"].split("/vaults/", 1)[1])
    assert len(stack.dek("hsm1")) == 64  # the envelope unwraps (in the token) to an XTS key

    h = stack.connect("hsm1")
    data = pattern(7, 1 << 20)
    h.pwrite(data, 4096)
    h.flush()
    assert h.pread(len(data), 4096) == data
    stack.keyservice("key", "disable", "hsmv", "k1")
    wait_for_eio(h)
    stack.wait_serving("hsm1", "locked")
    assert connect_refused(stack, "hsm1")
    stack.keyservice("key", "enable", "hsmv", "k1")
    wait_for_io(h)
    assert h.pread(len(data), 4096) == data  # the same handle, no reconnect
    h.shutdown()
