"""`kami-agent demo`: the whole agent against the embedded sandbox, no config needed.

A temp SQLite ledger and sample stock; a steady stream of orders with a flash-sale burst in the
middle; injected platform and supplier faults; one SKU that runs out locally and is bought
upstream; one SKU that runs low, so the low-stock alert shows up before any order has to wait,
after which the "merchant" restocks and the waiting orders fill. Live progress, then a summary
that checks the invariants from the platform's side.
"""

from __future__ import annotations

import asyncio
import os
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
    AlertSettings,
    Config,
    LogSettings,
    NotifySettings,
    PlatformSettings,
    SkuSettings,
    StoreSettings,
    SupplierSettings,
)
from agent.domain import AlertMessage, CardItem, LineState
from agent.keybox import new_master_key, parse_master_key
from agent.notify.console import ConsoleNotifier
from agent.runtime import build_platform, platform_connections, run_engine
from agent.sandbox.platform import Faults, SandboxPlatform
from agent.sandbox.supplier import SandboxSupplier, SupplierFaults
from agent.stats import percentile
from agent.store.identity import Opening
from agent.store.sqlite import SQLiteStore
from agent.suppliers.http import HttpSupplier

# The burst sells these four; GIFT-50's small local stock runs out and is bought upstream.
BURST_SKUS = {"GAME-100": 1500, "VIP-30D": 800, "KEY-PRO": 400, "GIFT-50": 40}
BOUGHT_SKU = "GIFT-50"
# Sold only in the steady stream, local stock only: it runs low and raises the alert.
LOW_SKU, LOW_STOCK, RESTOCK = "TOPUP-10", 12, 60


@dataclass(frozen=True)
class DemoPlan:
    steady_orders: int = 150
    steady_rate: float = 30.0  # orders per second
    burst: int = 500
    timeout: float = 90.0


def _sample_keys(sku: str, count: int, start: int = 0) -> list[CardItem]:
    return [
        CardItem(code=f"{sku}-{index:06d}", secret=secrets.token_urlsafe(12))
        for index in range(start, start + count)
    ]


def demo_config(workdir: Path, base_url: str, supplier_url: str) -> Config:
    # Demo time runs fast: rates forget within half a minute and lead times are seconds, so
    # only TOPUP-10 (12 keys, no supplier) gets close enough to running out to alert.
    skus = {sku: SkuSettings(sku=sku, max_quantity=5, lead_time=5.0) for sku in BURST_SKUS}
    skus[BOUGHT_SKU] = SkuSettings(
        sku=BOUGHT_SKU,
        max_quantity=5,
        lead_time=5.0,
        sources=("local", "upstream"),
        max_price=Decimal("45.00"),
    )
    skus[LOW_SKU] = SkuSettings(sku=LOW_SKU, max_quantity=5, lead_time=120.0)
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
        alerts=AlertSettings(
            forecast_interval=0.3, half_life=30.0, outbox_interval=0.1, escalate_after=3600.0
        ),
        notify=(NotifySettings(name="console", kind="console", options={}),),
    )


class DemoConsole(ConsoleNotifier):
    """The console channel, time-stamped from the demo's start and remembering what it said."""

    def __init__(self, out: TextIO, started: float) -> None:
        super().__init__("console", out)
        self.started = started
        self.seen: list[tuple[float, AlertMessage]] = []

    async def send(self, message: AlertMessage) -> None:
        at = time.time() - self.started
        self.seen.append((at, message))
        lead = "\n" if self.stream.isatty() else ""
        print(f"{lead}  t={at:5.1f}s  {message.text}", file=self.stream)


