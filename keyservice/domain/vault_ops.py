"""Vault and access-policy operations."""
import uuid

from . import policies
from .core import ServiceCore
from .errors import BadRequest, Conflict, Forbidden, NotFound
from .identities import Caller
from .names import DEFAULT_RESERVED_PREFIXES, check_vault_name, reserved_prefix
from .vaults import DEFAULT_RETENTION, Vault, VaultState, check_label, check_retention


class VaultOperations:
    def __init__(self, core: ServiceCore, reserved_prefixes=DEFAULT_RESERVED_PREFIXES):
        self.core = core
        self.reserved_prefixes = tuple(reserved_prefixes)

    def create_vault(self, caller: Caller, name, location, subscription,
                     retention_days=DEFAULT_RETENTION, purge_protection=False) -> Vault:
        check_vault_name(name)
        prefix = reserved_prefix(name, self.reserved_prefixes)
        if prefix is not None and not self._may_take_reserved(caller):
            raise Forbidden(f"Vault names starting with '{prefix}' are reserved for the disk "
                            "platform: only the platform role or an admin of the service's "
                            "home tenant may create them", permission="vaults/create",
                            inner="ReservedVaultName")
        vault = Vault(name=name, tenant_id=caller.tenant_id,
                      subscription=check_label("subscription", subscription),
                      location=check_label("location", location),
                      retention_days=check_retention(retention_days), purge_protection=False,
                      owner=caller.object_id, created=self.core.clock(), id=str(uuid.uuid4()))
        vault.audit_chain = vault.id
        vault.enable_purge_protection(purge_protection)
        with self.core.change():
            existing = self.core.store.vault(name)
            if existing is not None and existing.state is VaultState.SOFT_DELETED:
                raise Conflict(f"Vault '{name}' is in a deleted but recoverable state; recover "
                               "or purge it before reusing its name")
            if existing is not None:
                raise Conflict(f"Vault name '{name}' is already in use")
            self.core.store.put_vault(vault)
            # Like Key Vault's portal: the creator gets every key permission by default.
            self.core.store.set_policy(name, caller.object_id, policies.KEY_PERMISSIONS)
        return vault

    def _may_take_reserved(self, caller: Caller) -> bool:
        """The platform runs with a platform-role identity or the operator's admin
        credential, both in the home tenant. Any tenant's admin can mint a platform-role
        identity in its own tenant, so the role alone is not enough."""
        return caller.tenant_id == self.core.home_tenant and (caller.is_platform or caller.is_admin)

    def get_vault(self, caller: Caller, name: str) -> tuple[Vault, dict]:
        vault = self.core.vault(caller, name)
        pols = self.core.store.policies(name)
        # The platform reads a vault's properties (soft delete, purge protection,
        # location) to check it is fit to hold a disk encryption set's key.
        if caller.object_id != vault.owner and not caller.is_admin and not caller.is_platform \
                and caller.object_id not in pols:
            raise Forbidden(f"The user, group or application '{caller.object_id}' has no access "
                            f"to key vault '{name}'", permission="vaults/read")
        return vault, pols

    def list_vaults(self, caller: Caller, deleted: bool = False) -> list[Vault]:
        out = []
        for v in self.core.store.vaults():
            if v.tenant_id != caller.tenant_id or (v.state is VaultState.SOFT_DELETED) != deleted:
                continue
            if caller.is_admin or v.owner == caller.object_id or \
                    (not deleted and caller.object_id in self.core.store.policies(v.name)):
                out.append(v)
        return out

    def update_vault(self, caller: Caller, name: str, purge_protection=None, retention_days=None) -> Vault:
        with self.core.change():
            vault = self.core.vault(caller, name)
            self.core.manage(caller, vault, "update")
            if retention_days is not None and retention_days != vault.retention_days:
                raise Conflict("softDeleteRetentionInDays is fixed once the vault is created")
            if purge_protection is not None:
                vault.enable_purge_protection(purge_protection)
            self.core.store.put_vault(vault)
        return vault

    def delete_vault(self, caller: Caller, name: str) -> Vault:
        with self.core.change() as events:
            vault = self.core.vault(caller, name)
            self.core.manage(caller, vault, "delete")
            vault.soft_delete(self.core.clock())
            self.core.store.put_vault(vault)
            events.append(self.core.event("vault.deleted", name))
        return vault

    def get_deleted_vault(self, caller: Caller, name: str) -> Vault:
        vault = self.core.vault(caller, name, deleted=True)
        self.core.manage(caller, vault, "read")
        return vault

    def recover_vault(self, caller: Caller, name: str) -> Vault:
        with self.core.change() as events:
            vault = self.core.vault(caller, name, deleted=True)
            self.core.manage(caller, vault, "recover")
            vault.recover()
            self.core.store.put_vault(vault)
            events.append(self.core.event("vault.recovered", name))
        return vault

    def purge_vault(self, caller: Caller, name: str) -> Vault:
        with self.core.change() as events:
            vault = self.core.vault(caller, name, deleted=True)
            self.core.manage(caller, vault, "purge")
            vault.check_purge(self.core.clock())
            self.core.purge(vault)
            events.append(self.core.event("vault.purged", name, tenant=vault.tenant_id))
        return vault

    # -- access policies --
    def set_policy(self, caller: Caller, name: str, object_id, permissions) -> tuple[str, tuple]:
        if not isinstance(object_id, str) or not 1 <= len(object_id) <= 64:
            raise BadRequest("objectId must be a string of 1-64 characters")
        perms = policies.parse_permissions(permissions)
        with self.core.change() as events:
            vault = self.core.vault(caller, name)
            self.core.manage(caller, vault, "setPolicy")
            self.core.store.set_policy(name, object_id, perms)
            events.append(self.core.event("policy.changed", name, object_id=object_id))
        return object_id, perms

    def delete_policy(self, caller: Caller, name: str, object_id: str) -> None:
        with self.core.change() as events:
            vault = self.core.vault(caller, name)
            self.core.manage(caller, vault, "setPolicy")
            if not self.core.store.delete_policy(name, object_id):
                raise NotFound(f"Key vault '{name}' has no access policy for '{object_id}'",
                               code="PolicyNotFound")
            events.append(self.core.event("policy.deleted", name, object_id=object_id))
