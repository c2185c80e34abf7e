"""The domain service over a real store, with an injected clock: retention,
purge protection, the retention sweep, role and tenant rules."""
import pytest

from keyservice.domain.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from keyservice.domain.identities import Caller
from keyservice.domain.keys import parse_attributes
from keyservice.domain.service import KeyService
from keyservice.domain.vaults import DAY
from keyservice.store import Store
from keyservice.tokens import TokenSigner


class FakeClock:
    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def svc(tmp_path, clock):
    store = Store(tmp_path)
    s = KeyService(store, TokenSigner(store.token_key), clock=clock, base_url="https://kv.test")
    yield s
    store.close()


@pytest.fixture
def admin(svc):
    got = {}
    ident = svc.bootstrap_admin(lambda i, secret: got.update(secret=secret))
    token, _, _ = svc.issue_token(ident.client_id, got["secret"])
    return svc.authenticate(token)


def test_bootstrap_once_and_token_roundtrip(svc, admin, clock):
    assert svc.bootstrap_admin(lambda i, s: None) is None
    assert admin.is_admin and admin.tenant_id == svc.home_tenant
    with pytest.raises(Unauthorized):
        svc.issue_token("nobody", "wrong")


@pytest.mark.parametrize("protect", [True, False])
def test_key_purge_protection_until_retention_ends(svc, admin, clock, protect):
    svc.create_vault(admin, "vault-a", "l", "s", retention_days=7, purge_protection=protect)
    svc.create_key(admin, "vault-a", "k", 2048)
    svc.delete_key(admin, "vault-a", "k")
    if protect:
        with pytest.raises(Forbidden) as e:
            svc.purge_key(admin, "vault-a", "k")
        assert e.value.inner == "PurgeProtected"
        clock.advance(7 * DAY - 1)
        with pytest.raises(Forbidden):
            svc.purge_key(admin, "vault-a", "k")
        clock.advance(1)
    svc.purge_key(admin, "vault-a", "k")
    with pytest.raises(NotFound):
        svc.get_deleted_key(admin, "vault-a", "k")


def test_failed_credential_write_leaves_no_admin(tmp_path, clock):
    store = Store(tmp_path / "fresh")
    s = KeyService(store, TokenSigner(store.token_key), clock=clock)

    def fail(ident, secret):
        raise OSError("disk full")
    with pytest.raises(OSError):
        s.bootstrap_admin(fail)
    assert s.bootstrap_admin(lambda i, secret: None) is not None  # tried again next start
    store.close()


def test_purge_needs_the_purge_permission(svc, admin, clock):
    svc.create_vault(admin, "vault-b", "l", "s")
    svc.create_key(admin, "vault-b", "k", 2048)
    svc.delete_key(admin, "vault-b", "k")
    svc.set_policy(admin, "vault-b", admin.object_id, ["get", "list", "recover"])
    with pytest.raises(Forbidden) as e:
        svc.purge_key(admin, "vault-b", "k")
    assert e.value.permission == "purge"


def test_vault_purge_protection_and_sweep(svc, admin, clock):
    svc.create_vault(admin, "vault-c", "l", "s", retention_days=10, purge_protection=True)
    svc.create_key(admin, "vault-c", "k", 2048)
    svc.delete_vault(admin, "vault-c")
    with pytest.raises(Forbidden):
        svc.purge_vault(admin, "vault-c")
    with pytest.raises(Conflict):
        svc.create_vault(admin, "vault-c", "l", "s")
    assert svc.sweep() == 0
    clock.advance(10 * DAY)
    assert svc.sweep() == 1
    assert [e.type for e in svc.events_after(admin, 0)][-1] == "vault.purged"
    svc.create_vault(admin, "vault-c", "l", "s")  # the name is free again
    with pytest.raises(NotFound):
        svc.get_key(admin, "vault-c", "k")