class Demo:
    def __init__(self, plan: DemoPlan, out: TextIO) -> None:
        self.plan = plan
        self.out = out
        self.started = time.time()
        self.first_backorder: float | None = None
        self.restocked_at: float | None = None

    def say(self, text: str) -> None:
        lead = "\n" if self.out.isatty() else ""
        print(f"{lead}  t={time.time() - self.started:5.1f}s  {text}", file=self.out)

    async def feed_orders(self, sandbox: SandboxPlatform) -> list[str]:
        """Steady stream, then the burst, then the stream again; returns the burst's ids."""
        steady = [*BURST_SKUS, LOW_SKU]
        half = self.plan.steady_orders // 2
        for index in range(half):
            sandbox.add_order(steady[index % len(steady)], quantity=1 + (index % 7 == 0))
            await asyncio.sleep(1 / self.plan.steady_rate)
        self.say(f"flash sale: {self.plan.burst} orders at once")
        skus = list(BURST_SKUS)
        burst = [sandbox.add_order(skus[i % len(skus)]) for i in range(self.plan.burst)]
        # Hostile input the agent must park, not choke on.
        sandbox.add_order("NO-SUCH-SKU", quantity=1)
        sandbox.add_order("GAME-100", quantity=0)
        for index in range(self.plan.steady_orders - half):
            sandbox.add_order(steady[index % len(steady)], quantity=1 + (index % 5 == 0))
            await asyncio.sleep(1 / self.plan.steady_rate)
        return burst

    async def merchant(self, store: SQLiteStore, counts: dict[LineState, int]) -> None:
        """Plays the merchant: restocks TOPUP-10 a moment after orders start waiting."""
        if counts.get(LineState.BACKORDERED, 0) and self.first_backorder is None:
            self.first_backorder = time.time() - self.started
            self.say(f"first order waiting for stock ({LOW_SKU} is out)")
        restock_due = (
            self.first_backorder is not None
            and self.restocked_at is None
            and time.time() - self.started > self.first_backorder + 1.0
        )
        if restock_due:
            await store.import_keys(
                LOW_SKU, _sample_keys(LOW_SKU, RESTOCK, 1000), "demo-restock", time.time()
            )
            self.restocked_at = time.time() - self.started
            self.say(f"merchant imports {RESTOCK} {LOW_SKU} keys; waiting orders fill")

    def progress(self, sandbox: SandboxPlatform, counts: dict[LineState, int], shown: str) -> str:
        line = (
            f"  orders {len(sandbox.orders):4d}  delivered "
            f"{counts.get(LineState.DELIVERED, 0):4d}  waiting "
            f"{counts.get(LineState.BACKORDERED, 0):3d}  needs attention "
            f"{counts.get(LineState.NEEDS_ATTENTION, 0)}"
        )
        if self.out.isatty():  # one line, redrawn in place
            self.out.write(f"\r{line}  ")
            self.out.flush()
        elif line != shown:
            print(line, file=self.out)
        return line


