"""The key service API's bodies as pydantic models: requests (validated by the handlers
through `daemonkit.bodies`) and answers (for the OpenAPI document; `render.py` writes them).

Field names are Key Vault's (`key_size`, `softDeleteRetentionInDays`). Requests take
unknown fields and ignore them, as Key Vault's clients expect (the Azure SDKs send fields
this service has no use for), except key attributes, where an unknown name is refused:
an attribute that was silently dropped would let the caller believe it holds. The value
rules (sizes, names, permissions) are the domain's; the enums below only show them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from daemonkit.bodies import RequestModel

from ..domain import hsm_keys, identities, policies, rsakeys
from ..domain.keys import IMPORT_OP, KEY_OPS

# -- requests --


class KeyAttributesIn(RequestModel):
    """Key Vault's KeyAttributes as a client sends them; the read-only ones (created,
    updated, recovery) are accepted so that a client may send back what it read."""
    # null is meaningful here (nbf, exp: clear it), so the schema keeps it (daemonkit.bodies)
    model_config = ConfigDict(extra="forbid", json_schema_extra=None)
    enabled: bool | None = None
    nbf: float | None = Field(None, description="not before: seconds since the epoch; null clears it")
    exp: float | None = Field(None, description="expiry: seconds since the epoch; null clears it")
    created: float | None = None
    updated: float | None = None
    recoveryLevel: str | None = None
    recoverableDays: int | None = None
    exportable: bool | None = Field(None, description="only false: no private key leaves the service")


_KEY_OPS = Field(None, description='["import"] with kty RSA-HSM: a key-exchange key for BYOK, '
                 "which can do nothing else",
                 json_schema_extra={"items": {"type": "string", "enum": [*KEY_OPS, IMPORT_OP]}})
_UNSTORED = "refused: this service keeps no tags and no release policy"


class KeyCreate(RequestModel):
    kty: str | None = Field(None, json_schema_extra={"enum": list(hsm_keys.KTYS)})
    key_size: int | None = Field(None, json_schema_extra={"enum": list(rsakeys.SIZES),
                                                          "default": rsakeys.DEFAULT_SIZE})
    key_ops: list[str] | None = _KEY_OPS
    attributes: KeyAttributesIn | None = None
    tags: dict[str, Any] | None = Field(None, description=_UNSTORED)
    release_policy: dict[str, Any] | None = Field(None, description=_UNSTORED)


class KeyUpdate(RequestModel):
    key_ops: list[str] | None = _KEY_OPS
    attributes: KeyAttributesIn | None = None
    tags: dict[str, Any] | None = Field(None, description=_UNSTORED)
    release_policy: dict[str, Any] | None = Field(None, description=_UNSTORED)


class JsonWebKeyIn(RequestModel):
    """A private RSA JWK (RFC 7517/7518), or Key Vault's BYOK transfer blob in `key_hsm`.
    Other members are passed on to the JWK parser, which refuses what it cannot use."""
    model_config = ConfigDict(extra="allow")
    kty: str | None = None
    n: str | None = None
    e: str | None = None
    d: str | None = None
    p: str | None = None
    q: str | None = None
    dp: str | None = None
    dq: str | None = None
    qi: str | None = None
    key_ops: list[str] | None = None
    key_hsm: str | None = Field(None, description="BYOK (kty RSA-HSM): base64url of Key Vault's key "
                                "transfer blob, CKM_RSA_AES_KEY_WRAP for a key-exchange key of the "
                                "same vault")


class KeyImport(RequestModel):
    key: JsonWebKeyIn | None = None
    pem: str | None = Field(None, description="extension: an unencrypted PEM private key instead of key")
    Hsm: bool | None = Field(None, description="true is refused: a key that was ever in the clear is "
                             "not an HSM key")
    hsm: bool | None = Field(None, description="as Hsm (this service's first spelling)")
    attributes: KeyAttributesIn | None = None
    tags: dict[str, Any] | None = Field(None, description=_UNSTORED)
    release_policy: dict[str, Any] | None = Field(None, description=_UNSTORED)


class KeyOperation(RequestModel):
    """wrapKey / unwrapKey."""
    alg: str | None = Field(None, json_schema_extra={"enum": list(rsakeys.ALGORITHMS),
                                                     "default": rsakeys.DEFAULT_ALG})
    value: str = Field(description="base64url")


class KeyRestore(RequestModel):
    value: str = Field(description="base64url of a backup blob (KeyBackup)")


class VaultCreate(RequestModel):
    name: str
    location: str
    subscription: str
    softDeleteRetentionInDays: int | None = Field(None, description="7 to 90 (default 90)")
    enablePurgeProtection: bool | None = None


class VaultUpdate(RequestModel):
    softDeleteRetentionInDays: int | None = None
    enablePurgeProtection: bool | None = Field(None, description="once on, it stays on")


class PolicyPermissions(RequestModel):
    keys: list[str] = Field(json_schema_extra={"items": {
        "type": "string", "enum": list(policies.KEY_PERMISSIONS)}})


class PolicySet(RequestModel):
    permissions: PolicyPermissions


class IdentityCreate(RequestModel):
    displayName: str
    type: str | None = Field(None, json_schema_extra={"enum": list(identities.TYPES),
                                                      "default": "managedIdentity"})
    roles: list[str] | None = Field(None, json_schema_extra={"items": {
        "type": "string", "enum": list(identities.ROLES)}})
    tenantId: str | None = None


class IdentityUpdate(RequestModel):
    enabled: bool


class TokenRequest(RequestModel):
    """POST /oauth2/token, as JSON or as a form."""
    grant_type: str | None = Field(None, json_schema_extra={"enum": ["client_credentials"]})
    client_id: str
    client_secret: str
    resource: str | None = Field(None, description="the token's audience (this service's resource)")


class TokenRequestV2(RequestModel):
    """The Microsoft identity platform's form; the client may instead authenticate with
    HTTP Basic (RFC 6749 section 2.3.1)."""
    grant_type: str | None = Field(None, json_schema_extra={"enum": ["client_credentials"]})
    client_id: str | None = None
    client_secret: str | None = None
    scope: str | None = Field(None, description="exactly one '{resource}/.default'")


# -- answers --


class ErrorDetail(BaseModel):
    code: str
    message: str
    innererror: dict[str, str] | None = None


class Error(BaseModel):
    """Key Vault's error body, which the Azure SDKs parse."""
    error: ErrorDetail


