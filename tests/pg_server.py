"""A throwaway PostgreSQL server on loopback for the tests.

Uses KAMI_TEST_POSTGRES_URL when it is set; otherwise finds the server binaries (Debian puts
them in /usr/lib/postgresql/<version>/bin), makes a cluster in a temp dir and starts it on a
free 127.0.0.1 port. As root it runs them as the `postgres` user: initdb refuses root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

URL_ENV = "KAMI_TEST_POSTGRES_URL"
REQUIRE_ENV = "KAMI_REQUIRE_POSTGRES"  # CI sets it: no server is a failure, not a skip


@dataclass
class PgServer:
    url: str
    data_dir: Path | None = None
    bin_dir: Path | None = None
    user: str | None = None
    options: str = ""

    def stop(self) -> None:
        self.halt()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def halt(self) -> None:
        """Stops the server abruptly (an outage); start_again() brings it back."""
        if self.data_dir is None or self.bin_dir is None:
            return
        _run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "stop"],
            self.user,
        )

    def start_again(self) -> None:
        assert self.data_dir is not None and self.bin_dir is not None
        started = _pg_ctl_start(self.bin_dir, self.data_dir, self.options, self.user)
        if started.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start again: {started.stderr.strip()}")


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(cmd: list[str], user: str | None) -> subprocess.CompletedProcess[str]:
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _pg_ctl_start(
    bin_dir: Path, data: Path, options: str, user: str | None
) -> subprocess.CompletedProcess[str]:
    log = data.parent / "server.log"
    pg_ctl = str(bin_dir / "pg_ctl")
    return _run(
        [pg_ctl, "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "60", "start"], user
    )


def start(*, own: bool = False) -> PgServer:
    """The server to test against; raises RuntimeError saying why there is none.
    own=True: always a new server of our own (a test that stops it), whatever the env says."""
    url = os.environ.get(URL_ENV)
    if url and not own:
        return PgServer(url)
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError(
            f"no PostgreSQL server binaries (apt-get install postgresql) and {URL_ENV} unset"
        )
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError as exc:
            raise RuntimeError("running as root and there is no `postgres` user") from exc
        user = "postgres"
    root = Path(tempfile.mkdtemp(prefix="kami-pg-"))
    data = root / "data"
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    init = _run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", "kami", "--auth=trust", "-E", "UTF8"],
        user,
    )
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {init.stderr.strip()[-400:]}")
    port = _free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}"
        " -c max_connections=200 -c fsync=on -c synchronous_commit=on"
    )
    started = _pg_ctl_start(bin_dir, data, options, user)
    if started.returncode != 0:
        log = (root / "server.log").read_text(errors="replace")[-600:]
        raise RuntimeError(f"PostgreSQL did not start: {started.stderr.strip()} {log}")
    server = PgServer(f"postgresql://kami@127.0.0.1:{port}/postgres", data, bin_dir, user, options)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"PostgreSQL started but does not answer on 127.0.0.1:{port}")
