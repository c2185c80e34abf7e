"""Fixtures for the disk platform's end-to-end tests: both daemons as real processes.

`stack` is shared by the tests of one module (each test uses its own vault, key, set and
disk names, so they do not interfere; its state is where the `state` fixture says);
`make_stack` gives a test its own, for what must
stop or restart a daemon or needs a short lease or grace period. Every stack must end
healthy: both processes alive and no traceback in either log.
"""

from __future__ import annotations

import itertools
import os

import pytest

from tests.helpers.platform import Stack


def _finish(stack: Stack) -> None:
    try:
        if stack.nb is not None and stack.nb.proc is not None and stack.nb.alive():
            stack.nb.assert_healthy()
        if stack.ks.proc is not None and stack.ks.alive():
            stack.ks.assert_healthy()
        assert "Traceback" not in stack.logs(), stack.logs()[-6000:]
    finally:
        stack.close()


STATES = ("sqlite", "postgresql")
_databases = itertools.count(1)


@pytest.fixture(scope="module")
def state():
    """Where the module's `stack` keeps both daemons' state: "sqlite", or "postgresql" (a
    database each on the session's server); a module overrides it with `params=STATES`
    to run on both (issue 15)."""
    return "sqlite"


def state_args(request, state: str) -> dict:
    if state == "sqlite":
        return {}
    pg = request.getfixturevalue("postgres_server")
    n = next(_databases)
    return {"nbd_args": ["--state", pg.create_database(f"nb{os.getpid()}_{n}")],
            "ks_args": ["--state", pg.create_database(f"ks{os.getpid()}_{n}p")]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request, state):
    s = Stack(tmp_path_factory.mktemp("platform"), **state_args(request, state)).start()
    yield s
    _finish(s)


@pytest.fixture
def make_stack(tmp_path):
    stacks: list[Stack] = []

    def make(**kw) -> Stack:
        s = Stack(tmp_path / f"stack{len(stacks)}", **kw)
        stacks.append(s)
        return s.start()

    yield make
    for s in stacks:
        _finish(s)


@pytest.fixture
def keyservice(tmp_path):
    """The key service alone, for tests that run the platform in their own process."""
    stack = Stack(tmp_path)
    stack.start_keyservice()
    yield stack
    stack.ks.assert_healthy()
    stack.close()
