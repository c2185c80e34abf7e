"""Domain objects -> JSON in Key Vault's shape (field names `kid`, `key_ops`,
`attributes.enabled|nbf|exp|created|updated|recoveryLevel|recoverableDays`)."""
from ..domain import rsakeys
from ..domain.identities import Identity
from ..domain.keys import Key, KeyVersion
from ..domain.vaults import Vault


def _int(t):
    return None if t is None else int(t)


def attributes(vault: Vault, v: KeyVersion) -> dict:
    """Key Vault's KeyAttributes: times in whole seconds since the epoch; `exportable`
    is false because no private key ever leaves the service."""
    out = {"enabled": v.enabled, "created": _int(v.created), "updated": _int(v.updated),
           "recoveryLevel": vault.recovery_level, "recoverableDays": vault.retention_days,
           "exportable": False}
    if v.nbf is not None:
        out["nbf"] = _int(v.nbf)
    if v.exp is not None:
        out["exp"] = _int(v.exp)
    return out


# `vault_url` below is where the caller reached the vault (api/addressing.py): kids
# are `{vault_url}/keys/{name}[/{version}]` in the form of the request.
def kid(vault_url: str, name: str, version: str | None = None) -> str:
    return f"{vault_url}/keys/{name}" + (f"/{version}" if version else "")


def key_bundle(vault_url: str, vault: Vault, key: Key, v: KeyVersion) -> dict:
    jwk = {"kid": kid(vault_url, key.name, v.version), "key_ops": list(v.key_ops),
           **rsakeys.public_jwk_fields(rsakeys.load_public_der(v.public_der)), "kty": v.kty}
    return {"key": jwk, "attributes": attributes(vault, v)}


def deleted_key_bundle(vault_url: str, vault: Vault, key: Key) -> dict:
    out = key_bundle(vault_url, vault, key, key.current)
    out.update(deleted_fields(vault_url, key))
    return out


def deleted_fields(vault_url: str, key: Key) -> dict:
    return {"recoveryId": f"{vault_url}/deletedkeys/{key.name}",
            "deletedDate": _int(key.deleted_at), "scheduledPurgeDate": _int(key.scheduled_purge)}


def key_item(vault_url: str, vault: Vault, key: Key, deleted: bool = False) -> dict:
    out = {"kid": kid(vault_url, key.name), "attributes": attributes(vault, key.current)}
    if deleted:
        out.update(deleted_fields(vault_url, key))
    return out


def version_item(vault_url: str, vault: Vault, key: Key, v: KeyVersion) -> dict:
    return {"kid": kid(vault_url, key.name, v.version), "attributes": attributes(vault, v)}


def policy(vault: Vault, object_id: str, perms) -> dict:
    return {"tenantId": vault.tenant_id, "objectId": object_id, "permissions": {"keys": list(perms)}}


def vault(service, v: Vault, policies: dict | None = None) -> dict:
    out = {"id": f"{service.base_url}/vaults/{v.name}", "name": v.name, "tenantId": v.tenant_id,
           "location": v.location, "subscription": v.subscription, "owner": v.owner,
           "vaultUri": f"{service.base_url}/vaults/{v.name}", "softDeleteEnabled": True,
           "softDeleteRetentionInDays": v.retention_days, "enablePurgeProtection": v.purge_protection,
           "createdDate": _int(v.created), "state": v.state.value,
           # What a relying party checks before trusting a vault (the platform refuses a
           # vault it does not own): in Key Vault's management-plane shape.
           "properties": {"vaultId": v.id, "ownerObjectId": v.owner, "tenantId": v.tenant_id,
                          "enableSoftDelete": True, "softDeleteRetentionInDays": v.retention_days,
                          "enablePurgeProtection": v.purge_protection}}
    if v.deleted_at is not None:
        out["deletedDate"] = _int(v.deleted_at)
        out["scheduledPurgeDate"] = _int(v.scheduled_purge)
    if policies is not None:
        out["accessPolicies"] = [policy(v, oid, p) for oid, p in policies.items()]
    return out


def identity(i: Identity, secret: str | None = None) -> dict:
    out = {"objectId": i.object_id, "clientId": i.client_id, "tenantId": i.tenant_id,
           "displayName": i.display_name, "type": i.type, "roles": list(i.roles),
           "enabled": not i.disabled, "createdDate": _int(i.created)}
    if secret is not None:
        out["clientSecret"] = secret  # returned once (creation, reset); never stored in clear
    return out
