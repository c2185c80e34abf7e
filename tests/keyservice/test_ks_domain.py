"""Pure domain rules: vault and key states, attributes, policies, names."""
import pytest

from keyservice.domain import policies
from keyservice.domain.errors import BadRequest, Conflict, Forbidden
from keyservice.domain.keys import Key, KeyState, KeyVersion, check_not_deleted_name, parse_attributes
from keyservice.domain.names import check_key_name, check_vault_name
from keyservice.domain.vaults import DAY, Vault, VaultState, check_retention


def vault(**kw):
    return Vault("v", "t", "s", "l", kw.pop("retention_days", 90), kw.pop("purge_protection", False),
                 "owner", 0.0, **kw)


def version(**kw):
    base = dict(version="0" * 32, size=2048, public_der=b"", enabled=True, nbf=None, exp=None,
                key_ops=("wrapKey", "unwrapKey"), created=0.0, updated=0.0)
    base.update(kw)
    return KeyVersion(**base)


@pytest.mark.parametrize("days,ok", [(6, False), (7, True), (90, True), (91, False), (True, False),
                                     ("30", False), (30.0, False)])
def test_retention_bounds(days, ok):
    if ok:
        assert check_retention(days) == days
    else:
        with pytest.raises(BadRequest):
            check_retention(days)


def test_vault_transitions():
    v = vault(retention_days=7)
    assert v.state is VaultState.ACTIVE
    with pytest.raises(Conflict):
        v.recover()
    with pytest.raises(Conflict):
        v.check_purge(0)
    v.soft_delete(100.0)
    assert v.state is VaultState.SOFT_DELETED and v.scheduled_purge == 100.0 + 7 * DAY
    with pytest.raises(Conflict):
        v.soft_delete(101.0)
    v.check_purge(101.0)  # no purge protection: allowed at once
    v.recover()
    assert v.state is VaultState.ACTIVE and v.scheduled_purge is None


def test_purge_protection_is_one_way():
    v = vault()
    v.enable_purge_protection(True)
    with pytest.raises(BadRequest):
        v.enable_purge_protection(False)
    v.soft_delete(0.0)
    with pytest.raises(Forbidden):
        v.check_purge(90 * DAY - 1)
    v.check_purge(90 * DAY)


@pytest.mark.parametrize("attrs,inner", [
    ({"enabled": False}, "KeyDisabled"), ({"nbf": 200.0}, "KeyNotYetValid"),
    ({"exp": 100.0}, "KeyExpired"), ({"key_ops": ("unwrapKey",)}, "KeyOperationNotAllowed")])
def test_unusable_versions(attrs, inner):
    with pytest.raises(Forbidden) as e:
        version(**attrs).check_usable("wrapKey", 100.0)
    assert e.value.inner == inner
    version().check_usable("wrapKey", 100.0)


def test_key_states_and_deleted_name():
    k = Key("v", "k", 0.0, [version()])
    check_not_deleted_name(k, "k")
    k.soft_delete(10.0, 7)
    assert k.state is KeyState.SOFT_DELETED
    with pytest.raises(Conflict):
        check_not_deleted_name(k, "k")
    with pytest.raises(Forbidden):
        k.check_purge(10.0, purge_protection=True)
    k.check_purge(10.0 + 7 * DAY, purge_protection=True)
    k.recover()
    assert k.state is KeyState.ACTIVE


def test_attributes_parse_and_apply():
    v = version()
    parse_attributes({"exp": 50, "enabled": False}, ["unwrapKey"]).apply(v, 1.0)
    assert (v.exp, v.enabled, v.key_ops, v.updated) == (50.0, False, ("unwrapKey",), 1.0)
    parse_attributes({"exp": None}, None).apply(v, 2.0)
    assert v.exp is None
    for bad in ({"enabled": 1}, {"exp": "x"}, {"exp": True}, {"exp": -1}, {"foo": 1}, []):
        with pytest.raises(BadRequest):
            parse_attributes(bad, None)
    with pytest.raises(BadRequest):
        parse_attributes(None, ["encrypt"])


def test_policies():
    assert policies.parse_permissions(["all"]) == policies.KEY_PERMISSIONS
    assert policies.parse_permissions(["wrapKey", "get", "get"]) == ("get", "wrapKey")
    with pytest.raises(BadRequest):
        policies.parse_permissions(["get", "teleport"])
    with pytest.raises(Forbidden) as e:
        policies.require({"a": ("get",)}, "a", "v", "unwrapKey")
    assert e.value.permission == "unwrapKey"
    assert str(e.value) == "The user, group or application 'a' does not have keys unwrapKey permission on key vault 'v'"


@pytest.mark.parametrize("name,ok", [("abc", True), ("a-b-c", True), ("ab", False), ("1abc", False),
                                     ("abc-", False), ("a--b", False), ("a" * 24, True), ("a" * 25, False),
                                     ("a/b", False), ("a b", False)])
def test_vault_names(name, ok):
    if ok:
        check_vault_name(name)
    else:
        with pytest.raises(BadRequest):
            check_vault_name(name)


def test_key_names():
    check_key_name("k-1")
    for bad in ("", "a" * 128, "a/b", "a.b", "ä"):
        with pytest.raises(BadRequest):
            check_key_name(bad)
