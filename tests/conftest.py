"""Suite-wide options. Long soak, fuzz and benchmark runs sit behind --slow."""

import pytest

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
