"""The daemon under a fake systemd: sd_notify READY, WATCHDOG, STATUS and STOPPING."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

from agent.sandbox.platform import SandboxPlatform
from tests.conftest import STORE_KEY_ENV, TEST_STORE_KEY


async def test_notify_protocol(tmp_path: Path, sandbox: SandboxPlatform) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[agent]
poll_interval = 0.1
[store]
path = "kami.db"
[platforms.main]
base_url = "{sandbox.base_url}"
api_key = "test-key"
secret = "platform.main.secret"
""",
        encoding="utf-8",
    )
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.setblocking(False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAMI_")}
    env |= {
        "NOTIFY_SOCKET": address,
        "WATCHDOG_USEC": "400000",  # ping every 0.2 s
        "KAMI_SECRET_PLATFORM_MAIN_SECRET": sandbox.secret,
        STORE_KEY_ENV: TEST_STORE_KEY,
    }
    init = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "--config", str(config), "init", env=env
    )
    assert await init.wait() == 0
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "--config",
        str(config),
        "run",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    messages: list[str] = []
    loop = asyncio.get_running_loop()

    async def receive_until(marker: str) -> None:
        while not any(marker in m for m in messages):
            data = await asyncio.wait_for(loop.sock_recv(listener, 4096), 30)
            messages.append(data.decode())

    try:
        await receive_until("READY=1")
        await receive_until("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        await receive_until("STOPPING=1")
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        listener.close()
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=" in ready
    assert messages.index(ready) < len(messages) - 1
