"""The key service as one object: the directory, tokens, vaults, keys, audit
and the change stream. The API and the CLI talk only to this.

KeyService builds its parts, each with the dependencies its constructor names: a
ServiceCore (store, clock, transactions with their events, who may touch a vault)
that every part shares, and on it the directory, the vault operations, the key
operations, the backups (which find keys through the key operations; nothing calls
the other way), the audit log, the change stream and the time-driven upkeep. The
operations callers use are listed below, one line each."""
import uuid
from collections.abc import Callable

from . import hsm_keys
from .audit_ops import AuditOperations
from .backup_ops import BackupOperations
from .clock import system_clock
from .core import ServiceCore
from .directory import DirectoryOperations
from .key_ops import KeyOperations
from .names import DEFAULT_RESERVED_PREFIXES
from .stream_ops import ChangeStream
from .upkeep import Upkeep
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
        self.audit = AuditOperations(self.core)
        self.stream = ChangeStream(self.core)
        self.upkeep = Upkeep(self.core)

        # Bound methods, not wrappers: mypy keeps each one's signature for the callers.
        self.bootstrap_admin = self.directory.bootstrap_admin
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

        self.record = self.audit.record
        self.record_many = self.audit.record_many
        self.audit_entries = self.audit.audit_entries
        self.verify_audit = self.audit.verify_audit

        self.check_subscriber = self.stream.check_subscriber
        self.events_after = self.stream.events_after
        self.last_event_seq = self.stream.last_event_seq

        self.announce_expiries = self.upkeep.announce_expiries
        self.sweep = self.upkeep.sweep

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
