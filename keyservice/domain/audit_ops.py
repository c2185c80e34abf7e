"""The audit log: each call's entry appended to its chain, and who may read which chain."""
from .core import ServiceCore
from .errors import Forbidden, NotFound, Unauthorized
from .identities import Caller


class AuditOperations:
    def __init__(self, core: ServiceCore):
        self.core = core

    def record(self, entry: dict) -> None:
        """Append to the vault's chain when the call named an existing vault, else
        to the service chain (""), so made-up names cannot create chains."""
        self.core.store.append_audit(self._chain_of(entry), entry)

    def record_many(self, entries: list[dict]) -> list[Exception | None]:
        """Several calls' entries, in order, in one transaction (group commit: one fsync
        for all, api/audit_writer.py). If that transaction fails, each entry is tried on
        its own, so one that cannot be written costs no other its record. Returns each
        entry's error, None where it was committed."""
        try:
            self.core.store.append_audit_many([(self._chain_of(e), e) for e in entries])
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
        vault = self.core.store.vault(entry["vault"]) if entry.get("vault") else None
        return vault.audit_chain if vault is not None else ""

    def _audit_chain(self, caller: Caller, vault: str | None, vault_id: str | None = None) -> str:
        """The chain a caller may read. The service chain (every tenant's calls that named
        no vault) and closed chains of purged vaults: admins of the home tenant only."""
        store = self.core.store
        if not vault:
            if not caller.is_admin or caller.tenant_id != self.core.home_tenant:
                raise Forbidden("Only an admin of the service's home tenant may read the service "
                                "audit chain and the chains of purged vaults", permission="audit")
            if vault_id is None:
                return ""
            chain = store.audit_chain_of(vault_id)
            if chain is None:
                raise NotFound(f"No vault with id '{vault_id}' has an audit chain", code="VaultNotFound")
            return chain
        v = store.vault(vault)
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
        return self.core.store.audit_entries(self._audit_chain(caller, vault, vault_id), limit, after,
                                             newest=newest, since=since)

    def verify_audit(self, caller: Caller, vault: str | None, vault_id: str | None = None):
        return self.core.store.verify_audit(self._audit_chain(caller, vault, vault_id))
