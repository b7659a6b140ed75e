"""The daemon as a process at the edges: SIGHUP, the shipped systemd unit, a stepped clock."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from agent.runtime import EXIT_RESTART
from agent.sandbox.platform import SandboxPlatform
from tests.daemon import import_stock, start_daemon
from tests.helpers import SAFETY_TIMEOUT, assert_platform_invariants

SECRET = "edges-process-platform-secret"
SECRETS = {"KAMI_SECRET_PLATFORM_MAIN_SECRET": SECRET}
UNIT = Path(__file__).resolve().parent.parent / "systemd" / "kami-agent.service"


def write_config(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[agent]
poll_interval = 0.2
sweep_interval = 0.2
concurrency = 4
retry_base = 0.05
retry_cap = 0.5

[store]
path = "kami.db"

[platforms.main]
base_url = "{base_url}"
api_key = "edges"
secret = "platform.main.secret"
timeout = 2.0

[skus."GAME-100"]
max_quantity = 5
""",
        encoding="utf-8",
    )
    return path


async def started_sandbox() -> SandboxPlatform:
    sandbox = SandboxPlatform(api_key="edges", secret=SECRET, seed=13)
    sandbox.long_poll_offered = False  # plain polling: every listing is a scheduled poll
    await sandbox.start()
    return sandbox


async def wait_until(condition: object, what: str, proc: asyncio.subprocess.Process) -> None:
    assert callable(condition)
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while not condition():
        assert proc.returncode is None, f"the daemon died while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_sighup_drains_exits_for_a_restart_and_orders_complete(tmp_path: Path) -> None:
    sandbox = await started_sandbox()
    sandbox.faults.latency = 0.05  # deliveries take a moment: the hangup lands mid-work
    config = write_config(tmp_path, sandbox.base_url)
    log = tmp_path / "daemon.log"
    try:
        values = [f"GAME-100-hup-{i:05d}" for i in range(400)]
        await import_stock(config, SECRETS, tmp_path, "GAME-100", values)
        ids = [sandbox.add_order("GAME-100", quantity=1 + i % 3) for i in range(150)]
        proc = await start_daemon(config, SECRETS, log)
        try:
            await wait_until(lambda: len(sandbox.delivered_secrets()) >= 10, "deliveries", proc)
            proc.send_signal(signal.SIGHUP)
            code = await asyncio.wait_for(proc.wait(), SAFETY_TIMEOUT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = log.read_text(encoding="utf-8")
        assert code == EXIT_RESTART, f"exit {code}, see {log}"
        # It went through the same drain as SIGTERM: workers finished, ledger closed.
        assert '"event": "stopping"' in text and '"event": "stopped"' in text, text[-2000:]
        proc = await start_daemon(config, SECRETS, log)  # what Restart=always does
        try:
            await wait_until(
                lambda: all(sandbox.orders[i].delivery is not None for i in ids), "all orders", proc
            )
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), SAFETY_TIMEOUT) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        await sandbox.stop()
    assert_platform_invariants(sandbox)
    assert set(sandbox.delivered_secrets()) == set(ids)


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """The unit file as section -> key -> values (a key may repeat in systemd units)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_restarts_after_any_exit_and_bounds_memory_and_crash_loops() -> None:
    unit = unit_settings(UNIT)
    service = unit["Service"]
    assert service["Restart"] == ["always"]  # on-failure takes a SIGHUP for a clean exit
    assert service["MemoryMax"][0][:-1].isdigit() and service["MemoryMax"][0][-1] in "KMG"
    assert "-HUP" in service["ExecReload"][0]
    # The start limit lives in [Unit]; in [Service] systemd ignores it.
    assert unit["Unit"]["StartLimitIntervalSec"] and int(unit["Unit"]["StartLimitBurst"][0]) > 0
