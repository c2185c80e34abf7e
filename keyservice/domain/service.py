"""The key service as one object: the directory, tokens, vaults, keys, audit
and the change stream. The API and the CLI talk only to this.

KeyService builds its parts, each with the dependencies its constructor names: a
ServiceCore (store, clock, transactions with their events, who may touch a vault)
that every part shares, and on it the directory, the vault operations, the key
operations and the backups (which find keys through the key operations; nothing
calls the other way). The operations callers use are listed below, one line each."""
import uuid
from collections.abc import Callable

from . import hsm_keys
from .backup_ops import BackupOperations
from .clock import system_clock
from .core import ServiceCore
from .directory import DirectoryOperations
from .errors import Forbidden, NotFound, Unauthorized
from .identities import Caller, Identity, new_identity
from .key_ops import KeyOperations
from .names import DEFAULT_RESERVED_PREFIXES
from .vault_ops import VaultOperations


def _home_tenant(store) -> str:
    """The bootstrap admin's tenant, made on the first start and kept in the store."""
    with store.transaction():
        tenant = store.meta("home_tenant")
        if tenant is None:
            tenant = str(uuid.uuid4())
            store.set_meta("home_tenant", tenant)
    return tenant


class KeyService:
    def __init__(self, store, signer, clock=None, base_url: str = "http://127.0.0.1",
                 reserved_prefixes=None, audiences=()):
        self.core = ServiceCore(store, _home_tenant(store), clock or system_clock, base_url)
        self.store = store
        self.signer = signer
        self.clock = self.core.clock
        self.base_url = self.core.base_url
        self.home_tenant = self.core.home_tenant
        self.directory = DirectoryOperations(self.core, signer,
                                             tuple(audiences) or (self.core.base_url,))
        self.vaults = VaultOperations(self.core, DEFAULT_RESERVED_PREFIXES
                                      if reserved_prefixes is None else reserved_prefixes)
        self.keys = KeyOperations(self.core)
        self.backups = BackupOperations(self.core, self.keys)

        # Bound methods, not wrappers: mypy keeps each one's signature for the callers.
        self.create_identity = self.directory.create_identity
        self.list_identities = self.directory.list_identities
        self.get_identity = self.directory.get_identity
        self.set_identity_enabled = self.directory.set_identity_enabled
        self.reset_identity_secret = self.directory.reset_identity_secret
        self.delete_identity = self.directory.delete_identity
        self.issue_token = self.directory.issue_token
        self.authenticate = self.directory.authenticate
        self.challenge_tenant = self.directory.challenge_tenant

        self.create_vault = self.vaults.create_vault
        self.get_vault = self.vaults.get_vault
        self.list_vaults = self.vaults.list_vaults
        self.update_vault = self.vaults.update_vault
        self.delete_vault = self.vaults.delete_vault
        self.get_deleted_vault = self.vaults.get_deleted_vault
        self.recover_vault = self.vaults.recover_vault
        self.purge_vault = self.vaults.purge_vault
        self.set_policy = self.vaults.set_policy
        self.delete_policy = self.vaults.delete_policy

        self.authorize_version = self.keys.authorize_version
        self.add_version = self.keys.add_version
        self.generate_key = self.keys.generate_key
        self.current_kty = self.keys.current_kty
        self.create_key = self.keys.create_key
        self.import_key = self.keys.import_key
        self.rotate_key = self.keys.rotate_key
        self.authorize_byok = self.keys.authorize_byok
        self.get_key = self.keys.get_key
        self.list_keys = self.keys.list_keys
        self.list_versions = self.keys.list_versions
        self.update_key = self.keys.update_key
        self.authorize_wrap = self.keys.authorize_wrap
        self.authorize_unwrap = self.keys.authorize_unwrap
        self.wrap = self.keys.wrap
        self.unwrap = self.keys.unwrap
        self.delete_key = self.keys.delete_key
        self.get_deleted_key = self.keys.get_deleted_key
        self.recover_key = self.keys.recover_key
        self.purge_key = self.keys.purge_key

        self.backup_key = self.backups.backup_key
        self.restore_key = self.backups.restore_key

    # Set after construction (server.py opens the token, the API wakes its subscribers);
    # the core holds them, as every part reads them there.
    @property
    def hsm(self) -> hsm_keys.Token | None:
        return self.core.hsm

    @hsm.setter
    def hsm(self, token: hsm_keys.Token | None) -> None:
        self.core.hsm = token

    @property
    def notify(self) -> Callable[[int], None]:
        return self.core.notify

    @notify.setter
    def notify(self, wake: Callable[[int], None]) -> None:
        self.core.notify = wake

    def bootstrap_admin(self, deliver) -> Identity | None:
        """On first start only: create the admin identity and hand its secret to
        `deliver(identity, secret)` (which writes DATA_DIR/admin.credential) before
        the commit, so a failed write leaves no admin whose secret nobody has.
        Later starts return None."""
        with self.store.transaction():
            if self.store.meta("admin_object_id") is not None:
                return None
            ident, secret = new_identity("admin", "user", ("admin",), self.home_tenant, self.clock())
            self.store.add_identity(ident)
            self.store.set_meta("admin_object_id", ident.object_id)
            deliver(ident, secret)
        return ident

    # -- audit --
    def record(self, entry: dict) -> None:
        """Append to the vault's chain when the call named an existing vault, else
        to the service chain (""), so made-up names cannot create chains."""
        self.store.append_audit(self._chain_of(entry), entry)

    def record_many(self, entries: list[dict]) -> list[Exception | None]:
        """Several calls' entries, in order, in one transaction (group commit: one fsync
        for all, api/audit_writer.py). If that transaction fails, each entry is tried on
        its own, so one that cannot be written costs no other its record. Returns each
        entry's error, None where it was committed."""
        try:
            self.store.append_audit_many([(self._chain_of(e), e) for e in entries])
            return [None] * len(entries)
        except Exception:
            if len(entries) == 1:
                raise
        outcomes: list[Exception | None] = []
        for entry in entries:
            try:
                self.record(entry)
                outcomes.append(None)
            except Exception as e:
                outcomes.append(e)
        return outcomes

    def _chain_of(self, entry: dict) -> str:
        vault = self.store.vault(entry["vault"]) if entry.get("vault") else None
        return vault.audit_chain if vault is not None else ""

    def _audit_chain(self, caller: Caller, vault: str | None, vault_id: str | None = None) -> str:
        """The chain a caller may read. The service chain (every tenant's calls that named
        no vault) and closed chains of purged vaults: admins of the home tenant only."""
        if not vault:
            if not caller.is_admin or caller.tenant_id != self.home_tenant:
                raise Forbidden("Only an admin of the service's home tenant may read the service "
                                "audit chain and the chains of purged vaults", permission="audit")
            if vault_id is None:
                return ""
            chain = self.store.audit_chain_of(vault_id)
            if chain is None:
                raise NotFound(f"No vault with id '{vault_id}' has an audit chain", code="VaultNotFound")
            return chain
        v = self.store.vault(vault)
        if v is None:  # a purged vault's chain is not readable by its (reusable) name
            raise NotFound(f"The vault '{vault}' was not found", code="VaultNotFound")
        if v.tenant_id != caller.tenant_id:
            raise Unauthorized(f"The token's tenant is not the tenant of key vault '{vault}'")
        if not caller.is_admin and caller.object_id != v.owner:
            raise Forbidden(f"The user, group or application '{caller.object_id}' may not read "
                            f"the audit log of key vault '{vault}'", permission="audit")
        return v.audit_chain

    def audit_entries(self, caller: Caller, vault: str | None, limit: int = 1000, after: int = 0,
                      vault_id: str | None = None, *, newest: bool = False, since: float | None = None):
        return self.store.audit_entries(self._audit_chain(caller, vault, vault_id), limit, after,
                                        newest=newest, since=since)

    def verify_audit(self, caller: Caller, vault: str | None, vault_id: str | None = None):
        return self.store.verify_audit(self._audit_chain(caller, vault, vault_id))

    # -- change stream --
    def check_subscriber(self, caller: Caller) -> None:
        if not (caller.is_admin or caller.is_platform):
            raise Forbidden(f"The identity '{caller.object_id}' may not follow the change "
                            "stream: the admin or platform role is required", permission="events")

    def events_after(self, caller: Caller, seq: int, limit: int = 500):
        """Only events of vaults of the caller's tenant (the stream crossed tenants)."""
        return self.store.events_after(seq, limit, caller.tenant_id)

    def last_event_seq(self) -> int:
        return self.store.last_event_seq()

    def announce_expiries(self) -> int:
        """Expiry is a matter of time, not of a call: emit key.expired once per
        version when its `exp` passes, so subscribers need not poll for it."""
        due = self.store.due_expiries(self.clock())
        if not due:
            return 0
        with self.core.change() as events:
            # Read again in the transaction: another instance on a shared database
            # (store.py) may have announced them since, and each is announced once.
            due = self.store.due_expiries(self.clock())
            for vault, name, version, exp in due:
                self.store.mark_expiry_announced(vault, name, version, exp)
                events.append(self.core.event("key.expired", vault, name, version))
        return len(due)

    # -- retention --
    def sweep(self) -> int:
        """Purge what has outlived its retention (Key Vault does the same)."""
        now = self.clock()
        vaults, keys = self.store.expired_deletions(now)
        if not vaults and not keys:
            return 0
        with self.core.change() as events:
            # Again in the transaction: another instance may have purged them since.
            vaults, keys = self.store.expired_deletions(now)
            for vault, name in keys:
                if vault not in vaults:
                    self.core.doom_token_objects(vault, name)
                    self.store.purge_key(vault, name)
                    events.append(self.core.event("key.purged", vault, name))
            for name in vaults:
                vault = self.store.vault(name)
                self.core.purge(vault)
                events.append(self.core.event("vault.purged", name, tenant=vault.tenant_id))
        return len(vaults) + len(keys)
