"""The platform's own vault is the platform's alone (issue 19, item 2).

The attack: another identity holds the vault name `nbd-platform` before the platform's
first start (or grants itself on it later); a platform that adopted it would wrap every
platform-managed disk's DEK under a key that identity can unwrap. The platform must refuse
to start, naming the problem, and must not put a single DEK under that vault's keys.
"""

from __future__ import annotations

import json

import pytest

from nbdserver.platform.service import platform_vault_problems
from tests.helpers.platform import NbdServerProcess


def _identity(stack, name: str, roles: list[str]) -> tuple[dict, object]:
    status, ident = stack.ks_api("POST", "/identities", {"displayName": name, "type": "servicePrincipal",
                                                        "roles": roles})
    assert status == 201, ident
    path = stack.workdir / f"{name}.credential"
    path.write_text(json.dumps({"client_id": ident["clientId"], "client_secret": ident["clientSecret"],
                                "tenant_id": ident["tenantId"], "object_id": ident["objectId"]}))
    path.chmod(0o600)
    return ident, path


def _start_refused(stack, data_dir, credential) -> str:
    nb = NbdServerProcess(stack.workdir, data_dir, stack.ks, lease=60, grace=60,
                          extra_args=("--keyservice-credential", str(credential)))
    with pytest.raises(RuntimeError):
        nb.start()
    assert nb.process.wait(timeout=30) != 0
    err = nb.stderr_text()
    assert "Traceback" not in err, err
    return err


def test_a_platform_does_not_adopt_a_vault_someone_else_owns(make_stack, tmp_path):
    """The vault exists, owned by another identity (here: the first platform's): a
    second platform with its own identity refuses to start and names the owner."""
    stack = make_stack()
    owner = stack.ks_api("GET", "/vaults/nbd-platform")[1]["owner"]
    second, cred = _identity(stack, "second-platform", ["platform"])
    # The squatter invites the platform in: with these rights a platform that adopted
    # the vault would start fine and wrap its DEKs under the squatter's key.
    stack.keyservice("policy", "set", "nbd-platform", "--object-id", second["objectId"],
                     "--key-permissions", "get,create,wrapKey,unwrapKey")
    err = _start_refused(stack, tmp_path / "nbd2", cred)
    assert "refusing to use the platform vault 'nbd-platform'" in err and owner in err, err[-2000:]
    # It created nothing in the vault it refused.
    keys = stack.keyservice("key", "list", "nbd-platform")["value"]
    assert len(keys) == 1


def test_a_grant_on_the_platform_vault_stops_the_next_start(make_stack):
    """An admin grants another identity unwrapKey on the platform's vault: the platform
    will not start on it again until the grant is gone."""
    stack = make_stack()
    spy, _ = _identity(stack, "spy", [])
    stack.keyservice("policy", "set", "nbd-platform", "--object-id", spy["objectId"],
                     "--key-permissions", "get,unwrapKey")
    stack.stop_nbdserver()
    err = _start_refused(stack, stack.nb_dir, stack.ks.admin_credential)
    assert "refusing to use the platform vault 'nbd-platform'" in err and spy["objectId"] in err, err[-2000:]
    stack.keyservice("policy", "delete", "nbd-platform", "--object-id", spy["objectId"])
    stack.start_nbdserver()
    stack.create_disk("after-ungrant", "--size", "1M")


def test_vault_problems_name_each_fault():
    good = {"owner": "me", "tenantId": "t", "enablePurgeProtection": True, "state": "active",
            "accessPolicies": [{"objectId": "me", "permissions": {"keys": ["get"]}}]}
    assert platform_vault_problems(good, "me", "t") == []
    bad = dict(good, owner="other", tenantId="t2", enablePurgeProtection=False, state="softDeleted",
               accessPolicies=[{"objectId": "x", "permissions": {"keys": ["unwrapKey"]}},
                               {"objectId": "y", "permissions": {"keys": []}}])
    problems = platform_vault_problems(bad, "me", "t")
    assert len(problems) == 5 and problems[-1].endswith(": x")
