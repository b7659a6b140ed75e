"""`kami-agent demo`: the whole agent against the embedded sandbox platform, no config needed.

A temp SQLite ledger, sample stock, a steady stream of orders with a flash-sale burst in the
middle, injected platform faults, live progress and a summary that checks the invariants.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TextIO

from agent import logs
from agent.config import (
    AgentSettings,
    Config,
    LogSettings,
    PlatformSettings,
    SkuSettings,
    StoreSettings,
    SupplierSettings,
)
from agent.domain import CardItem, LineState
from agent.platforms.http import HttpPlatform
from agent.runtime import run_engine
from agent.sandbox.platform import Faults, SandboxPlatform
from agent.sandbox.supplier import SandboxSupplier, SupplierFaults
from agent.stats import percentile
from agent.store.sqlite import SQLiteStore
from agent.suppliers.http import HttpSupplier

DEMO_SKUS = {"GAME-100": 1500, "VIP-30D": 800, "KEY-PRO": 400, "GIFT-50": 40}
# GIFT-50's small local stock runs out during the demo; the upstream supplier takes over.
BOUGHT_SKU = "GIFT-50"


@dataclass(frozen=True)
class DemoPlan:
    steady_orders: int = 150
    steady_rate: float = 30.0  # orders per second
    burst: int = 500
    timeout: float = 90.0


def _sample_keys(sku: str, count: int) -> list[CardItem]:
    return [
        CardItem(code=f"{sku}-{index:06d}", secret=secrets.token_urlsafe(12))
        for index in range(count)
    ]


def demo_config(workdir: Path, base_url: str, supplier_url: str) -> Config:
    skus = {sku: SkuSettings(sku=sku, max_quantity=5) for sku in DEMO_SKUS}
    skus[BOUGHT_SKU] = SkuSettings(
        sku=BOUGHT_SKU, max_quantity=5, sources=("local", "upstream"), max_price=Decimal("45.00")
    )
    return Config(
        source=workdir / "demo.toml",
        agent=AgentSettings(
            poll_interval=0.2,
            sweep_interval=0.5,
            reconcile_interval=30,
            concurrency=16,
            retry_base=0.2,
            retry_cap=2.0,
        ),
        store=StoreSettings(path=workdir / "kami.db"),
        log=LogSettings(level="info"),
        platforms=(
            PlatformSettings(
                name="sandbox",
                kind="http",
                base_url=base_url,
                api_key="demo",
                secret_name="sandbox.secret",
                timeout=5.0,
            ),
        ),
        skus=skus,
        suppliers=(
            SupplierSettings(
                name="upstream",
                kind="http",
                base_url=supplier_url,
                api_key="demo-supplier",
                secret_name="upstream.secret",
                timeout=2.0,
                query_grace=0.5,
                processing_poll=0.2,
            ),
        ),
    )


async def _feed_orders(sandbox: SandboxPlatform, plan: DemoPlan, out: TextIO) -> list[str]:
    """Steady stream, then the burst, then the stream again; returns the burst's order ids."""
    skus = list(DEMO_SKUS)
    half = plan.steady_orders // 2
    for index in range(half):
        sandbox.add_order(skus[index % len(skus)], quantity=1 + (index % 7 == 0))
        await asyncio.sleep(1 / plan.steady_rate)
    print(f"{chr(10) if out.isatty() else ''}  flash sale: {plan.burst} orders at once", file=out)
    burst = [sandbox.add_order(skus[i % len(skus)], quantity=1) for i in range(plan.burst)]
    # Hostile input the agent must park, not choke on.
    sandbox.add_order("NO-SUCH-SKU", quantity=1)
    sandbox.add_order("GAME-100", quantity=0)
    for index in range(plan.steady_orders - half):
        sandbox.add_order(skus[index % len(skus)], quantity=1 + (index % 5 == 0))
        await asyncio.sleep(1 / plan.steady_rate)
    return burst


