"""BackupOperations built alone (keyservice/domain/backup_ops.py): its constructor names
all it uses, a ServiceCore and the key operations, so fakes of those two are enough to
run it, with no KeyService, database or daemon around it."""

from __future__ import annotations

import json

import pytest

from keyservice.domain import hsm_keys, rsakeys
from keyservice.domain.backup_ops import AAD, BackupOperations
from keyservice.domain.errors import Forbidden
from keyservice.domain.identities import Caller
from keyservice.domain.keys import KEY_OPS, Key, KeyVersion
from keyservice.domain.vaults import Vault

CALLER = Caller("caller-1", "tenant-a")
VAULT = Vault(name="v1", tenant_id="tenant-a", subscription="s", location="l", retention_days=7,
              purge_protection=False, owner="caller-1", created=1.0, id="vault-id")


def _version(version: str, kty: str = hsm_keys.KTY_SOFTWARE) -> KeyVersion:
    return KeyVersion(version=version, size=2048, public_der=b"public-" + version.encode(),
                      enabled=True, nbf=None, exp=None, key_ops=KEY_OPS, created=2.0,
                      updated=2.0, kty=kty)


class FakeSeal:
    """Seals by tagging the plaintext with its AAD, so the test can read what was sealed."""

    def seal(self, data: bytes, aad: str) -> bytes:
        return aad.encode() + b"|" + data


class FakeStore:
    def __init__(self):
        self.backup_seal = FakeSeal()
        self.read: list[tuple[str, str, str]] = []

    def private_der(self, vault: str, name: str, version: str) -> bytes:
        self.read.append((vault, name, version))
        return b"private-" + version.encode()


class FakeCore:
    """The part of ServiceCore that backups use: authorization and the store."""

    def __init__(self, store: FakeStore):
        self.store = store
        self.authorized: list[tuple[str, str, str]] = []

    def authorize(self, caller: Caller, vault: str, permission: str) -> Vault:
        self.authorized.append((caller.object_id, vault, permission))
        return VAULT


class FakeKeys:
    def __init__(self, key: Key):
        self.key_ = key
        self.asked: list[tuple[str, str, bool]] = []

    def key(self, vault: Vault, name: str, *, deleted: bool = False) -> Key:
        self.asked.append((vault.name, name, deleted))
        return self.key_


def test_a_backup_asks_the_core_for_the_backup_permission_and_the_keys_for_the_active_key():
    store = FakeStore()
    core = FakeCore(store)
    keys = FakeKeys(Key("v1", "k1", 1.5, [_version("a1"), _version("b2")]))
    blob = BackupOperations(core, keys).backup_key(CALLER, "v1", "k1")

    assert core.authorized == [("caller-1", "v1", "backup")]
    assert keys.asked == [("v1", "k1", False)]
    assert store.read == [("v1", "k1", "a1"), ("v1", "k1", "b2")]
    aad, _, sealed = blob.partition(b"|")
    assert aad == AAD.encode()
    backup = json.loads(sealed)
    assert (backup["tenantId"], backup["name"]) == ("tenant-a", "k1")
    assert [rsakeys.b64u_decode(v["private"]) for v in backup["versions"]] == [b"private-a1",
                                                                               b"private-b2"]


def test_a_key_with_an_hsm_version_is_refused_before_any_private_key_is_read():
    store = FakeStore()
    keys = FakeKeys(Key("v1", "k1", 1.5, [_version("a1"), _version("b2", hsm_keys.KTY_HSM)]))
    with pytest.raises(Forbidden, match="RSA-HSM"):
        BackupOperations(FakeCore(store), keys).backup_key(CALLER, "v1", "k1")
    assert store.read == []
