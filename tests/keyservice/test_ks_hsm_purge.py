"""Token objects of RSA-HSM keys go with every kind of purge (by hand, by retention, with
the vault), only after the purge commits; a token that refuses the destroy does not fail
the committed purge. The domain service over a real store and a real SoftHSM2 token."""
import logging

import pytest
from test_ks_service import FakeClock

from keyservice.domain.service import KeyService
from keyservice.domain.vaults import DAY
from keyservice.hsm import Pkcs11Token
from keyservice.store import Store
from keyservice.tokens import TokenSigner
from tests.helpers.softhsm import make_token


class RefusingToken(Pkcs11Token):
    refuse = False

    def destroy(self, object_id: bytes) -> None:
        if self.refuse:
            raise RuntimeError("the token said no")
        super().destroy(object_id)


@pytest.fixture
def env(tmp_path):
    softhsm = make_token(tmp_path / "hsm")
    softhsm.session().close()  # this process's SoftHSM learns of the new token
    token = RefusingToken(softhsm.module, softhsm.label, softhsm.pin)
    clock = FakeClock()
    store = Store(tmp_path / "data")
    svc = KeyService(store, TokenSigner(store.token_key), clock=clock, base_url="https://kv.test")
    svc.hsm = token
    got = {}
    ident = svc.bootstrap_admin(lambda i, secret: got.update(secret=secret))
    admin = svc.authenticate(svc.issue_token(ident.client_id, got["secret"])[0])
    yield svc, admin, clock, token
    token.close()
    store.close()


def in_token(token, key) -> list[bool]:
    return [token.has_key(bytes.fromhex(v)) for v in key]


def hsm_key(svc, admin, vault, name):
    _, key, _ = svc.create_key(admin, vault, name, 2048, kty="RSA-HSM")
    svc.rotate_key(admin, vault, name)
    from keyservice.domain import hsm_keys
    key = svc.store.key(vault, name)
    return [hsm_keys.parse_reference(svc.store.private_der(vault, name, v.version))[1].hex()
            for v in key.versions]


def test_every_purge_destroys_the_token_objects(env):
    svc, admin, clock, token = env
    svc.create_vault(admin, "hsm-a", "l", "s", retention_days=7)
    by_hand, by_retention = hsm_key(svc, admin, "hsm-a", "k1"), hsm_key(svc, admin, "hsm-a", "k2")
    assert in_token(token, by_hand + by_retention) == [True] * 4
    svc.delete_key(admin, "hsm-a", "k1")
    assert in_token(token, by_hand) == [True, True]  # soft-deleted: recoverable
    svc.purge_key(admin, "hsm-a", "k1")
    assert in_token(token, by_hand) == [False, False]
    svc.delete_key(admin, "hsm-a", "k2")
    clock.advance(8 * DAY)
    assert svc.sweep() == 1
    assert in_token(token, by_retention) == [False, False]

    svc.create_vault(admin, "hsm-b", "l", "s", retention_days=7)
    with_vault = hsm_key(svc, admin, "hsm-b", "k")
    svc.delete_vault(admin, "hsm-b")
    svc.purge_vault(admin, "hsm-b")
    assert in_token(token, with_vault) == [False, False]


def test_a_refused_destroy_does_not_fail_the_committed_purge(env, caplog):
    svc, admin, clock, token = env
    svc.create_vault(admin, "hsm-c", "l", "s", retention_days=7)
    ids = hsm_key(svc, admin, "hsm-c", "k")
    svc.delete_key(admin, "hsm-c", "k")
    token.refuse = True
    with caplog.at_level(logging.WARNING, logger="keyservice"):
        svc.purge_key(admin, "hsm-c", "k")  # no exception: the purge is committed
    assert svc.store.key("hsm-c", "k") is None
    assert in_token(token, ids) == [True, True]  # left in the token, and said so
    assert sum("was not destroyed" in r.getMessage() for r in caplog.records) == 2
