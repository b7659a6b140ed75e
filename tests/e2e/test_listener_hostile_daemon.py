"""The real daemon, delivering a platform's orders (the sandbox, polled), while its listener
is attacked: unauthenticated floods, oversized and compressed bodies, malformed callbacks,
slow clients holding connections, more connections than it takes. Every order is still
delivered, Eneba's calls are still answered, and the log holds no token."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from pathlib import Path

import aiohttp

from agent.sandbox.platform import SandboxPlatform
from tests.daemon import import_stock, start_daemon
from tests.e2e.test_responder_daemon import (
    AUCTION,
    AUTH_ID,
    AUTH_SECRET,
    TOKEN,
    free_port,
    listening,
)
from tests.fakes.eneba import FakeEneba
from tests.helpers import SAFETY_TIMEOUT

PLATFORM_SECRET = "hostile-daemon-platform-secret"
SECRETS = {
    "KAMI_SECRET_PLATFORM_MAIN_SECRET": PLATFORM_SECRET,
    "KAMI_SECRET_ENEBA_SECRET": AUTH_SECRET,
    "KAMI_SECRET_ENEBA_CALLBACK": TOKEN,
}


def write_config(tmp_path: Path, port: int, sandbox: SandboxPlatform, eneba: FakeEneba) -> Path:
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

[listener]
port = {port}
max_body_bytes = 8192
header_timeout = 1.0
body_timeout = 1.0
max_connections = 200

[platforms.main]
base_url = "{sandbox.base_url}"
api_key = "hostile"
secret = "platform.main.secret"
timeout = 2.0

[platforms.eneba]
kind = "eneba"
base_url = "{eneba.base_url}/graphql"
token_url = "{eneba.base_url}/oauth/token"
api_key = "{AUTH_ID}"
secret = "eneba.secret"
callback_token = "eneba.callback"

[platforms.eneba.auctions]
"{AUCTION}" = "VIP-30D"

[skus."GAME-100"]
max_quantity = 5
[skus."VIP-30D"]
""",
        encoding="utf-8",
    )
    return path


async def attack(port: int, stop: asyncio.Event, tally: dict[str, int]) -> None:
    base = f"http://127.0.0.1:{port}"
    rng = random.Random(3)
    connector = aiohttp.TCPConnector(limit=40)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one() -> None:
            kind = rng.choice(["token", "path", "big", "gzip", "garbage"])
            headers = {"Authorization": f"Bearer {rng.getrandbits(64):x}"}
            url, data = f"{base}/eneba/eneba", b'{"action":"PROVIDE","orderId":"x"}'
            if kind == "path":
                target = rng.choice(["admin", ".env", "eneba/eneba/../x", "api/v1/upstream/ping"])
                url = f"{base}/{target}"
            elif kind == "big":
                headers["Authorization"] = f"Bearer {TOKEN}"
                data = b"x" * 100_000
            elif kind == "gzip":
                headers["Content-Encoding"] = "gzip"
            elif kind == "garbage":
                headers["Authorization"] = f"Bearer {TOKEN}"
                data = bytes(rng.getrandbits(8) for _ in range(200))
            try:
                async with http.post(url, data=data, headers=headers) as resp:
                    tally[str(resp.status)] = tally.get(str(resp.status), 0) + 1
            except aiohttp.ClientError:
                tally["cut"] = tally.get("cut", 0) + 1

        while not stop.is_set():
            await asyncio.gather(*(one() for _ in range(40)))

    async def slowloris() -> None:
        while not stop.is_set():
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /eneba/eneba HTTP/1.1\r\nHost: x\r\n")
                for _ in range(20):
                    await asyncio.sleep(0.2)
                    writer.write(b"X")
                writer.close()
            except OSError:
                await asyncio.sleep(0.1)

    await asyncio.gather(*(slowloris() for _ in range(60)))


async def test_the_daemon_keeps_delivering_while_its_listener_is_attacked(tmp_path: Path) -> None:
    sandbox = SandboxPlatform(api_key="hostile", secret=PLATFORM_SECRET, seed=17)
    sandbox.long_poll_offered = False
    await sandbox.start()
    eneba = FakeEneba(TOKEN, AUTH_ID, AUTH_SECRET, gap=0.5, timeout=10.0)
    await eneba.start()
    port = free_port()
    eneba.callback_url = f"http://127.0.0.1:{port}/eneba/eneba"
    config = write_config(tmp_path, port, sandbox, eneba)
    log = tmp_path / "daemon.log"
    await import_stock(config, SECRETS, tmp_path, "GAME-100", [f"GM-{i:04d}" for i in range(300)])
    await import_stock(config, SECRETS, tmp_path, "VIP-30D", [f"VP-{i:04d}" for i in range(20)])
    proc = await start_daemon(config, SECRETS, log)
    stop = asyncio.Event()
    tally: dict[str, int] = {}
    try:
        await listening(port, time.monotonic() + 30)
        attacker = asyncio.create_task(attack(port, stop, tally))
        ids = []
        for _ in range(60):
            ids.append(sandbox.add_order("GAME-100", quantity=1 + len(ids) % 3))
            await asyncio.sleep(0.03)
        provided = []
        for n in range(5):
            assert await eneba.reserve(f"h-{n}", [(AUCTION, 1)])
            provided.append(await eneba.provide(f"h-{n}"))
        deadline = time.monotonic() + SAFETY_TIMEOUT
        while not all(sandbox.orders[i].delivery is not None for i in ids):
            assert proc.returncode is None, f"the daemon died, see {log}"
            assert time.monotonic() < deadline, "orders not delivered under attack"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(attacker, 30)
        assert all(keys is not None for keys in provided)
        assert sum(tally.values()) > 200 and set(tally) <= {
            "401",
            "404",
            "413",
            "415",
            "400",
            "cut",
        }
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        await eneba.stop()
        await sandbox.stop()
    assert code == 0
    text = log.read_text(encoding="utf-8")
    assert TOKEN not in text
    refused = [json.loads(x) for x in text.splitlines() if '"listener_refused"' in x]
    assert refused and len(refused) < 100
    print("\nhostile requests answered:", tally)
