"""Suite-wide options. Long soak, fuzz and benchmark runs sit behind --slow."""

import itertools
import os

import pytest

from tests.helpers import postgres
from tests.helpers.servers import BaselineServer, stop_healthy


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run long soak/fuzz tests (marked slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="long run: use --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def server_factory(tmp_path):
    """start(exports) -> a running BaselineServer; at teardown each must be healthy and
    must stop cleanly on SIGTERM (exit 0)."""
    started: list[BaselineServer] = []

    def start(exports: list[str], **kw) -> BaselineServer:
        srv = BaselineServer(tmp_path, exports, name=f"nbdserver{len(started)}", **kw).start()
        started.append(srv)
        return srv

    yield start
    stop_healthy(started)


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL server for the whole session (tests/helpers/postgres.py);
    skips where PostgreSQL or psycopg is not installed."""
    why = postgres.missing()
    if why:
        pytest.skip(why)
    with postgres.PostgresServer() as srv:
        yield srv


_databases = itertools.count(1)


@pytest.fixture
def postgres_dsn(postgres_server):
    """A new empty database on the session's server: its DSN."""
    return postgres_server.create_database(f"t{os.getpid()}_{next(_databases)}")
