"""The real daemon against a platform listing poison orders among good ones: it keeps running,
delivers every good order (those listed after the poison too, and those that come later),
parks what it can park, and says so once, without a traceback."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from pathlib import Path

from agent.sandbox.platform import SandboxPlatform
from tests.daemon import import_stock, start_daemon, wait_until
from tests.helpers import SAFETY_TIMEOUT, assert_platform_invariants

SECRET = "poison-daemon-platform-secret"
SECRETS = {"KAMI_SECRET_PLATFORM_MAIN_SECRET": SECRET}
DEEP = 100_000


def write_config(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[agent]
poll_interval = 0.2
sweep_interval = 0.2
reconcile_interval = 1.0
concurrency = 4
retry_base = 0.05
retry_cap = 0.5

[store]
path = "kami.db"

[platforms.main]
base_url = "{base_url}"
api_key = "poison"
secret = "platform.main.secret"
timeout = 2.0

[skus."GAME-100"]
max_quantity = 5
""",
        encoding="utf-8",
    )
    return path


def _raw_order(order_id: str, field: str, text: str) -> str:
    fields = {"id": json.dumps(order_id), "status": '"paid"', "sku": '"GAME-100"', "quantity": "1"}
    fields[field] = text
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"


async def test_the_daemon_delivers_past_poison_orders(tmp_path: Path) -> None:
    sandbox = SandboxPlatform(api_key="poison", secret=SECRET, seed=7)
    await sandbox.start()
    config = write_config(tmp_path, sandbox.base_url)
    log = tmp_path / "daemon.log"
    try:
        await import_stock(
            config, SECRETS, tmp_path, "GAME-100", [f"GAME-100-p-{i:05d}" for i in range(40)]
        )
        good = [sandbox.add_order("GAME-100") for _ in range(3)]
        sandbox.add_order("GAME-100\udfff", order_id="P-SKU")
        sandbox.add_order("GAME-100", order_id="P-\ud800")  # its id cannot even be stored
        sandbox.add_order("GAME-100", order_id="P-NUL", buyer={"contact": "x\x00@example.test"})
        sandbox.add_raw_json_order("P-BIG", _raw_order("P-BIG", "quantity", "9" * 5000))
        deep = "[" * DEEP + "]" * DEEP
        sandbox.add_raw_json_order("P-DEEP", _raw_order("P-DEEP", "sku", deep))
        good += [sandbox.add_order("GAME-100") for _ in range(3)]
        proc = await start_daemon(config, SECRETS, log)
        try:
            delivered = sandbox.delivered_secrets
            await wait_until(lambda: set(delivered()) == set(good), "the good orders", proc)
            good += [sandbox.add_order("GAME-100") for _ in range(3)]  # later polls go on
            await wait_until(lambda: set(delivered()) == set(good), "the later orders", proc)
            polls = sandbox.polls
            await wait_until(lambda: sandbox.polls > polls + 5, "more polls", proc)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), SAFETY_TIMEOUT) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        await sandbox.stop()
    assert_platform_invariants(sandbox)
    with sqlite3.connect(tmp_path / "kami.db") as conn:
        states = dict(conn.execute("SELECT order_id, state FROM orders").fetchall())
    parked = {"P-SKU", "P-NUL", "P-BIG", "P-DEEP"}
    assert states == {
        **dict.fromkeys(good, "delivered"),
        **dict.fromkeys(parked, "needs_attention"),
    }
    events = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert not [e for e in events if e.get("level") in ("error", "critical") or "exception" in e]
    rejected = [e["order_id"] for e in events if e["event"] == "order_rejected"]
    assert sorted(rejected) == sorted(parked)  # once each, though re-listed at every reconcile
    assert len([e for e in events if e["event"] == "orders_without_id"]) == 1
