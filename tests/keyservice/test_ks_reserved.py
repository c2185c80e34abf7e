"""Reserved vault names (issue 19, item 2): the platform's vault name cannot be squatted.

The attack: before the platform's first start, a plain identity creates the vault named
"nbd-platform"; the platform would adopt it and the squatter would hold the key of every
platform-managed disk. Only the home tenant's platform role or admin (the platform runs with
one of those) may create reserved names, and a vault shows its owner, tenant and purge
protection so the platform can check what it adopts.
"""
import uuid

from keyservice.client import Credential


def create_vault(d, name, as_=None, protect=False):
    return d.http("POST", "/vaults", {"name": name, "location": "l", "subscription": "s",
                                      "enablePurgeProtection": protect}, as_=as_)


def test_only_the_platform_role_creates_reserved_vault_names(make_daemon):
    d = make_daemon(extra_args=["--reserved-vault-prefix", "corp-keys"])
    squatter = d.identity("squatter", type_="user")
    # Another tenant's admin, and the platform-role identity it can mint in its own tenant.
    status, body = d.http("POST", "/identities", {"displayName": "admin-b", "type": "user",
                                                  "roles": ["admin"], "tenantId": str(uuid.uuid4())})
    admin_b = Credential(body["clientId"], body["clientSecret"], body["tenantId"], body["objectId"])
    status, body = d.http("POST", "/identities", {"displayName": "platform-b", "roles": ["platform"],
                                                  "type": "servicePrincipal"}, as_=admin_b)
    platform_b = Credential(body["clientId"], body["clientSecret"], body["tenantId"], body["objectId"])
    for name in ("nbd-platform", "NBD-Platform", "nbd-platform-2", "corp-keys-1"):
        for who in (squatter, admin_b, platform_b):
            status, body = create_vault(d, name, as_=who)
            assert status == 403, (name, body)
            assert body["error"]["innererror"]["code"] == "ReservedVaultName"
            assert "reserved" in body["error"]["message"]
    assert create_vault(d, "nbd-platfor", as_=squatter)[0] == 201  # not the prefix
    assert create_vault(d, "corp-keys-ops", as_=d.admin)[0] == 201  # the operator may
    platform = d.identity("platform", type_="servicePrincipal", roles=["platform"])
    status, body = create_vault(d, "nbd-platform", as_=platform, protect=True)
    assert status == 201, body
    status, body = d.http("GET", "/vaults/nbd-platform", as_=platform)
    assert status == 200
    props = body["properties"]
    assert props["ownerObjectId"] == platform.object_id
    assert props["tenantId"] == platform.tenant_id
    assert props["enablePurgeProtection"] is True


def test_vault_properties_name_a_squatter(make_daemon):
    """What the platform checks: a vault it did not create shows another owner."""
    d = make_daemon()
    other = d.identity("other", type_="user")
    assert create_vault(d, "shared-name", as_=other)[0] == 201
    platform = d.identity("platform", type_="servicePrincipal", roles=["platform"])
    status, body = d.http("GET", "/vaults/shared-name", as_=platform)
    assert status == 200
    assert body["properties"]["ownerObjectId"] == other.object_id != platform.object_id
    assert body["properties"]["enablePurgeProtection"] is False
