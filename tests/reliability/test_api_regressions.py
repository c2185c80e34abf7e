"""Regressions for what the schemathesis run (test_fuzz_keyservice_api.py) found in the
key service API, each pinned down with one exact request against the real daemon."""

from __future__ import annotations

import socket

import pytest

from tests.helpers.platform import Stack


@pytest.fixture(scope="module")
def ks(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("ks"))
    stack.start_keyservice()
    stack.keyservice("vault", "create", "regvault", "--location", "local", "--subscription", "s1",
                     "--enable-purge-protection")
    yield stack
    try:
        stack.ks.assert_healthy()
    finally:
        stack.close()


def test_import_with_null_pem_is_400_not_500(ks):
    """Found by schemathesis: `{"pem": null}` reached `.encode()` on None (500)."""
    status, body = ks.ks_api("PUT", "/vaults/regvault/keys/k1", {"pem": None})
    assert status == 400, body
    assert "pem" in body["error"]["message"]
    ks.ks.assert_healthy()
