"""Key operations. Each names the access-policy permission it needs, first thing."""
import contextlib
import functools
from collections.abc import Callable

from . import hsm_keys, rsakeys
from .core import ServiceCore
from .errors import BadRequest, NotFound
from .identities import Caller
from .keys import (
    IMPORT_OP,
    KEY_OPS,
    Attributes,
    Key,
    KeyState,
    KeyVersion,
    check_not_deleted_name,
    new_version_id,
)
from .names import check_key_name, check_version
from .vaults import Vault


class KeyOperations:
    def __init__(self, core: ServiceCore):
        self.core = core

    def key(self, vault: Vault, name: str, *, deleted: bool = False) -> Key:
        """The vault's key of that name in the expected state (active, or soft-deleted)."""
        check_key_name(name)
        key = self.core.store.key(vault.name, name)
        wanted = KeyState.SOFT_DELETED if deleted else KeyState.ACTIVE
        if key is None or key.state is not wanted:
            what = "deleted key" if deleted else "key"
            raise NotFound(f"A {what} with (name/id) {name} was not found in this key vault",
                           code="KeyNotFound")
        return key

    # Create, import and rotate run in three steps so that the expensive middle one (RSA
    # generation, parsing an imported key) runs off the domain thread and only for an
    # authorized caller: authorize_version (cheap), the work, add_version (re-checks all).
    def authorize_version(self, caller: Caller, vault: str, name: str, permission: str) -> int | None:
        """Refuse early what add_version would refuse; the current size (for rotate), if any."""
        v = self.core.authorize(caller, vault, permission)
        check_key_name(name)
        if permission == "rotate":
            return self.key(v, name).current.size
        check_not_deleted_name(self.core.store.key(vault, name), name)
        return None

    def add_version(self, caller: Caller, vault: str, name: str, permission: str, private,
                    attributes: Attributes | None = None):
        with self._discarding_on_failure(private):
            if permission == "rotate":
                self.key(self.core.authorize(caller, vault, "rotate"), name)  # still there, not deleted
            return self._add_version(caller, vault, name, permission, private, attributes,
                                     "key.rotated")

    # RSA-HSM: the pair is made in the token before the version is committed; a commit that
    # is refused (a permission revoked meanwhile, the name taken) destroys it again.
    @contextlib.contextmanager
    def _discarding_on_failure(self, private):
        try:
            yield
        except BaseException:
            if isinstance(private, hsm_keys.HsmKeyMaterial) and self.core.hsm is not None:
                self.core.hsm.destroy(private.object_id)
            raise

    def generate_key(self, kty: str, size: int, kek: bool = False):
        """New key material of a kind: a software key pair, or a pair made in the token
        (`kek`: a key-exchange key, whose private half unwraps keys and decrypts nothing)."""
        if hsm_keys.check_kty(kty) == hsm_keys.KTY_HSM:
            return hsm_keys.require_token(self.core.hsm).generate_rsa(rsakeys.check_size(size), kek=kek)
        if kek:
            raise BadRequest("key_ops import is for key-exchange keys, which are RSA-HSM")
        return rsakeys.generate(rsakeys.check_size(size))

    def current_kty(self, caller: Caller, vault: str, name: str) -> tuple[str, bool]:
        """What a rotation makes: a key of the current version's kind (and a KEK of a KEK)."""
        current = self.key(self.core.authorize(caller, vault, "rotate"), name).current
        if current.kty == hsm_keys.KTY_HSM:
            hsm_keys.require_token(self.core.hsm)  # before any work
        return current.kty, IMPORT_OP in current.key_ops

    def _add_version(self, caller: Caller, vault_name: str, name: str, permission: str,
                     private, attributes: Attributes | None, event_new: str):
        """Create, import and rotate all end here: a new version becomes current."""
        now = self.core.clock()
        with self.core.change() as events:
            vault = self.core.vault(caller, vault_name)
            self.core.require(caller, vault, permission)
            check_key_name(name)
            key = self.core.store.key(vault_name, name)
            check_not_deleted_name(key, name)
            is_new = key is None
            if is_new:
                key = Key(vault_name, name, now)
                self.core.store.put_key(key)
            in_token = isinstance(private, hsm_keys.HsmKeyMaterial)
            kek = in_token and private.kek
            v = KeyVersion(version=new_version_id(), size=private.key_size,
                           public_der=rsakeys.public_der(private.public_key()), enabled=True,
                           nbf=None, exp=None, key_ops=(IMPORT_OP,) if kek else KEY_OPS,
                           created=now, updated=now,
                           kty=hsm_keys.KTY_HSM if in_token else hsm_keys.KTY_SOFTWARE)
            if attributes is not None:
                attributes.apply(v, now)
            hsm_keys.check_kek_ops(kek, v.key_ops)
            self.core.store.add_version(key, v, private.reference() if in_token
                                   else rsakeys.private_der(private))
            key.versions.append(v)
            events.append(self.core.event("key.created" if is_new else event_new, vault_name, name,
                                          v.version))
        return vault, key, v

    # The one-call forms below do all three steps on the calling thread (tests, tools);
    # the API uses the steps (api/keys.py).
    def create_key(self, caller: Caller, vault: str, name: str, size=rsakeys.DEFAULT_SIZE,
                   attributes: Attributes | None = None, kty: str = hsm_keys.KTY_SOFTWARE):
        self.core.authorize(caller, vault, "create")
        private = self.generate_key(kty, size)
        with self._discarding_on_failure(private):
            return self._add_version(caller, vault, name, "create", private, attributes,
                                     "key.rotated")

    def import_key(self, caller: Caller, vault: str, name: str, private,
                   attributes: Attributes | None = None):
        return self._add_version(caller, vault, name, "import", private, attributes, "key.rotated")

    def rotate_key(self, caller: Caller, vault: str, name: str):
        v = self.core.authorize(caller, vault, "rotate")
        current = self.key(v, name).current
        private = self.generate_key(current.kty, current.size, IMPORT_OP in current.key_ops)
        with self._discarding_on_failure(private):
            return self._add_version(caller, vault, name, "rotate", private, None, "key.rotated")

    def authorize_byok(self, caller: Caller, vault: str, kek_kid: str) -> tuple[bytes, int]:
        """The token object and size of the key-exchange key a transfer blob names, once the
        caller may import into `vault` and the KEK, in that same vault, allows import."""
        kek_vault, kek_name, kek_version = hsm_keys.parse_kek_kid(kek_kid)
        if kek_vault != vault:
            raise BadRequest(f"The key-exchange key must be in key vault '{vault}', where the key "
                             "is imported")
        key, kv = self._usable(caller, vault, kek_name, kek_version, IMPORT_OP)
        if kv.kty != hsm_keys.KTY_HSM:  # import in key_ops is given to RSA-HSM keys only
            raise BadRequest("The key-exchange key is not an RSA-HSM key")
        label, object_id = hsm_keys.parse_reference(self.core.store.private_der(vault, kek_name, kv.version))
        hsm_keys.require_token(self.core.hsm, label)
        return object_id, kv.size

    def get_key(self, caller: Caller, vault: str, name: str, version: str | None = None):
        v = self.core.authorize(caller, vault, "get")
        if version:
            check_version(version)
        key = self.key(v, name)
        return v, key, key.version(version)

    def list_keys(self, caller: Caller, vault: str, deleted: bool = False):
        v = self.core.authorize(caller, vault, "list")
        return v, [self.core.store.key(vault, n) for n in self.core.store.key_names(vault, deleted)]

    def list_versions(self, caller: Caller, vault: str, name: str):
        v = self.core.authorize(caller, vault, "list")
        return v, self.key(v, name)

    def update_key(self, caller: Caller, vault: str, name: str, version: str | None,
                   attributes: Attributes):
        if version:
            check_version(version)
        with self.core.change() as events:
            v = self.core.authorize(caller, vault, "update")
            key = self.key(v, name)
            kv = key.version(version)
            before = (kv.enabled, kv.nbf, kv.exp, kv.key_ops)
            attributes.apply(kv, self.core.clock())
            hsm_keys.check_kek_ops(IMPORT_OP in before[3], kv.key_ops)
            self.core.store.put_version_attributes(key, kv)
            if kv.enabled != before[0]:
                events.append(self.core.event("key.enabled" if kv.enabled else "key.disabled",
                                          vault, name, kv.version))
            if (kv.nbf, kv.exp, kv.key_ops) != before[1:]:
                events.append(self.core.event("key.updated", vault, name, kv.version))
        return v, key, kv

    def _usable(self, caller: Caller, vault: str, name: str, version: str | None, op: str):
        if version:
            check_version(version)
        v = self.core.authorize(caller, vault, op)
        key = self.key(v, name)
        kv = key.version(version)
        kv.check_usable(op, self.core.clock())
        return key, kv

    # wrap and unwrap in two steps: authorize (here, on the domain thread: the store and
    # the key's state), then the RSA operation, which the API runs on its own pool so the
    # domain thread is not held by it. The authorization is the call's moment: a disable
    # that commits after it does not stop the operation, as a disable that commits while
    # the answer travels back never did.
    def authorize_wrap(self, caller: Caller, vault: str, name: str, version: str | None,
                       alg) -> tuple[str, Callable[[bytes], bytes]]:
        """The kid and the wrap to run (bytes -> wrapped bytes), once allowed."""
        rsakeys.check_alg(alg)
        key, kv = self._usable(caller, vault, name, version, "wrapKey")
        public = rsakeys.load_public_der(kv.public_der)
        return self.core.kid(vault, name, kv.version), functools.partial(rsakeys.wrap, public, alg)

    def authorize_unwrap(self, caller: Caller, vault: str, name: str, version: str | None,
                         alg) -> tuple[str, Callable[[bytes], bytes]]:
        """The kid and the unwrap to run (wrapped bytes -> bytes), once allowed."""
        rsakeys.check_alg(alg)
        key, kv = self._usable(caller, vault, name, version, "unwrapKey")
        if kv.kty == hsm_keys.KTY_HSM:  # the private operation runs in the token
            label, object_id = hsm_keys.parse_reference(self.core.store.private_der(vault, name, kv.version))
            token = hsm_keys.require_token(self.core.hsm, label)
            return (self.core.kid(vault, name, kv.version),
                    functools.partial(token.unwrap, object_id, kv.size, alg))
        private = self.core.store.private_key(vault, name, kv.version)
        return self.core.kid(vault, name, kv.version), functools.partial(rsakeys.unwrap, private, alg)

    def wrap(self, caller: Caller, vault: str, name: str, version: str | None, alg, value: bytes):
        kid, op = self.authorize_wrap(caller, vault, name, version, alg)
        return kid, op(value)

    def unwrap(self, caller: Caller, vault: str, name: str, version: str | None, alg, value: bytes):
        kid, op = self.authorize_unwrap(caller, vault, name, version, alg)
        return kid, op(value)

    def delete_key(self, caller: Caller, vault: str, name: str):
        with self.core.change() as events:
            v = self.core.authorize(caller, vault, "delete")
            key = self.key(v, name)
            key.soft_delete(self.core.clock(), v.retention_days)
            self.core.store.put_key(key)
            events.append(self.core.event("key.deleted", vault, name))
        return v, key

    def get_deleted_key(self, caller: Caller, vault: str, name: str):
        v = self.core.authorize(caller, vault, "get")
        return v, self.key(v, name, deleted=True)

    def recover_key(self, caller: Caller, vault: str, name: str):
        with self.core.change() as events:
            v = self.core.authorize(caller, vault, "recover")
            key = self.key(v, name, deleted=True)
            key.recover()
            self.core.store.put_key(key)
            events.append(self.core.event("key.recovered", vault, name))
        return v, key, key.current

    def purge_key(self, caller: Caller, vault: str, name: str) -> None:
        with self.core.change() as events:
            v = self.core.authorize(caller, vault, "purge")
            key = self.key(v, name, deleted=True)
            key.check_purge(self.core.clock(), v.purge_protection)
            self.core.doom_token_objects(vault, name)
            self.core.store.purge_key(vault, name)
            events.append(self.core.event("key.purged", vault, name))
