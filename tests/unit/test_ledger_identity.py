"""The ledger's identity and edges, as the merchant meets them: the real CLI and the real daemon
(issue 13, items 3 and 9). A ledger missing, empty, replaced, foreign, damaged or not usable
is refused with one clear line; nothing but `init` makes a ledger; a daemon whose ledger goes
away stops; keys already delivered are not imported again."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.domain import DeliveryIntent, PlatformOrder
from agent.sandbox.platform import SandboxPlatform
from agent.store.sqlite import SQLiteStore
from tests.conftest import STORE_KEY_ENV, TEST_STORE_KEY, master_key_for_tests
from tests.daemon import ensure_ledger, import_stock, start_daemon
from tests.helpers import SAFETY_TIMEOUT

SKU = "GAME-100"


def bare_config(
    folder: Path, base_url: str = "http://127.0.0.1:9", ledger: str = "kami.db"
) -> Path:
    """A config whose ledger nobody has made yet."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(
        f"""
[agent]
poll_interval = 0.1
sweep_interval = 0.1

[store]
path = "{ledger}"

[platforms.main]
base_url = "{base_url}"
api_key = "test-key"
secret = "platform.main.secret"
timeout = 2.0

[skus."{SKU}"]
max_quantity = 5
""",
        encoding="utf-8",
    )
    return path


