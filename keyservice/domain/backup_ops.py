"""Key backup and restore, as Key Vault does them.

A backup is one key with all its versions and their attributes, as an opaque blob
that only this service can open: AES-256-GCM under the store's backup seal (a key
derived from the master key for this purpose alone), so the private keys inside never
leave in the clear and a changed byte fails the whole blob. Key Vault's rules:
- restore only within the tenant the key was backed up in (Key Vault: the same
  subscription); another tenant's vault refuses the blob even though it opens;
- the key keeps its name and its version ids; restore is refused (409) while the
  vault has a key of that name, active or soft-deleted;
- `backup` and `restore` are key permissions of the access policy like any other.
Keys carry no tags here (keys.py refuses them), so a blob holds none.

A blob opens only with the master key that sealed it: a backup is restorable into
this service (any of its vaults of the same tenant), not into another installation.
"""
import json

from ..sealing import SealError
from . import hsm_keys, rsakeys
from .core import ServiceCore
from .errors import BadRequest, Conflict, Forbidden
from .identities import Caller
from .key_ops import KeyOperations
from .keys import KEY_OPS, Key, KeyVersion, check_not_deleted_name
from .names import check_key_name, check_version

FORMAT = "keyservice/key-backup/1"
AAD = "key-backup/v1"
# Restore takes the blob as base64url (4/3 of its size) in a JSON body capped at 1 MiB
# (api/body.py): a bigger blob could be made but never restored, so backup refuses it.
MAX_BLOB = 760 * 1024


def _pack(tenant: str, key: Key, private: dict[str, bytes]) -> bytes:
    return json.dumps({
        "format": FORMAT, "tenantId": tenant, "name": key.name, "created": key.created,
        "versions": [{"version": v.version, "size": v.size, "enabled": v.enabled, "nbf": v.nbf,
                      "exp": v.exp, "keyOps": list(v.key_ops), "created": v.created,
                      "updated": v.updated, "public": rsakeys.b64u_encode(v.public_der),
                      "private": rsakeys.b64u_encode(private[v.version])}
                     for v in key.versions],
    }).encode()


def _unpack(data: bytes) -> tuple[str, str, float, list[tuple[KeyVersion, bytes]]]:
    """(tenant, key name, created, [(version, its private key DER)]), checked: the blob
    opened, so this service made it, but maybe a version of it with another format."""
    try:
        backup = json.loads(data)
        if backup.get("format") != FORMAT:
            raise BadRequest(f"The backup blob's format {str(backup.get('format'))[:40]!r} is not "
                             f"one this service restores ({FORMAT})")
        check_key_name(backup["name"])
        versions = []
        for item in backup["versions"]:
            check_version(item["version"])
            if any(op not in KEY_OPS for op in item["keyOps"]):
                raise BadRequest("The backup blob names key operations this service does not have")
            kv = KeyVersion(version=item["version"], size=int(item["size"]),
                            public_der=rsakeys.b64u_decode(item["public"]),
                            enabled=bool(item["enabled"]), nbf=item["nbf"], exp=item["exp"],
                            key_ops=tuple(item["keyOps"]), created=float(item["created"]),
                            updated=float(item["updated"]))
            versions.append((kv, rsakeys.b64u_decode(item["private"])))
        if not versions:
            raise ValueError("no versions")
        return str(backup["tenantId"]), backup["name"], float(backup["created"]), versions
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BadRequest("The backup blob is malformed") from None


class BackupOperations:
    def __init__(self, core: ServiceCore, keys: KeyOperations):
        self.core = core
        self.keys = keys  # finds the key to back up; key_ops.py knows nothing of backups

    def backup_key(self, caller: Caller, vault: str, name: str) -> bytes:
        v = self.core.authorize(caller, vault, "backup")
        key = self.keys.key(v, name)  # an active key: Key Vault backs up no deleted one
        if any(kv.kty == hsm_keys.KTY_HSM for kv in key.versions):
            # The blob would hold only the token reference; a restore would make a second
            # key on the same token object, and purging either would destroy the other's.
            raise Forbidden(f"Operation backup is not allowed on key {name}: it has RSA-HSM "
                            "versions, whose private keys never leave the HSM",
                            inner="KeyNotBackupable")
        private = {kv.version: self.core.store.private_der(vault, name, kv.version) for kv in key.versions}
        blob = self.core.store.backup_seal.seal(_pack(v.tenant_id, key, private), AAD)
        if len(blob) > MAX_BLOB:
            raise BadRequest(f"Key {name} has too many versions ({len(key.versions)}) to back up: "
                             f"its backup would exceed {MAX_BLOB} bytes, more than restore accepts")
        return blob

    def restore_key(self, caller: Caller, vault: str, blob: bytes):
        """Authorization first: a caller without `restore` on the vault learns nothing
        about a blob, not even whether it opens."""
        with self.core.change() as events:
            v = self.core.authorize(caller, vault, "restore")
            if len(blob) > MAX_BLOB:
                raise BadRequest("The backup blob is larger than any this service makes")
            try:
                tenant, name, created, versions = _unpack(self.core.store.backup_seal.open(blob, AAD))
            except SealError:
                raise BadRequest("The backup blob is corrupt or was not made by this key "
                                 "service") from None
            if tenant != v.tenant_id:
                raise Forbidden(f"The backup was made in another tenant and can be restored only "
                                f"into a key vault of that tenant, not into '{vault}'",
                                permission="restore", inner="BackupFromAnotherTenant")
            existing = self.core.store.key(vault, name)
            check_not_deleted_name(existing, name)
            if existing is not None:
                raise Conflict(f"A key named {name} already exists in key vault '{vault}': restore "
                               "needs the name free (delete and purge the key first)")
            key = Key(vault, name, created)
            self.core.store.put_key(key)
            for kv, private in versions:
                self.core.store.add_version(key, kv, private)
                key.versions.append(kv)
            # For a subscriber a restored key is a new key, like a created one.
            events.append(self.core.event("key.created", vault, name, key.current.version))
        return v, key, key.current
