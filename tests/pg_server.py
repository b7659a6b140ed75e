"""A throwaway PostgreSQL server on loopback for the tests.

Uses KAMI_TEST_POSTGRES_URL when it is set; otherwise finds the server binaries (Debian puts
them in /usr/lib/postgresql/<version>/bin), makes a cluster in a temp dir and starts it on a
free 127.0.0.1 port. As root it runs them as the `postgres` user: initdb refuses root.

A server of ours never outlives the test run, however the run ends: a guard process (this
file run as a script) holds one end of a pipe whose other end only the test process holds,
and when that end closes (a normal exit, SIGTERM, SIGINT, even SIGKILL) it stops the server
and removes its files. pg_ctl puts the server in a session of its own, so nothing else
would stop it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
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
    guard: Guard | None = None

    def stop(self) -> None:
        self.halt()
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)
        if self.guard is not None:
            self.guard.release()

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


class Guard:
    """The guard process of one server (see the module docstring)."""

    def __init__(self, root: Path, bin_dir: Path, user: str | None) -> None:
        read_end, self._write_end = os.pipe()  # not inherited by anything we start later
        try:
            self.process = subprocess.Popen(
                [sys.executable, __file__, "guard", str(root), str(bin_dir), user or ""],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C to the test run's process group spares it
            )
        finally:
            os.close(read_end)

    def release(self) -> None:
        """The server is already stopped and removed: let the guard end."""
        if self._write_end >= 0:
            os.close(self._write_end)
            self._write_end = -1
        self.process.wait(timeout=60)


def _guard(root: Path, bin_dir: Path, user: str | None) -> None:
    """The guard's body: waits for end of file on stdin, then stops and removes the server."""

    def interrupted(signum: int, frame: object) -> None:
        raise InterruptedError  # SIGTERM: stop waiting, clean up, then end

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, interrupted)
    with contextlib.suppress(InterruptedError):
        sys.stdin.buffer.read()
    data = root / "data"
    if (data / "postmaster.pid").exists():
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], user)
    shutil.rmtree(root, ignore_errors=True)


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
    guard = Guard(root, bin_dir, user)  # from here on, however the run ends
    try:
        return _start_in(root, data, bin_dir, user, guard)
    except BaseException:
        PgServer("", data, bin_dir, user, guard=guard).stop()
        raise


def _start_in(root: Path, data: Path, bin_dir: Path, user: str | None, guard: Guard) -> PgServer:
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
    url = f"postgresql://kami@127.0.0.1:{port}/postgres"
    server = PgServer(url, data, bin_dir, user, options, guard)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.1)
    raise RuntimeError(f"PostgreSQL started but does not answer on 127.0.0.1:{port}")


if __name__ == "__main__" and sys.argv[1:2] == ["guard"]:
    _guard(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] or None)