async def run_demo(
    plan: DemoPlan = DemoPlan(),
    out: TextIO = sys.stdout,
    witness: list[SandboxPlatform] | None = None,
) -> int:
    """Runs the demo; `witness` (tests) receives the sandbox platform to inspect afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="kami-demo-"))
    log_path = workdir / "kami-agent.log"
    # Private from the start (the umask would make it world-readable): order ids, fingerprints.
    log_file = os.fdopen(
        os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8"
    )
    logs.configure("info", log_file)
    demo = Demo(plan, out)
    sandbox = SandboxPlatform(api_key="demo", seed=7)
    sandbox.faults = Faults(
        error_rate=0.03, drop_after_commit_rate=0.02, duplicate_rate=0.05, latency=0.005
    )
    base_url = await sandbox.start()
    if witness is not None:
        witness.append(sandbox)
    upstream = SandboxSupplier(name="upstream", api_key="demo-supplier", seed=11)
    upstream.add_product(BOUGHT_SKU, price="42.50")
    upstream.faults = SupplierFaults(
        drop_after_commit_rate=0.05, processing_rate=0.2, processing_seconds=0.5
    )
    supplier_url = await upstream.start()
    config = demo_config(workdir, base_url, supplier_url)
    # Made the one way a ledger is made: as `kami-agent init` makes it.
    store = SQLiteStore(
        workdir / "kami.db", parse_master_key(new_master_key()), opening=Opening.CREATE
    )
    await store.open()
    print(f"kami-agent demo — sandbox platform at {base_url}, ledger {config.store.path}", file=out)
    for sku, count in {**BURST_SKUS, LOW_SKU: LOW_STOCK}.items():
        report = await store.import_keys(sku, _sample_keys(sku, count), "demo", time.time())
        print(f"  stock {sku}: {report.added} keys", file=out)
    print(
        f"  supplier upstream at {supplier_url} sells {BOUGHT_SKU} when local stock is out",
        file=out,
    )
    platform = build_platform(
        config.platforms[0], sandbox.secret, platform_connections(config.agent)
    )
    supplier = HttpSupplier(config.suppliers[0], upstream.secret)
    console = DemoConsole(out, demo.started)
    stop = asyncio.Event()
    engine_task = asyncio.create_task(
        run_engine(
            config, store, {"sandbox": platform}, stop, {"upstream": supplier}, {"console": console}
        )
    )
    feeder = asyncio.create_task(demo.feed_orders(sandbox))
    shown = ""
    try:
        while time.time() - demo.started < plan.timeout:
            await asyncio.sleep(0.25)
            counts = await store.count_by_state()
            await demo.merchant(store, counts)
            shown = demo.progress(sandbox, counts, shown)
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
    try:
        return await _summary(demo, console, sandbox, upstream, store, burst, workdir, log_path)
    finally:
        log_file.close()


async def _summary(
    demo: Demo,
    console: DemoConsole,
    sandbox: SandboxPlatform,
    upstream: SandboxSupplier,
    store: SQLiteStore,
    burst: list[str],
    workdir: Path,
    log_path: Path,
) -> int:
    out = demo.out
    delivered = sandbox.delivered_secrets()
    all_keys = [secret for keys in delivered.values() for secret in keys]
    reused = [k for k, n in Counter(all_keys).items() if n > 1]
    wrong_count = [
        oid
        for oid, keys in delivered.items()
        if len(set(keys)) != sandbox.orders[oid].data["quantity"]
    ]
    burst_missing = [oid for oid in burst if oid not in delivered]
    undelivered = [
        oid
        for oid, o in sandbox.orders.items()
        if o.delivery is None and o.data.get("sku") != "NO-SUCH-SKU" and o.data.get("quantity") != 0
    ]
    latencies = sandbox.latencies()
    parked = await store.list_lines(LineState.NEEDS_ATTENTION, 20)
    integrity = await store.integrity_check()
    await store.close()
    await sandbox.stop()
    low_alert = next(
        (at for at, m in console.seen if m.key == f"low_stock:{LOW_SKU}" and m.event == "opened"),
        None,
    )
    print("\n\nsummary" if out.isatty() else "\nsummary", file=out)
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
        "(faults injected: 5xx, lost responses, duplicate listings)",
        file=out,
    )
    bought_orders = sum(1 for o in sandbox.orders.values() if o.data.get("sku") == BOUGHT_SKU)
    bought_keys = sum(p.quantity for p in upstream.charged)
    if upstream.charged:
        fallback = (
            f"{BOUGHT_SKU}: {BURST_SKUS[BOUGHT_SKU]} local keys ran out; "
            f"{len(upstream.charged)} purchases ({bought_keys} keys) for "
            f"{bought_orders} orders"
        )
    else:
        fallback = f"not needed: {BURST_SKUS[BOUGHT_SKU]} local {BOUGHT_SKU} keys sufficed"
    print(f"  supplier fallback       {fallback}", file=out)
    # The promise is an alert before any order has to wait: a run whose stream sold too
    # little of it (`--orders 0`) to run low owes none.
    alert_ok = (
        demo.first_backorder is None
        if low_alert is None
        else demo.first_backorder is None or low_alert < demo.first_backorder
    )
    if low_alert is None and demo.first_backorder is None:
        alert_text = f"none for {LOW_SKU}: it never ran low, no order had to wait"
    elif low_alert is None:
        alert_text = f"NO low-stock alert for {LOW_SKU}"
    elif demo.first_backorder is None:
        alert_text = f"{LOW_SKU} alert at t={low_alert:.1f}s; no order had to wait"
    else:
        alert_text = (
            f"{LOW_SKU} alert at t={low_alert:.1f}s, "
            f"{demo.first_backorder - low_alert:.1f}s before the first order had to "
            "wait for stock"
        )
    print(f"  low-stock alert         {alert_text}", file=out)
    for line in parked:
        print(f"  needs attention         {line.order_id}: {line.reason}", file=out)
    ok = (
        not reused
        and not wrong_count
        and not burst_missing
        and not undelivered
        and integrity == "ok"
        and alert_ok
    )
    print(
        f"  invariants              {'ok' if ok else 'VIOLATED'}: no key twice "
        f"({len(reused)} reused), exact quantities ({len(wrong_count)} wrong), every good "
        f"order delivered ({len(undelivered)} not), ledger integrity {integrity}",
        file=out,
    )
    print(f"  logs                    {log_path}", file=out)
    print(f"  ledger                  {workdir / 'kami.db'}", file=out)
    return 0 if ok else 1
