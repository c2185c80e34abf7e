"""The change stream as its subscribers read it: who may follow it, and which events
each tenant sees. The events themselves are committed with their change (core.py)."""
from .core import ServiceCore
from .errors import Forbidden
from .identities import Caller


class ChangeStream:
    def __init__(self, core: ServiceCore):
        self.core = core

    def check_subscriber(self, caller: Caller) -> None:
        if not (caller.is_admin or caller.is_platform):
            raise Forbidden(f"The identity '{caller.object_id}' may not follow the change "
                            "stream: the admin or platform role is required", permission="events")

    def events_after(self, caller: Caller, seq: int, limit: int = 500):
        """Only events of vaults of the caller's tenant (the stream crossed tenants)."""
        return self.core.store.events_after(seq, limit, caller.tenant_id)

    def last_event_seq(self) -> int:
        return self.core.store.last_event_seq()
