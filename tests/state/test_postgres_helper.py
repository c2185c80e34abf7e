"""The throwaway PostgreSQL server the state tests share (tests/helpers/postgres.py)."""
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import postgres

psycopg = pytest.importorskip("psycopg")


def test_each_test_gets_its_own_database(postgres_server):
    a, b = postgres_server.create_database("helper_a"), postgres_server.create_database("helper_b")
    with psycopg.connect(a, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
    with psycopg.connect(b) as conn:
        assert conn.execute("SELECT to_regclass('t')").fetchone()[0] is None


def test_no_tcp_listener(postgres_server):
    """Trust authentication is safe only because the socket is in a 0700 directory."""
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres",
                        connect_timeout=2)


def test_bad_database_name_refused(postgres_server):
    with pytest.raises(ValueError):
        postgres_server.create_database("x; DROP DATABASE postgres")


def test_script_starts_and_stops_a_server():
    if postgres.missing():
        pytest.skip(postgres.missing())
    # Not under tmp_path: pytest's base directory is 0700 root, closed to the postgres user.
    root = Path(tempfile.mkdtemp(prefix="pg-script-"))
    out = subprocess.run([sys.executable, "-m", "tests.helpers.postgres", "start", str(root),
                          "--database", "demo"], capture_output=True, text=True, timeout=90)
    try:
        assert out.returncode == 0, out.stderr
        with psycopg.connect(out.stdout.strip()) as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0] == "demo"
    finally:
        stop = subprocess.run([sys.executable, "-m", "tests.helpers.postgres", "stop", str(root)],
                              capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert not root.exists()
