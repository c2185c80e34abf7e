"""Directory operations: create, list, disable/enable, delete identities, reset a
secret; issue and check tokens.

Tenants are the isolation boundary. An admin manages identities of its own tenant
only; an identity of another tenant is "not found" to it (its existence is not
revealed). Creating an identity in another tenant is refused (403), with one
exception: an admin of the service's home tenant (the bootstrap admin's) may found a
*new* tenant, one with no identity and no vault yet, by creating its first identity
there. It can never add an identity to an existing tenant, so no admin can plant an
identity in a tenant it does not belong to.
"""
from ..tokens import TokenSigner
from .core import ServiceCore
from .errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from .identities import Caller, Identity, check_new_identity, new_identity, reset_secret, set_enabled

_DUMMY = Identity("", "", "", "", "", (), b"\x00" * 32, 0.0)


class DirectoryOperations:
    def __init__(self, core: ServiceCore, signer: TokenSigner, audiences: tuple[str, ...]):
        """`audiences`: the token audiences this service accepts (api/addressing.py says
        which); a token issued for any other resource is refused."""
        self.core = core
        self.signer = signer
        self.audiences = audiences

    def bootstrap_admin(self, deliver) -> Identity | None:
        """On first start only: create the admin identity and hand its secret to
        `deliver(identity, secret)` (which writes DATA_DIR/admin.credential) before
        the commit, so a failed write leaves no admin whose secret nobody has.
        Later starts return None."""
        store = self.core.store
        with store.transaction():
            if store.meta("admin_object_id") is not None:
                return None
            ident, secret = new_identity("admin", "user", ("admin",), self.core.home_tenant,
                                         self.core.clock())
            store.add_identity(ident)
            store.set_meta("admin_object_id", ident.object_id)
            deliver(ident, secret)
        return ident

    def create_identity(self, caller: Caller, display_name, type_="managedIdentity", roles=(),
                        tenant_id=None) -> tuple[Identity, str]:
        check_new_identity(caller, display_name, type_, roles, tenant_id)
        tenant = tenant_id or caller.tenant_id
        ident, secret = new_identity(display_name, type_, roles, tenant, self.core.clock())
        with self.core.store.transaction():
            if tenant != caller.tenant_id:
                self._check_new_tenant(caller, tenant)
            self.core.store.add_identity(ident)
        return ident, secret

    def _check_new_tenant(self, caller: Caller, tenant: str) -> None:
        if caller.tenant_id != self.core.home_tenant:
            raise Forbidden(f"An admin may only create identities in its own tenant "
                            f"'{caller.tenant_id}'", permission="identities/create")
        if self.core.store.tenant_exists(tenant):
            raise Forbidden(f"Tenant '{tenant}' already exists: only its own admins may add "
                            "identities to it", permission="identities/create")

    def list_identities(self, caller: Caller) -> list[Identity]:
        self._require_directory_admin(caller)
        return self.core.store.identities(caller.tenant_id)

    def get_identity(self, caller: Caller, object_id: str) -> Identity:
        self._require_directory_admin(caller)
        return self._managed(caller, object_id)

    def set_identity_enabled(self, caller: Caller, object_id: str, enabled) -> Identity:
        self._require_directory_admin(caller)
        with self.core.store.transaction():
            ident = self._managed(caller, object_id)
            if enabled is False and ident.object_id == caller.object_id:
                raise Conflict("An identity cannot disable itself")
            set_enabled(ident, enabled)
            self.core.store.put_identity(ident)
        return ident

    def reset_identity_secret(self, caller: Caller, object_id: str) -> tuple[Identity, str]:
        self._require_directory_admin(caller)
        with self.core.store.transaction():
            ident = self._managed(caller, object_id)
            secret = reset_secret(ident)
            self.core.store.put_identity(ident)
        return ident, secret

    def delete_identity(self, caller: Caller, object_id: str) -> None:
        """Its access policies go with it (a policy.deleted event each, so subscribers
        re-check access) and its tokens stop working at once."""
        self._require_directory_admin(caller)
        with self.core.change() as events:
            ident = self._managed(caller, object_id)
            if ident.object_id == caller.object_id:
                raise Conflict("An identity cannot delete itself")
            for vault_name in self.core.store.policies_of(object_id):
                vault = self.core.store.vault(vault_name)
                self.core.store.delete_policy(vault_name, object_id)
                if vault is not None:
                    events.append(self.core.event("policy.deleted", vault_name, object_id=object_id))
            self.core.store.delete_identity(object_id)

    def _require_directory_admin(self, caller: Caller) -> None:
        if not caller.is_admin:
            raise Forbidden(f"The identity '{caller.object_id}' may not manage identities: "
                            "the admin role is required", permission="identities/manage")

    def _managed(self, caller: Caller, object_id: str) -> Identity:
        if not isinstance(object_id, str) or not 1 <= len(object_id) <= 64:
            raise BadRequest("objectId must be a string of 1-64 characters")
        ident = self.core.store.identity(object_id)
        if ident is None or ident.tenant_id != caller.tenant_id:
            raise NotFound(f"No identity '{object_id}' in tenant '{caller.tenant_id}'",
                           code="IdentityNotFound")
        return ident

    # -- tokens --
    def issue_token(self, client_id, client_secret, audience: str | None = None,
                    tenant_id: str | None = None) -> tuple[str, int, Identity]:
        """`audience`: the resource the token is for (one of `self.audiences`), or None
        for a token of the service's own clients. `tenant_id`: the tenant the client
        named (the v2 endpoint's path); a client of another tenant is refused exactly
        as a wrong secret is, so the answer does not tell where a client id lives."""
        if not isinstance(client_id, str) or not isinstance(client_secret, str):
            raise BadRequest("client_id and client_secret are required strings")
        if audience is not None and audience not in self.audiences:
            raise BadRequest(f"The resource '{audience}' is not served here; ask for "
                             f"{' or '.join(self.audiences) or 'no resource'}", code="invalid_scope")
        ident = self.core.store.identity_by_client_id(client_id)
        # Compare against a dummy when the client is unknown, so timing does not
        # tell an attacker which client ids exist.
        ok = (ident or _DUMMY).secret_matches(client_secret) and ident is not None
        if not ok or (tenant_id is not None and ident.tenant_id != tenant_id):
            raise Unauthorized("Invalid client id or client secret", code="Unauthorized")
        if ident.disabled:
            raise Unauthorized(f"The identity '{ident.object_id}' is disabled")
        token, exp = self.signer.issue(ident.object_id, ident.tenant_id, ident.roles, self.core.clock(),
                                       ident.generation, audience)
        return token, exp, ident

    def authenticate(self, token: str) -> Caller:
        """A valid signature is not enough: the audience (when the token has one) must
        be this service's, and the identity must still exist, be enabled and be of the
        token's generation. Roles are the identity's current ones."""
        claimed = self.signer.verify(token, self.core.clock())
        if claimed.audience is not None and claimed.audience not in self.audiences:
            raise Unauthorized(f"The bearer token's audience '{claimed.audience}' is not this "
                               f"service ({', '.join(self.audiences)})")
        ident = self.core.store.identity(claimed.object_id)
        if ident is None or ident.tenant_id != claimed.tenant_id:
            raise Unauthorized("The bearer token's identity no longer exists")
        if ident.disabled:
            raise Unauthorized(f"The identity '{ident.object_id}' is disabled")
        if ident.generation != claimed.generation:
            raise Unauthorized("The bearer token was revoked (its identity was disabled or its "
                               "secret was reset); request a new one")
        return Caller(ident.object_id, ident.tenant_id, ident.roles, ident.generation,
                      claimed.audience)

    def challenge_tenant(self, vault: str | None) -> str:
        """The tenant a 401's challenge names: the vault's (any state), else the home
        tenant. Key Vault names the vault's tenant too: a client must get its token
        there, and tenant ids are not secrets."""
        v = self.core.store.vault(vault) if isinstance(vault, str) and vault else None
        return v.tenant_id if v is not None else self.core.home_tenant
