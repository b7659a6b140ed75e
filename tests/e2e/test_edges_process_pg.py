"""An interrupted test run leaves no PostgreSQL server of its own behind (tests/pg_server.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import SAFETY_TIMEOUT
from tests.pg_server import REQUIRE_ENV, URL_ENV, _bin_dir

ROOT = Path(__file__).resolve().parents[2]
# A test run of its own that makes a server the way the suite does, says where, and waits
# to be interrupted.
INNER_TEST = """
import os
import time
from pathlib import Path

import pytest

from tests.pg_server import start


@pytest.fixture(scope="session")
def server():
    made = start(own=True)
    yield made
    made.stop()


def test_holds_a_server(server):
    Path(os.environ["KAMI_PG_PROBE"]).write_text(str(server.data_dir), encoding="utf-8")
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie nobody reaped has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_leaves_no_postgres_server(tmp_path: Path, signum: int) -> None:
    if _bin_dir() is None:
        message = "no PostgreSQL server binaries"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (tmp_path / "test_inner.py").write_text(INNER_TEST, encoding="utf-8")
    probe = tmp_path / "data_dir.txt"
    env = {k: v for k, v in os.environ.items() if k != URL_ENV}
    env["KAMI_PG_PROBE"] = str(probe)
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + SAFETY_TIMEOUT * 2  # initdb takes a while
        while not probe.exists() or not probe.read_text(encoding="utf-8"):
            assert run.poll() is None, run.communicate()[0].decode(errors="replace")
            assert time.monotonic() < deadline, "the inner run never started its server"
            time.sleep(0.05)
        data_dir = Path(probe.read_text(encoding="utf-8"))
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
        assert alive(postmaster)
        run.send_signal(signum)
        run.wait(timeout=SAFETY_TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    # The guard cleans up after the run has gone: wait for it (a hang guard, not a timing).
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while (alive(postmaster) or data_dir.parent.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(postmaster), f"PostgreSQL (pid {postmaster}) still runs"
    assert not data_dir.parent.exists(), f"{data_dir.parent} is still there"