async def run_demo(plan: DemoPlan = DemoPlan(), out: TextIO = sys.stdout) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="kami-demo-"))
    log_path = workdir / "kami-agent.log"
    log_file = log_path.open("w", encoding="utf-8")
    logs.configure("info", log_file)
    sandbox = SandboxPlatform(api_key="demo", seed=7)
    sandbox.faults = Faults(
        error_rate=0.03, drop_after_commit_rate=0.02, duplicate_rate=0.05, latency=0.005
    )
    base_url = await sandbox.start()
    upstream = SandboxSupplier(name="upstream", api_key="demo-supplier", seed=11)
    upstream.add_product(BOUGHT_SKU, price="42.50")
    upstream.faults = SupplierFaults(
        drop_after_commit_rate=0.05, processing_rate=0.2, processing_seconds=0.5
    )
    supplier_url = await upstream.start()
    config = demo_config(workdir, base_url, supplier_url)
    store = SQLiteStore(config.store.path)
    await store.open()
    print(f"kami-agent demo — sandbox platform at {base_url}, ledger {config.store.path}", file=out)
    for sku, count in DEMO_SKUS.items():
        report = await store.import_keys(sku, _sample_keys(sku, count), "demo", time.time())
        print(f"  stock {sku}: {report.added} keys", file=out)
    print(
        f"  supplier upstream at {supplier_url} sells {BOUGHT_SKU} when local stock is out",
        file=out,
    )
    platform = HttpPlatform(config.platforms[0], sandbox.secret)
    supplier = HttpSupplier(config.suppliers[0], upstream.secret)
    stop = asyncio.Event()
    engine_task = asyncio.create_task(
        run_engine(config, store, {"sandbox": platform}, stop, {"upstream": supplier})
    )
    feeder = asyncio.create_task(_feed_orders(sandbox, plan, out))
    started = time.time()
    live = out.isatty()
    shown = ""
    try:
        while time.time() - started < plan.timeout:
            await asyncio.sleep(0.25)
            counts = await store.count_by_state()
            delivered = counts.get(LineState.DELIVERED, 0)
            progress = (
                f"  orders {len(sandbox.orders):4d}  delivered {delivered:4d}  "
                f"needs attention {counts.get(LineState.NEEDS_ATTENTION, 0)}"
            )
            if live:  # one line, redrawn in place
                out.write(f"\r{progress}  ")
                out.flush()
            elif progress != shown:
                print(progress, file=out)
            shown = progress
            pending = sum(n for s, n in counts.items() if not s.terminal)
            if feeder.done() and pending == 0 and sum(counts.values()) >= len(sandbox.orders):
                break
        burst = await feeder
    finally:
        stop.set()
        await engine_task
        await platform.close()
        await supplier.close()
        await upstream.stop()
    return await _summary(sandbox, upstream, store, burst, workdir, log_path, out, log_file)


async def _summary(
    sandbox: SandboxPlatform,
    upstream: SandboxSupplier,
    store: SQLiteStore,
    burst: list[str],
    workdir: Path,
    log_path: Path,
    out: TextIO,
    log_file: TextIO,
) -> int:
    delivered = sandbox.delivered_secrets()
    all_keys = [secret for keys in delivered.values() for secret in keys]
    reused = [k for k, n in Counter(all_keys).items() if n > 1]
    wrong_count = [
        oid
        for oid, keys in delivered.items()
        if len(set(keys)) != sandbox.orders[oid].data["quantity"]
    ]
    burst_missing = [oid for oid in burst if oid not in delivered]
    latencies = sandbox.latencies()
    parked = await store.list_lines(LineState.NEEDS_ATTENTION, 20)
    integrity = await store.integrity_check()
    await store.close()
    await sandbox.stop()
    log_file.close()
    print("\n\nsummary", file=out)
    print(f"  orders on platform      {len(sandbox.orders)}", file=out)
    print(f"  delivered               {len(delivered)}  ({len(all_keys)} keys)", file=out)
    print(f"  burst delivered         {len(burst) - len(burst_missing)}/{len(burst)}", file=out)
    print(
        f"  latency p50 / p99       {percentile(latencies, 0.5) * 1000:.0f} ms / "
        f"{percentile(latencies, 0.99) * 1000:.0f} ms  (order visible -> delivery acked)",
        file=out,
    )
    print(
        f"  delivery calls          {len(sandbox.delivery_calls)} "
        f"(faults injected: 5xx, lost responses, duplicate listings)",
        file=out,
    )
    bought_orders = sum(1 for o in sandbox.orders.values() if o.data.get("sku") == BOUGHT_SKU)
    bought_keys = sum(p.quantity for p in upstream.charged)
    if upstream.charged:
        fallback = (
            f"{BOUGHT_SKU}: {DEMO_SKUS[BOUGHT_SKU]} local keys ran out; "
            f"{len(upstream.charged)} purchases ({bought_keys} keys) for {bought_orders} orders"
        )
    else:
        fallback = f"not needed: {DEMO_SKUS[BOUGHT_SKU]} local {BOUGHT_SKU} keys sufficed"
    print(f"  supplier fallback       {fallback}", file=out)
    for line in parked:
        print(f"  needs attention         {line.order_id}: {line.reason}", file=out)
    ok = not reused and not wrong_count and not burst_missing and integrity == "ok"
    print(
        f"  invariants              {'ok' if ok else 'VIOLATED'}: no key twice "
        f"({len(reused)} reused), exact quantities ({len(wrong_count)} wrong), "
        f"ledger integrity {integrity}",
        file=out,
    )
    print(f"  logs                    {log_path}", file=out)
    print(f"  ledger                  {workdir / 'kami.db'}", file=out)
    return 0 if ok else 1