def agent(
    config: Path, *args: str, prefix: tuple[str, ...] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """One kami-agent command (`run` included: it must refuse, not start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAMI_")}
    env[STORE_KEY_ENV] = TEST_STORE_KEY
    env["KAMI_SECRET_PLATFORM_MAIN_SECRET"] = "test-secret"
    return subprocess.run(
        [*prefix, sys.executable, "-m", "agent", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def assert_refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Non-zero, and one clear line on stderr naming what is wrong; no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def initialised(folder: Path, base_url: str = "http://127.0.0.1:9") -> Path:
    config = bare_config(folder, base_url)
    made = agent(config, "init")
    assert made.returncode == 0, made.stderr
    return config


def test_nothing_but_init_makes_a_ledger(tmp_path: Path) -> None:
    config = bare_config(tmp_path)
    db = tmp_path / "kami.db"
    for command in (("stock", "list"), ("orders", "list"), ("run",)):
        assert_refused(agent(config, *command), f"no ledger at {db}", "kami-agent init")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]  # nothing created

    made = agent(config, "init")
    assert made.returncode == 0, made.stderr
    identity = tmp_path / "kami.db.identity"
    ledger_id = json.loads(identity.read_text(encoding="utf-8"))["ledger_id"]
    assert ledger_id in made.stdout
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT value FROM ledger_meta WHERE key = 'ledger_id'").fetchone()
    assert stored == (ledger_id,)
    assert_refused(agent(config, "init"), f"{db} already exists", "nothing changed")
    assert agent(config, "stock", "list").returncode == 0


def test_an_emptied_ledger_is_refused(tmp_path: Path) -> None:
    config = initialised(tmp_path)
    (tmp_path / "kami.db").write_bytes(b"")
    for command in (("stock", "list"), ("run",)):
        assert_refused(agent(config, *command), "is empty (0 bytes)", "restore it from backup")
    assert (tmp_path / "kami.db").stat().st_size == 0


def test_a_ledger_replaced_by_another_ledger_is_refused(tmp_path: Path) -> None:
    config = initialised(tmp_path / "shop")
    initialised(tmp_path / "other")  # another ledger, same store key, made the proper way
    shutil.copyfile(tmp_path / "other" / "kami.db", tmp_path / "shop" / "kami.db")
    for command in (("stock", "list"), ("run",)):
        assert_refused(agent(config, *command), "was replaced", "put this shop's ledger back")


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    config = initialised(tmp_path)
    db = tmp_path / "kami.db"
    db.unlink()
    db.write_text("not a database at all\n", encoding="utf-8")
    assert_refused(agent(config, "stock", "list"), "not a kami-agent ledger")
    db.unlink()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    assert_refused(agent(config, "stock", "list"), "not a kami-agent ledger")
    with sqlite3.connect(db) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["invoices"]


def test_a_lost_identity_file_is_refused_until_adopted(tmp_path: Path) -> None:
    config = initialised(tmp_path)
    identity = tmp_path / "kami.db.identity"
    ledger_id = json.loads(identity.read_text(encoding="utf-8"))["ledger_id"]
    identity.unlink()
    assert_refused(agent(config, "stock", "list"), "is missing", "kami-agent init --adopt")
    adopted = agent(config, "init", "--adopt")
    assert adopted.returncode == 0, adopted.stderr
    assert json.loads(identity.read_text(encoding="utf-8"))["ledger_id"] == ledger_id
    assert agent(config, "stock", "list").returncode == 0


def _corrupt_a_middle_page(db: Path) -> None:
    pages = db.stat().st_size // 4096
    with db.open("r+b") as handle:
        handle.seek((pages // 2) * 4096)
        handle.write(b"\xa5" * 4096)


def test_a_damaged_ledger_is_refused_at_start_and_by_check(tmp_path: Path) -> None:
    config = initialised(tmp_path)
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"KEY-{i:06d}-{'x' * 40}\n" for i in range(3000)), encoding="utf-8")
    assert agent(config, "stock", "import", SKU, str(keys)).returncode == 0
    _corrupt_a_middle_page(tmp_path / "kami.db")
    assert_refused(agent(config, "run", timeout=30), "is damaged", "restore it from backup")
    checked = agent(config, "check")
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert "FAILED" in checked.stdout or "problem" in checked.stdout


def test_keys_already_delivered_are_not_imported_again(tmp_path: Path) -> None:
    config = initialised(tmp_path)
    keys = tmp_path / "keys.txt"
    keys.write_text("K-1\nK-2\nK-3\n", encoding="utf-8")
    first = agent(config, "stock", "import", SKU, str(keys))
    assert "added 3" in first.stdout, first.stderr

    async def deliver_one() -> None:
        store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
        await store.open()
        (line_id,) = await store.ingest("main", [PlatformOrder("O-1", "paid", SKU, 1)], 1.0)
        assert isinstance(await store.claim_for_delivery(line_id, 1.0), DeliveryIntent)
        await store.mark_delivered(line_id, 2.0, "ok")
        await store.close()

    asyncio.run(deliver_one())
    again = agent(config, "stock", "import", SKU, str(keys))
    assert again.returncode == 0, again.stderr
    assert "added 0, duplicates 2" in again.stdout
    assert "refused 1 key(s) this ledger already bound to orders" in again.stdout
    elsewhere = agent(config, "stock", "import", "VIP-30D", str(keys))
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "added 0" in elsewhere.stdout
    assert "refused 1 key(s) this ledger already bound" in elsewhere.stdout
    assert "refused 2 key(s) this ledger holds under another SKU" in elsewhere.stdout
    assert "K-1" not in again.stdout + elsewhere.stdout


# --- store errors as one clear line ---------------------------------------------------------
def _without_root_powers() -> tuple[str, ...]:
    """A prefix that runs a command without root's power to ignore file permissions."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be tested")
    caps = "-dac_override,-dac_read_search"
    return ("setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}")


def test_a_directory_as_the_ledger_path_is_one_clear_line(tmp_path: Path) -> None:
    config = bare_config(tmp_path, ledger="ledgers")
    (tmp_path / "ledgers").mkdir()
    for command in (("stock", "list"), ("run",), ("init",)):
        assert_refused(agent(config, *command), "ledgers")


def test_an_unreadable_ledger_is_one_clear_line(tmp_path: Path) -> None:
    config = initialised(tmp_path)
    (tmp_path / "kami.db").chmod(0)
    for command in (("stock", "list"), ("run",)):
        assert_refused(agent(config, *command, prefix=_without_root_powers()), "permission denied")


def test_a_read_only_ledger_is_one_clear_line(tmp_path: Path) -> None:
    config = initialised(tmp_path)
    keys = tmp_path / "keys.txt"
    keys.write_text("K-1\n", encoding="utf-8")
    (tmp_path / "kami.db").chmod(0o400)
    prefix = _without_root_powers()
    assert_refused(agent(config, "stock", "import", SKU, str(keys), prefix=prefix), "cannot be")
    assert_refused(agent(config, "run", prefix=prefix, timeout=30), "cannot be written")


def test_a_ledger_on_a_read_only_mount_is_one_clear_line(tmp_path: Path) -> None:
    config = initialised(tmp_path)
    folder = str(tmp_path)
    if os.geteuid() == 0:  # a real read-only bind mount, in a mount namespace of its own
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip(f"no mount namespace here: {probe.stderr.decode().strip()}")
        mount = f'mount --bind -o ro {folder} {folder} && exec "$@"'
        prefix: tuple[str, ...] = ("unshare", "-m", "sh", "-c", mount, "sh")
    else:
        tmp_path.chmod(0o555)
        prefix = ()
    try:
        assert_refused(agent(config, "run", prefix=prefix), "lock file", "kami.db.lock")
        assert_refused(agent(config, "stock", "list", prefix=prefix), str(tmp_path / "kami.db"))
    finally:
        tmp_path.chmod(0o755)


# --- the daemon's ledger going away while it runs -----------------------------------------
def _log_events(log: Path) -> list[dict[str, object]]:
    events = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


async def _until(condition: object, what: str, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_the_daemon_stops_when_its_ledger_goes_away(
    tmp_path: Path, sandbox: SandboxPlatform, how: str
) -> None:
    config = bare_config(tmp_path / "shop", sandbox.base_url)
    secrets = {"KAMI_SECRET_PLATFORM_MAIN_SECRET": sandbox.secret}
    await import_stock(config, secrets, tmp_path, SKU, [f"K-{i:04d}" for i in range(20)])
    log = tmp_path / "daemon.log"
    db = tmp_path / "shop" / "kami.db"
    proc = await start_daemon(config, secrets, log)
    try:
        first = sandbox.add_order(SKU)
        await _until(lambda: sandbox.orders[first].delivery is not None, "a delivery", proc)
        if how == "deleted":
            db.unlink()
        else:  # another ledger, made the proper way, moved into its place
            other = bare_config(tmp_path / "other", sandbox.base_url)
            await ensure_ledger(other, secrets)
            os.replace(tmp_path / "other" / "kami.db", db)

        def noticed() -> bool:
            return any(e.get("event") == "ledger_lost" for e in _log_events(log))

        await _until(noticed, "the daemon to notice", proc)
        after = sandbox.add_order(SKU)
        code = await asyncio.wait_for(proc.wait(), SAFETY_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 1, log.read_text(encoding="utf-8")
    lost = next(e for e in _log_events(log) if e.get("event") == "ledger_lost")
    assert lost["level"] == "error" and how in str(lost["reason"])
    stopped = next(e for e in _log_events(log) if e.get("event") == "stopped")
    assert stopped["exit_code"] == 1

    # Started again, as systemd does: refused with one clear line, nothing made, nothing sent.
    restarted = await start_daemon(config, secrets, log, init=False)
    try:
        assert await asyncio.wait_for(restarted.wait(), SAFETY_TIMEOUT) == 1
    finally:
        if restarted.returncode is None:
            restarted.kill()
            await restarted.wait()
    last = log.read_text(encoding="utf-8").strip().splitlines()[-1]
    expected = "no ledger at" if how == "deleted" else "was replaced"
    assert last.startswith("kami-agent: error:") and expected in last, last
    assert sandbox.orders[after].delivery is None
    assert db.exists() == (how == "replaced")
