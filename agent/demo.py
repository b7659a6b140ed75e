"""`kami-agent demo`: the whole agent against the embedded sandbox, no config needed.

A temp SQLite ledger and sample stock; a steady stream of orders with a flash-sale burst in the
middle; injected platform and supplier faults; one SKU that runs out locally and is bought
upstream; one SKU that runs low, so the low-stock alert shows up before any order has to wait,
after which the "merchant" restocks and the waiting orders fill. Live progress, then a summary
that checks the invariants from the platform's side, in the merchant's language (the CLI's).
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
from agent.i18n import ENGLISH, N_, Translator, display_width, pad
from agent.keybox import new_master_key, parse_master_key
from agent.notify.console import ConsoleNotifier
from agent.reasons import say_reason
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
# The summary's labels, lined up: the values start in this column (more when a language's
# labels are wider).
LABEL_CELLS = 24
SUMMARY_LABELS = {
    "orders": N_("orders on platform"),
    "delivered": N_("delivered"),
    "burst": N_("burst delivered"),
    "latency": N_("latency p50 / p99"),
    "calls": N_("delivery calls"),
    "fallback": N_("supplier fallback"),
    "alert": N_("low-stock alert"),
    "attention": N_("needs attention"),
    "invariants": N_("invariants"),
    "logs": N_("logs"),
    "ledger": N_("ledger"),
}


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


def demo_config(workdir: Path, base_url: str, supplier_url: str, language: str = ENGLISH) -> Config:
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
            language=language,  # the alerts speak it too
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
    def __init__(self, plan: DemoPlan, out: TextIO, translator: Translator) -> None:
        self.plan = plan
        self.out = out
        self._ = translator
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
        self.say(self._("flash sale: %(n)d orders at once") % {"n": self.plan.burst})
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
            self.say(self._("first order waiting for stock (%(sku)s is out)") % {"sku": LOW_SKU})
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
            self.say(
                self._("merchant imports %(n)d %(sku)s keys; waiting orders fill")
                % {"n": RESTOCK, "sku": LOW_SKU}
            )

    def progress(self, sandbox: SandboxPlatform, counts: dict[LineState, int], shown: str) -> str:
        line = "  " + self._(
            "orders %(orders)4d  delivered %(delivered)4d  waiting %(waiting)3d  needs"
            " attention %(attention)d"
        ) % {
            "orders": len(sandbox.orders),
            "delivered": counts.get(LineState.DELIVERED, 0),
            "waiting": counts.get(LineState.BACKORDERED, 0),
            "attention": counts.get(LineState.NEEDS_ATTENTION, 0),
        }
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
    language: str = ENGLISH,
) -> int:
    """Runs the demo, saying what happens in `language`; `witness` (tests) receives the
    sandbox platform to inspect afterwards."""
    _ = Translator(language)
    workdir = Path(tempfile.mkdtemp(prefix="kami-demo-"))
    log_path = workdir / "kami-agent.log"
    # Private from the start (the umask would make it world-readable): order ids, fingerprints.
    log_file = os.fdopen(
        os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8"
    )
    logs.configure("info", log_file)
    demo = Demo(plan, out, _)
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
    config = demo_config(workdir, base_url, supplier_url, _.language)
    # Made the one way a ledger is made: as `kami-agent init` makes it.
    store = SQLiteStore(
        workdir / "kami.db", parse_master_key(new_master_key()), opening=Opening.CREATE
    )
    await store.open()
    print(
        _("kami-agent demo — sandbox platform at %(url)s, ledger %(ledger)s")
        % {"url": base_url, "ledger": config.store.path},
        file=out,
    )
    for sku, count in {**BURST_SKUS, LOW_SKU: LOW_STOCK}.items():
        report = await store.import_keys(sku, _sample_keys(sku, count), "demo", time.time())
        print("  " + _("stock %(sku)s: %(n)d keys") % {"sku": sku, "n": report.added}, file=out)
    print(
        "  "
        + _("supplier upstream at %(url)s sells %(sku)s when local stock is out")
        % {"url": supplier_url, "sku": BOUGHT_SKU},
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
    _ = demo._
    # Labels padded by display cells: a Chinese character takes two.
    cells = max(LABEL_CELLS, max(display_width(_(label)) for label in SUMMARY_LABELS.values()) + 2)

    def row(label: str, value: str) -> None:
        print(f"  {pad(_(SUMMARY_LABELS[label]), cells)}{value}", file=out)

    heading = _("summary")
    print(f"\n\n{heading}" if out.isatty() else f"\n{heading}", file=out)
    row("orders", str(len(sandbox.orders)))
    row(
        "delivered",
        _("%(orders)d  (%(keys)d keys)") % {"orders": len(delivered), "keys": len(all_keys)},
    )
    row("burst", f"{len(burst) - len(burst_missing)}/{len(burst)}")
    row(
        "latency",
        _("%(p50).0f ms / %(p99).0f ms  (order visible -> delivery acked)")
        % {"p50": percentile(latencies, 0.5) * 1000, "p99": percentile(latencies, 0.99) * 1000},
    )
    row(
        "calls",
        _("%(n)d (faults injected: 5xx, lost responses, duplicate listings)")
        % {"n": len(sandbox.delivery_calls)},
    )
    bought_orders = sum(1 for o in sandbox.orders.values() if o.data.get("sku") == BOUGHT_SKU)
    bought_keys = sum(p.quantity for p in upstream.charged)
    local = {"sku": BOUGHT_SKU, "local": BURST_SKUS[BOUGHT_SKU]}
    if upstream.charged:
        fallback = _(
            "%(sku)s: %(local)d local keys ran out; %(n)d purchases (%(keys)d keys) for"
            " %(orders)d orders"
        ) % (local | {"n": len(upstream.charged), "keys": bought_keys, "orders": bought_orders})
    else:
        fallback = _("not needed: %(local)d local %(sku)s keys sufficed") % local
    row("fallback", fallback)
    # The promise is an alert before any order has to wait: a run whose stream sold too
    # little of it (`--orders 0`) to run low owes none.
    alert_ok = (
        demo.first_backorder is None
        if low_alert is None
        else demo.first_backorder is None or low_alert < demo.first_backorder
    )
    if low_alert is None and demo.first_backorder is None:
        alert_text = _("none for %(sku)s: it never ran low, no order had to wait") % {
            "sku": LOW_SKU
        }
    elif low_alert is None:
        alert_text = _("NO low-stock alert for %(sku)s") % {"sku": LOW_SKU}
    elif demo.first_backorder is None:
        alert_text = _("%(sku)s alert at t=%(at).1fs; no order had to wait") % {
            "sku": LOW_SKU,
            "at": low_alert,
        }
    else:
        alert_text = _(
            "%(sku)s alert at t=%(at).1fs, %(lead).1fs before the first order had to wait for stock"
        ) % {"sku": LOW_SKU, "at": low_alert, "lead": demo.first_backorder - low_alert}
    row("alert", alert_text)
    for line in parked:
        row(
            "attention",
            _("%(order)s: %(reason)s")
            % {"order": line.order_id, "reason": say_reason(line.reason, _)},
        )
    ok = (
        not reused
        and not wrong_count
        and not burst_missing
        and not undelivered
        and integrity == "ok"
        and alert_ok
    )
    row(
        "invariants",
        _(
            "%(verdict)s: no key twice (%(reused)d reused), exact quantities (%(wrong)d wrong),"
            " every good order delivered (%(missing)d not), ledger integrity %(integrity)s"
        )
        % {
            "verdict": _("ok") if ok else _("VIOLATED"),
            "reused": len(reused),
            "wrong": len(wrong_count),
            "missing": len(undelivered),
            "integrity": _("ok") if integrity == "ok" else integrity,
        },
    )
    row("logs", str(log_path))
    row("ledger", str(workdir / "kami.db"))
    return 0 if ok else 1
