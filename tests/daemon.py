"""Running the real daemon (and its CLI) as subprocesses, for the end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from agent.sandbox.supplier import SandboxSupplier
from tests.conftest import STORE_KEY_ENV, TEST_STORE_KEY
from tests.helpers import SAFETY_TIMEOUT


def agent_env(
    config: Path, secrets: Mapping[str, str], crash_at: str | None = None
) -> dict[str, str]:
    """The environment of an agent: its config, its secrets (by env var), a crash point."""
    env = dict(os.environ)
    env["KAMI_AGENT_CONFIG"] = str(config)
    env.update(secrets)
    env[STORE_KEY_ENV] = TEST_STORE_KEY
    env.pop("KAMI_CRASH_AT", None)
    if crash_at:
        env["KAMI_CRASH_AT"] = crash_at
    return env


# Configs whose ledger `ensure_ledger` has made (or found) in this test session.
_INITIALISED: set[Path] = set()


async def ensure_ledger(config: Path, secrets: Mapping[str, str]) -> None:
    """Makes the config's ledger the way a merchant does, with `kami-agent init`, once per
    config: nothing else creates a ledger. A ledger already made (agents sharing a
    PostgreSQL ledger each have a config) is left as it is."""
    if config in _INITIALISED:
        return
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "init",
        env=agent_env(config, secrets),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0 or b"already" in out, out.decode()
    _INITIALISED.add(config)


async def run_cli(config: Path, secrets: Mapping[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        *args,
        env=agent_env(config, secrets),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def start_daemon(
    config: Path,
    secrets: Mapping[str, str],
    log: Path,
    crash_at: str | None = None,
    *,
    init: bool = True,
) -> asyncio.subprocess.Process:
    """The daemon, on the config's ledger (made first with `init`, unless init=False)."""
    if init:
        await ensure_ledger(config, secrets)
    with log.open("ab") as sink:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent",
            "run",
            env=agent_env(config, secrets, crash_at),
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
        )


async def kill_after(proc: asyncio.subprocess.Process, seconds: float) -> tuple[int, bool]:
    """Waits for the process to die at its crash point, or SIGKILLs it after `seconds`.

    Returns the exit code and whether it died by itself (the crash point fired)."""
    try:
        return await asyncio.wait_for(proc.wait(), seconds), True
    except TimeoutError:
        proc.send_signal(signal.SIGKILL)
        return await proc.wait(), False


async def import_stock(
    config: Path, secrets: Mapping[str, str], folder: Path, sku: str, values: list[str]
) -> set[str]:
    """Writes the keys to a stock file and imports it with the real CLI; returns the keys."""
    await ensure_ledger(config, secrets)
    stock_file = folder / f"{sku}.txt"
    stock_file.write_text("\n".join(values) + "\n", encoding="utf-8")
    out = await run_cli(config, secrets, "stock", "import", sku, str(stock_file))
    assert f"added {len(values)}" in out
    return set(values)


def faulty_upstream(api_key: str, secret: str, seed: int, sku: str) -> SandboxSupplier:
    """The supplier of the end-to-end tests: it sells `sku`, loses 10% of its answers after
    charging, fails 5% with a 5xx and leaves 20% processing for a moment."""
    upstream = SandboxSupplier(name="up", api_key=api_key, secret=secret, seed=seed)
    upstream.add_product(sku, price="3.00")
    upstream.faults.drop_after_commit_rate = 0.1
    upstream.faults.error_rate = 0.05
    upstream.faults.processing_rate = 0.2
    upstream.faults.processing_seconds = 0.2
    return upstream


async def wait_until(
    condition: Callable[[], bool], what: str, proc: asyncio.subprocess.Process
) -> None:
    """Waits for condition() while the daemon process runs: fails at once if it died, or
    after SAFETY_TIMEOUT (a hang guard, not a performance assertion)."""
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while not condition():
        assert proc.returncode is None, f"the daemon died while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
