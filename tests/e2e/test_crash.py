"""Crash test: the real daemon as a subprocess, SIGKILLed at random moments and at named
crash points, restarted, until 2,000 orders are through. Then the invariants, checked from
the platform's side and from the ledger's."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.sandbox.platform import SandboxPlatform
from agent.store.sqlite import SQLiteStore
from tests.conftest import TEST_STORE_KEY, master_key_for_tests
from tests.daemon import faulty_upstream, import_stock, kill_after, start_daemon
from tests.helpers import assert_exactly_once, ledger_bytes

ORDERS = 2000
CYCLES = 18
STOCK_PER_SKU = 3200
SKUS = ("GAME-100", "VIP-30D")
BOUGHT_SKU = "SUP-1"  # no local stock: every order of it is bought upstream
CRASH_POINTS = (
    "after_ingest",
    "after_allocate",
    "after_intent",
    "after_deliver_call",
    "after_purchase_intent",
    "after_purchase_call",
)
SECRET = "crash-test-platform-secret"
SUPPLIER_SECRET = "crash-test-supplier-secret"
SAFETY_TIMEOUT = 180.0  # hang guard only


def write_config(tmp_path: Path, base_url: str, supplier_url: str) -> Path:
    path = tmp_path / "config.toml"
    skus = "\n".join(f'[skus."{sku}"]\nmax_quantity = 5\n' for sku in SKUS)
    skus += f'\n[skus."{BOUGHT_SKU}"]\nmax_quantity = 5\nsources = ["up"]\n'
    skus += f"""
[suppliers.up]
base_url = "{supplier_url}"
api_key = "crash-supplier"
secret = "supplier.up.secret"
timeout = 1.0
query_grace = 0.3
processing_poll = 0.1
"""
    path.write_text(
        f"""
[agent]
poll_interval = 0.1
sweep_interval = 0.1
reconcile_interval = 2.0
concurrency = 8
retry_base = 0.05
retry_cap = 0.5

[store]
path = "kami.db"

[platforms.main]
base_url = "{base_url}"
api_key = "crash"
secret = "platform.main.secret"
timeout = 2.0

{skus}
""",
        encoding="utf-8",
    )
    return path


SECRETS = {
    "KAMI_SECRET_PLATFORM_MAIN_SECRET": SECRET,
    "KAMI_SECRET_SUPPLIER_UP_SECRET": SUPPLIER_SECRET,
}


def ledger_settled(db: Path) -> bool:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        states = dict(conn.execute("SELECT state, COUNT(*) FROM orders GROUP BY state"))
    return states == {"delivered": ORDERS}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_crash_recovery_keeps_every_invariant(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    sandbox = SandboxPlatform(api_key="crash", secret=SECRET, seed=seed)
    sandbox.faults.error_rate = 0.05
    sandbox.faults.drop_after_commit_rate = 0.05
    sandbox.faults.duplicate_rate = 0.05
    await sandbox.start()
    upstream = faulty_upstream("crash-supplier", SUPPLIER_SECRET, seed, BOUGHT_SKU)
    await upstream.start()
    config = write_config(tmp_path, sandbox.base_url, upstream.base_url)
    log = tmp_path / "daemon.log"
    db = tmp_path / "kami.db"
    try:
        imported: dict[str, set[str]] = {}
        for sku in SKUS:
            values = [
                f"{sku}-{seed}-{i:05d}-{rng.getrandbits(48):012x}" for i in range(STOCK_PER_SKU)
            ]
            imported[sku] = await import_stock(config, SECRETS, tmp_path, sku, values)

        per_cycle = -(-ORDERS // (CYCLES - 2))
        kills = Counter[str]()
        for cycle in range(CYCLES):
            for _ in range(min(per_cycle, ORDERS - len(sandbox.orders))):
                sku = BOUGHT_SKU if rng.random() < 0.2 else rng.choice(SKUS)
                sandbox.add_order(sku, quantity=rng.randint(1, 3))
            if cycle % 2 == 0:
                point = CRASH_POINTS[(cycle // 2) % len(CRASH_POINTS)]
                # intake happens about once per cycle, purchases for a fifth of the orders
                hits = {
                    "after_ingest": rng.randint(1, 2),
                    "after_purchase_intent": rng.randint(1, 8),
                    "after_purchase_call": rng.randint(1, 6),
                }.get(point, rng.randint(1, 40))
                crash_at = f"{point}:{hits}"
                budget = 4.0
            else:
                crash_at, budget = None, rng.uniform(0.3, 1.5)
            proc = await start_daemon(config, SECRETS, log, crash_at)
            code, by_itself = await kill_after(proc, budget)
            assert code == -signal.SIGKILL, f"daemon exited with {code}, see {log}"
            if by_itself:
                kills[crash_at.split(":")[0] if crash_at else "?"] += 1
            else:
                kills["random"] += 1

        starts_before = log.read_text(encoding="utf-8").count('"event": "started"')
        proc = await start_daemon(config, SECRETS, log)
        deadline = time.monotonic() + SAFETY_TIMEOUT
        while log.read_text(encoding="utf-8").count('"event": "started"') == starts_before:
            assert proc.returncode is None and time.monotonic() < deadline, f"see {log}"
            await asyncio.sleep(0.05)
        while not (len(sandbox.delivered_secrets()) == ORDERS and ledger_settled(db)):
            assert proc.returncode is None, f"daemon died, see {log}"
            assert time.monotonic() < deadline, "orders not all delivered in time"
            await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "graceful stop failed"
    finally:
        await sandbox.stop()
        await upstream.stop()

    usage = assert_exactly_once(sandbox, upstream, imported, BOUGHT_SKU, ORDERS)
    delivered = sandbox.delivered_secrets()
    bought = {item["secret"] for p in upstream.charged for item in p.items}
    all_stock = set().union(*imported.values(), bought)
    # 4. The ledger: intact, every key accounted for, bound keys match what was delivered.
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        states = dict(conn.execute("SELECT state, COUNT(*) FROM card_keys GROUP BY state"))
        assert sum(states.values()) == len(all_stock)
        assert states.get("bound", 0) == sum(usage.values())
        lines = conn.execute("SELECT order_id, id FROM orders").fetchall()
    store = SQLiteStore(db, master_key_for_tests())
    await store.open()
    ledger = {
        order_id: {i.secret for i in await store.bound_items(line_id)}
        for order_id, line_id in lines
    }
    await store.close()
    assert ledger == {oid: set(s) for oid, s in delivered.items()}
    # 5. No card key or secret in clear in the daemon's logs or in the ledger file.
    text = log.read_text(encoding="utf-8", errors="replace")
    assert not [s for s in usage if s in text]
    assert SECRET not in text and TEST_STORE_KEY not in text
    raw = ledger_bytes(tmp_path)
    assert not [s for s in usage if s.encode() in raw]
    # The crash points really fired (each at least once), besides the random kills.
    assert set(kills) >= set(CRASH_POINTS), kills
