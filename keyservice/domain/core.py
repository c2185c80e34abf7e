"""What every operation of the service shares: the store, the clock, who may
touch a vault, and how a change and its events are committed together.

One ServiceCore is built by KeyService and handed to each group of operations
(directory.py, vault_ops.py, key_ops.py, backup_ops.py), which call it and
nothing of each other but what their constructors name."""
import logging
from collections.abc import Callable
from contextlib import contextmanager

from . import hsm_keys, policies
from .clock import Clock, system_clock
from .errors import Forbidden, NotFound, Unauthorized
from .events import Event
from .identities import Caller
from .names import check_vault_name
from .vaults import Vault, VaultState

log = logging.getLogger("keyservice")


class ServiceCore:
    def __init__(self, store, home_tenant: str, clock: Clock = system_clock,
                 base_url: str = "http://127.0.0.1"):
        self.store = store
        self.clock = clock
        self.base_url = base_url.rstrip("/")
        # The bootstrap admin's tenant: its admins may found tenants and read the service chain.
        self.home_tenant = home_tenant
        # The PKCS#11 token of RSA-HSM keys, if configured (set once the token is opened).
        self.hsm: hsm_keys.Token | None = None
        self.notify: Callable[[int], None] = lambda seq: None  # set by the API: wakes subscribers
        self._doomed_token_objects: list[bytes] = []

    def kid(self, vault: str, name: str, version: str | None = None) -> str:
        kid = f"{self.base_url}/vaults/{vault}/keys/{name}"
        return f"{kid}/{version}" if version else kid

    @contextmanager
    def change(self):
        """One transaction for a change and the events describing it; subscribers
        are woken only after the commit, so they never see an uncommitted change."""
        pending: list[Event] = []
        self._doomed_token_objects = []
        with self.store.transaction():
            yield pending
            for e in pending:
                e.seq = self.store.add_event(e)
        self._destroy_doomed_token_objects()
        if pending:
            self.notify(pending[-1].seq)

    # A purge (of a key, by retention, of a vault) destroys the token objects of its RSA-HSM
    # versions after the commit: a purge that fails to commit must leave usable keys. A
    # destroy that fails leaves an object no row names, unusable through the service.
    def doom_token_objects(self, vault: str, name: str | None = None) -> None:
        names = [name] if name else (self.store.key_names(vault, False) + self.store.key_names(vault, True))
        for n in names:
            key = self.store.key(vault, n)
            for kv in key.versions if key else ():
                if kv.kty == hsm_keys.KTY_HSM:
                    ref = self.store.private_der(vault, n, kv.version)
                    self._doomed_token_objects.append(hsm_keys.parse_reference(ref)[1])

    def _destroy_doomed_token_objects(self) -> None:
        doomed, self._doomed_token_objects = self._doomed_token_objects, []
        if self.hsm is not None:
            for object_id in doomed:
                try:
                    self.hsm.destroy(object_id)
                except Exception:  # the purge is committed: say so, do not fail the call
                    log.warning("purged key's token object %s was not destroyed; remove it with "
                                "the token's tools", object_id.hex(), exc_info=True)

    def event(self, type_: str, vault: str, key=None, version=None, object_id=None,
              tenant: str | None = None) -> Event:
        """`tenant`: the vault's, looked up unless given (a purged vault's row is gone).
        The change stream delivers an event only to subscribers of that tenant."""
        kid = self.kid(vault, key, version) if key else None
        if tenant is None:
            tenant = self.store.vault(vault).tenant_id
        return Event(type=type_, vault=vault, key=key, version=version, kid=kid,
                     objectId=object_id, time=self.clock(), tenantId=tenant)

    def vault(self, caller: Caller, name: str, *, deleted: bool = False) -> Vault:
        """The vault in the expected state, visible to the caller's tenant."""
        check_vault_name(name)
        vault = self.store.vault(name)
        wanted = VaultState.SOFT_DELETED if deleted else VaultState.ACTIVE
        if vault is None or vault.state is not wanted:
            what = "deleted vault" if deleted else "vault"
            raise NotFound(f"The {what} '{name}' was not found", code="VaultNotFound")
        if vault.tenant_id != caller.tenant_id:
            # Key Vault answers a token from another tenant with 401 (AKV10032).
            raise Unauthorized(f"The token's tenant '{caller.tenant_id}' is not the tenant of "
                               f"key vault '{name}'")
        return vault

    def require(self, caller: Caller, vault: Vault, permission: str) -> None:
        policies.require(self.store.policies(vault.name), caller.object_id, vault.name, permission)

    def authorize(self, caller: Caller, vault: str, permission: str) -> Vault:
        """The active vault, once the caller's access policy grants `permission` on it.
        Checked before slow work (RSA generation), and again inside the transaction."""
        v = self.vault(caller, vault)
        self.require(caller, v, permission)
        return v

    def purge(self, vault: Vault) -> None:
        """The vault and its keys go; its audit chain is closed, not deleted: a last entry
        says so, and from then on only the service's auditors (admins of the home tenant)
        read it, by the vault's id. A new vault of the same name starts a new chain."""
        self.doom_token_objects(vault.name)
        self.store.close_audit_chain(vault, {"time": self.clock(), "operation": "ChainClosed",
                                             "vault": vault.name, "vaultId": vault.id})
        self.store.purge_vault(vault.name)

    def manage(self, caller: Caller, vault: Vault, action: str) -> None:
        """Management-plane rights (delete, recover, purge, policies): the vault's
        creator, or an admin of its tenant. Access policies govern keys only."""
        if caller.object_id != vault.owner and not caller.is_admin:
            raise Forbidden(f"The user, group or application '{caller.object_id}' may not "
                            f"{action} key vault '{vault.name}': only its owner or an admin can",
                            permission=f"vaults/{action}")
