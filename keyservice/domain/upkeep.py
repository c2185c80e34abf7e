"""What the passing of time does, run by the server on timers (server.py): expiry
announcements and the retention sweep."""
from .core import ServiceCore


class Upkeep:
    def __init__(self, core: ServiceCore):
        self.core = core

    def announce_expiries(self) -> int:
        """Expiry is a matter of time, not of a call: emit key.expired once per
        version when its `exp` passes, so subscribers need not poll for it."""
        core = self.core
        due = core.store.due_expiries(core.clock())
        if not due:
            return 0
        with core.change() as events:
            # Read again in the transaction: another instance on a shared database
            # (store.py) may have announced them since, and each is announced once.
            due = core.store.due_expiries(core.clock())
            for vault, name, version, exp in due:
                core.store.mark_expiry_announced(vault, name, version, exp)
                events.append(core.event("key.expired", vault, name, version))
        return len(due)

    def sweep(self) -> int:
        """Purge what has outlived its retention (Key Vault does the same)."""
        core = self.core
        now = core.clock()
        vaults, keys = core.store.expired_deletions(now)
        if not vaults and not keys:
            return 0
        with core.change() as events:
            # Again in the transaction: another instance may have purged them since.
            vaults, keys = core.store.expired_deletions(now)
            for vault, name in keys:
                if vault not in vaults:
                    core.doom_token_objects(vault, name)
                    core.store.purge_key(vault, name)
                    events.append(core.event("key.purged", vault, name))
            for name in vaults:
                vault = core.store.vault(name)
                core.purge(vault)
                events.append(core.event("vault.purged", name, tenant=vault.tenant_id))
        return len(vaults) + len(keys)