def test_sweep_purges_keys_past_retention(svc, admin, clock):
    svc.create_vault(admin, "vault-d", "l", "s", retention_days=7)
    svc.create_key(admin, "vault-d", "k", 2048)
    svc.delete_key(admin, "vault-d", "k")
    clock.advance(7 * DAY)
    assert svc.sweep() == 1
    svc.create_key(admin, "vault-d", "k", 2048)


def test_expiry_and_nbf_follow_the_clock(svc, admin, clock):
    svc.create_vault(admin, "vault-e", "l", "s")
    now = clock.now
    svc.create_key(admin, "vault-e", "k", 2048, parse_attributes({"nbf": now + 10, "exp": now + 20}, None))
    with pytest.raises(Forbidden) as e:
        svc.wrap(admin, "vault-e", "k", None, "RSA-OAEP-256", b"x")
    assert e.value.inner == "KeyNotYetValid"
    clock.advance(10)
    svc.wrap(admin, "vault-e", "k", None, "RSA-OAEP-256", b"x")
    clock.advance(10)
    with pytest.raises(Forbidden) as e:
        svc.wrap(admin, "vault-e", "k", None, "RSA-OAEP-256", b"x")
    assert e.value.inner == "KeyExpired"
    with pytest.raises(BadRequest):
        svc.update_key(admin, "vault-e", "k", None, parse_attributes({"nbf": now + 30}, None))


def test_tenant_isolation_and_roles(svc, admin):
    svc.create_vault(admin, "vault-f", "l", "s")
    foreign = Caller("someone", "another-tenant", ("admin",))
    with pytest.raises(Unauthorized):
        svc.get_vault(foreign, "vault-f")
    assert svc.list_vaults(foreign) == []
    platform = Caller("p", admin.tenant_id, ("platform",))
    svc.create_identity(platform, "des", "managedIdentity", [])
    with pytest.raises(Forbidden):
        svc.create_identity(platform, "x", "managedIdentity", ["platform"])
    with pytest.raises(Forbidden):
        svc.create_identity(platform, "x", "managedIdentity", [], "11111111-1111-1111-1111-111111111111")
    with pytest.raises(Forbidden):
        svc.check_subscriber(Caller("u", admin.tenant_id))
    svc.check_subscriber(platform)
    svc.get_vault(platform, "vault-f")  # the platform may read any vault of its tenant
    with pytest.raises(Forbidden):
        svc.get_vault(Caller("stranger", admin.tenant_id), "vault-f")


def test_events_written_with_the_change(svc, admin):
    svc.create_vault(admin, "vault-g", "l", "s")
    _, key, v1 = svc.create_key(admin, "vault-g", "k", 2048)
    svc.update_key(admin, "vault-g", "k", None, parse_attributes({"enabled": False, "exp": 2**35}, None))
    svc.set_policy(admin, "vault-g", "oid-1", ["get"])
    types = [(e.type, e.version, e.objectId) for e in svc.events_after(admin, 0)]
    assert types == [("key.created", v1.version, None), ("key.disabled", v1.version, None),
                     ("key.updated", v1.version, None), ("policy.changed", None, "oid-1")]
    # a refused change writes no event
    with pytest.raises(BadRequest):
        svc.set_policy(admin, "vault-g", "oid-1", ["nope"])
    assert len(svc.events_after(admin, 0)) == 4


def test_expiry_is_announced_once_per_exp(svc, admin, clock):
    svc.create_vault(admin, "vault-h", "l", "s")
    _, _, v = svc.create_key(admin, "vault-h", "k", 2048, parse_attributes({"exp": clock.now + 5}, None))
    assert svc.announce_expiries() == 0
    clock.advance(5)
    assert svc.announce_expiries() == 1
    assert svc.announce_expiries() == 0
    last = svc.events_after(admin, 0)[-1]
    assert (last.type, last.key, last.version) == ("key.expired", "k", v.version)
    svc.update_key(admin, "vault-h", "k", None, parse_attributes({"exp": clock.now + 5}, None))
    clock.advance(5)
    assert svc.announce_expiries() == 1  # a new exp is announced again
