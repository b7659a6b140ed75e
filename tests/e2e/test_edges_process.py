"""The daemon as a process at the edges: SIGHUP, the shipped systemd unit, a stepped clock."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from agent.runtime import EXIT_RESTART
from agent.sandbox.platform import SandboxPlatform
from tests.daemon import agent_env, import_stock, start_daemon, wait_until
from tests.helpers import SAFETY_TIMEOUT, assert_platform_invariants

SECRET = "edges-process-platform-secret"
SECRETS = {"KAMI_SECRET_PLATFORM_MAIN_SECRET": SECRET}
UNIT = Path(__file__).resolve().parents[2] / "systemd" / "kami-agent.service"


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


def libfaketime() -> str:
    """libfaketime (Debian: apt-get install faketime; .ci/run installs it)."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    if not found:
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    return found[0]


def step_wall_clock(control: Path, offset: str) -> None:
    """libfaketime reads the offset from this file at every clock read (FAKETIME_NO_CACHE):
    the daemon's wall clock steps at once; its monotonic clock is left alone."""
    partial = control.with_suffix(".new")
    partial.write_text(offset + "\n", encoding="utf-8")
    os.replace(partial, control)  # never a half-written file


async def test_wall_clock_steps_do_not_stall_polling_or_the_watchdog(tmp_path: Path) -> None:
    sandbox = await started_sandbox()
    config = write_config(tmp_path, sandbox.base_url)
    control = tmp_path / "faketime.offset"
    step_wall_clock(control, "+0")
    notify_socket = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_socket))
    listener.setblocking(False)
    pings = 0

    async def receive() -> None:
        nonlocal pings
        loop = asyncio.get_running_loop()
        while True:
            pings += (await loop.sock_recv(listener, 4096)).decode().count("WATCHDOG=1")

    env = agent_env(config, SECRETS) | {
        "LD_PRELOAD": libfaketime(),
        "FAKETIME_TIMESTAMP_FILE": str(control),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "NOTIFY_SOCKET": str(notify_socket),
        "WATCHDOG_USEC": "400000",  # a ping every 0.2 s
    }
    receiver = asyncio.create_task(receive())
    log = tmp_path / "daemon.log"
    try:
        await import_stock(config, SECRETS, tmp_path, "GAME-100", ["C-1", "C-2", "C-3"])
        with log.open("ab") as sink:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent", "run", env=env, stdout=sink, stderr=sink
            )
        try:
            await wait_until(lambda: sandbox.polls >= 3 and pings >= 3, "polls and pings", proc)
            # Back 200 s (NTP fixing a fast clock), then forward 400 s: both within the
            # platform's 300 s signature window, so only our own timing is under test.
            for offset in ("-200", "+200"):
                step_wall_clock(control, offset)
                polls_before, pings_before = sandbox.polls, pings

                def kept_on(polls: int = polls_before, seen: int = pings_before) -> bool:
                    return sandbox.polls >= polls + 5 and pings >= seen + 5

                await wait_until(kept_on, f"polls and pings after a step to {offset} s", proc)
                order = sandbox.add_order("GAME-100")

                def delivered(order: str = order) -> bool:
                    return sandbox.orders[order].delivery is not None

                await wait_until(delivered, f"a delivery after a step to {offset} s", proc)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), SAFETY_TIMEOUT) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        receiver.cancel()
        listener.close()
        await sandbox.stop()
    assert_platform_invariants(sandbox)


async def test_a_wait_in_the_ledger_is_not_lengthened_by_a_wall_clock_step_back(
    tmp_path: Path,
) -> None:
    """A delivery due in 3 s (a SKU's delay, kept in the ledger as a wall-clock time) when
    the wall clock steps back 200 s: it goes out about when it was due, not 200 s later."""
    sandbox = await started_sandbox()
    config = write_config(tmp_path, sandbox.base_url)
    with config.open("a", encoding="utf-8") as toml:
        toml.write('\n[skus."SLOW-1"]\ndelay = 3\n')
    control = tmp_path / "faketime.offset"
    step_wall_clock(control, "+0")
    env = agent_env(config, SECRETS) | {
        "LD_PRELOAD": libfaketime(),
        "FAKETIME_TIMESTAMP_FILE": str(control),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    try:
        await import_stock(config, SECRETS, tmp_path, "SLOW-1", ["S-1", "S-2"])
        with (tmp_path / "daemon.log").open("ab") as sink:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent", "run", env=env, stdout=sink, stderr=sink
            )
        try:
            await wait_until(lambda: sandbox.polls >= 3, "the first polls", proc)
            order = sandbox.add_order("SLOW-1")
            taken_in_by = sandbox.polls + 3  # listed by the next poll, committed before these
            await wait_until(lambda: sandbox.polls >= taken_in_by, "the order taken in", proc)
            assert sandbox.orders[order].delivery is None  # still waiting out its delay
            step_wall_clock(control, "-200")
            await wait_until(
                lambda: sandbox.orders[order].delivery is not None,
                "the delayed delivery after the clock stepped back",
                proc,
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
