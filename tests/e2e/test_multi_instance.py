"""Three agents, one PostgreSQL ledger, one platform: 5,000 orders while one agent is
SIGKILLed mid-run. Every order must get exactly its quantity of keys, no key may go twice,
no need may be bought twice, and the killed agent's lines must be taken over."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.sandbox.platform import SandboxPlatform
from agent.store.postgres import PostgresStore
from tests.conftest import TEST_STORE_KEY, master_key_for_tests
from tests.daemon import faulty_upstream, import_stock, start_daemon
from tests.helpers import assert_exactly_once

asyncpg = pytest.importorskip("asyncpg")

ORDERS = 5000
AGENTS = ("agent-a", "agent-b", "agent-c")
VICTIM = "agent-b"
SKUS = ("GAME-100", "VIP-30D")
STOCK_PER_SKU = 6500
BOUGHT_SKU = "SUP-1"  # no local stock: bought upstream by whichever agent holds the line
LEASE_SECONDS = 3
SECRET = "multi-platform-secret"
SUPPLIER_SECRET = "multi-supplier-secret"
SECRETS = {
    "KAMI_SECRET_PLATFORM_MAIN_SECRET": SECRET,
    "KAMI_SECRET_SUPPLIER_UP_SECRET": SUPPLIER_SECRET,
}
SAFETY_TIMEOUT = 240.0  # hang guard only


def write_config(tmp_path: Path, name: str, url: str, base_url: str, supplier_url: str) -> Path:
    path = tmp_path / f"{name}.toml"
    skus = "\n".join(f'[skus."{sku}"]\nmax_quantity = 5\n' for sku in SKUS)
    path.write_text(
        f"""
[agent]
poll_interval = 0.2
sweep_interval = 0.2
reconcile_interval = 5.0
concurrency = 8
retry_base = 0.05
retry_cap = 0.5

[store]
url = "{url}"
instance = "{name}"
lease_seconds = {LEASE_SECONDS}

[platforms.main]
base_url = "{base_url}"
api_key = "multi"
secret = "platform.main.secret"
timeout = 2.0

{skus}
[skus."{BOUGHT_SKU}"]
max_quantity = 5
sources = ["up"]

[suppliers.up]
base_url = "{supplier_url}"
api_key = "multi-supplier"
secret = "supplier.up.secret"
timeout = 1.0
query_grace = 0.3
processing_poll = 0.1
""",
        encoding="utf-8",
    )
    return path


async def ledger_states(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT state, COUNT(*) FROM orders GROUP BY state")
    finally:
        await conn.close()
    return {r[0]: r[1] for r in rows}


@pytest.mark.slow
async def test_three_agents_one_killed_deliver_every_order_once(
    tmp_path: Path, pg_url: str
) -> None:
    rng = random.Random(7)
    sandbox = SandboxPlatform(api_key="multi", secret=SECRET, seed=7)
    sandbox.faults.error_rate = 0.03
    sandbox.faults.drop_after_commit_rate = 0.03
    sandbox.faults.duplicate_rate = 0.05
    await sandbox.start()
    upstream = faulty_upstream("multi-supplier", SUPPLIER_SECRET, 7, BOUGHT_SKU)
    await upstream.start()
    configs = {
        name: write_config(tmp_path, name, pg_url, sandbox.base_url, upstream.base_url)
        for name in AGENTS
    }
    logs = {name: tmp_path / f"{name}.log" for name in AGENTS}
    procs: dict[str, asyncio.subprocess.Process] = {}
    try:
        imported: dict[str, set[str]] = {}
        for sku in SKUS:
            values = [f"{sku}-{i:05d}-{rng.getrandbits(48):012x}" for i in range(STOCK_PER_SKU)]
            imported[sku] = await import_stock(configs[AGENTS[0]], SECRETS, tmp_path, sku, values)

        for name in AGENTS:  # all three start at once: they race to migrate and to poll
            # The victim SIGKILLs itself mid-delivery: keys bound and the intent committed,
            # nothing sent yet, its lease live, more lines waiting in its queue.
            crash_at = "after_intent:400" if name == VICTIM else None
            procs[name] = await start_daemon(configs[name], SECRETS, logs[name], crash_at)
        deadline = time.monotonic() + SAFETY_TIMEOUT
        killed_at = None
        while len(sandbox.orders) < ORDERS or killed_at is None:
            for _ in range(min(250, ORDERS - len(sandbox.orders))):
                sku = BOUGHT_SKU if rng.random() < 0.1 else rng.choice(SKUS)
                sandbox.add_order(sku, quantity=rng.randint(1, 3))
            await asyncio.sleep(0.1)
            if killed_at is None and procs[VICTIM].returncode is not None:
                assert procs[VICTIM].returncode == -signal.SIGKILL, f"see {logs[VICTIM]}"
                killed_at = len(sandbox.delivered_secrets())
            elif killed_at is None and len(sandbox.delivered_secrets()) >= ORDERS // 2:
                procs[VICTIM].send_signal(signal.SIGKILL)  # it had too little work to crash
                assert await procs[VICTIM].wait() == -signal.SIGKILL
                killed_at = len(sandbox.delivered_secrets())
            assert time.monotonic() < deadline, "orders were not taken in time"
        survivors = [name for name in AGENTS if name != VICTIM]
        while not (
            len(sandbox.delivered_secrets()) == ORDERS
            and await ledger_states(pg_url) == {"delivered": ORDERS}
        ):
            for name in survivors:
                assert procs[name].returncode is None, f"{name} died, see {logs[name]}"
            assert time.monotonic() < deadline, (
                f"not all delivered in time: {await ledger_states(pg_url)}"
            )
            await asyncio.sleep(0.2)
        for name in survivors:
            procs[name].send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(procs[name].wait(), 30) == 0, f"see {logs[name]}"
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await sandbox.stop()
        await upstream.stop()

    usage = assert_exactly_once(sandbox, upstream, imported, BOUGHT_SKU, ORDERS)
    delivered = sandbox.delivered_secrets()
    # 5. The ledger agrees with the platform, and every agent did part of the work.
    store = PostgresStore(pg_url, master_key_for_tests(), instance="checker")
    await store.open()
    try:
        assert await store.integrity_check() == "ok"
        conn = await asyncpg.connect(pg_url)
        try:
            lines = await conn.fetch("SELECT order_id, id FROM orders")
            workers = Counter(r[0] for r in await conn.fetch("SELECT claimed_by FROM orders"))
            # lines the victim took in or began to deliver, and another agent finished
            takeovers = await conn.fetchval(
                "SELECT COUNT(DISTINCT o.id) FROM orders o JOIN events e ON e.order_line_id ="
                " o.id WHERE e.kind IN ('intake', 'delivery_intent') AND e.detail LIKE $1"
                " AND o.claimed_by != $2",
                f"% by {VICTIM}",
                VICTIM,
            )
        finally:
            await conn.close()
        ledger = {r[0]: {i.secret for i in await store.bound_items(r[1])} for r in lines}
    finally:
        await store.close()
    print(f"killed after {killed_at} orders; taken over: {takeovers}; last worker: {workers}")
    assert ledger == {oid: set(s) for oid, s in delivered.items()}
    assert set(workers) == set(AGENTS), workers
    assert takeovers > 0
    assert killed_at is not None and killed_at < ORDERS
    # 6. No card key or secret in clear in any agent's log.
    for name in AGENTS:
        text = logs[name].read_text(encoding="utf-8", errors="replace")
        assert not [s for s in usage if s in text], name
        assert SECRET not in text and TEST_STORE_KEY not in text