class OAuthError(BaseModel):
    """RFC 6749 section 5.2."""
    error: str
    error_description: str


class TokenResponse(BaseModel):
    access_token: str
    token_type: str
    expires_in: int
    expires_on: int | None = None
    ext_expires_in: int | None = None


class Identity(BaseModel):
    objectId: str
    clientId: str
    tenantId: str
    displayName: str
    type: str
    roles: list[str]
    enabled: bool
    createdDate: int
    clientSecret: str | None = Field(None, description="only when created or reset")


class IdentityList(BaseModel):
    value: list[Identity]
    nextLink: str | None = None


class AccessPolicy(BaseModel):
    tenantId: str
    objectId: str
    permissions: dict[str, list[str]]


class VaultProperties(BaseModel):
    """What a relying party checks before trusting the vault."""
    vaultId: str = Field(description="the vault's own id; a new vault of a purged vault's name has another")
    ownerObjectId: str
    tenantId: str
    enableSoftDelete: bool
    softDeleteRetentionInDays: int
    enablePurgeProtection: bool


class Vault(BaseModel):
    id: str
    name: str
    tenantId: str
    location: str
    subscription: str
    owner: str
    vaultUri: str
    softDeleteEnabled: bool
    softDeleteRetentionInDays: int
    enablePurgeProtection: bool
    createdDate: int
    state: str = Field(json_schema_extra={"enum": ["active", "softDeleted"]})
    properties: VaultProperties
    deletedDate: int | None = None
    scheduledPurgeDate: int | None = None
    accessPolicies: list[AccessPolicy] | None = None


class VaultList(BaseModel):
    value: list[Vault]
    nextLink: str | None = None


class KeyAttributes(BaseModel):
    enabled: bool
    created: int
    updated: int
    recoveryLevel: str
    recoverableDays: int
    exportable: bool = Field(description="always false: no private key leaves the service")
    nbf: int | None = None
    exp: int | None = None


class JsonWebKey(BaseModel):
    kid: str
    kty: str
    key_ops: list[str]
    n: str
    e: str


class KeyBundle(BaseModel):
    key: JsonWebKey
    attributes: KeyAttributes


class DeletedKeyBundle(KeyBundle):
    recoveryId: str
    deletedDate: int | None = None
    scheduledPurgeDate: int | None = None


class KeyItem(BaseModel):
    kid: str
    attributes: KeyAttributes
    recoveryId: str | None = Field(None, description="deleted keys only")
    deletedDate: int | None = None
    scheduledPurgeDate: int | None = None


class KeyList(BaseModel):
    value: list[KeyItem]
    nextLink: str | None = Field(None, description="the next page; copy it rather than building it")


class KeyOperationResult(BaseModel):
    kid: str
    value: str = Field(description="base64url")


class KeyBackup(BaseModel):
    value: str = Field(description="base64url of an opaque blob sealed by the service")


class AuditVerification(BaseModel):
    valid: bool
    entries: int
    firstBadSeq: int | None = None
    reason: str | None = None


class AuditLog(BaseModel):
    value: list[dict[str, Any]]


class Event(BaseModel):
    """One change on GET /events (text/event-stream: `id`, `event`, `data: <Event>`)."""
    seq: int
    type: str
    vault: str
    key: str | None = None
    version: str | None = None
    kid: str | None = None
    objectId: str | None = None
    time: float
