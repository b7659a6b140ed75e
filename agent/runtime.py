"""Assembles the daemon from config: store, platforms, engine, scheduler, signals."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Mapping

from agent.alerts import AlertEvaluator, OutboxDrainer
from agent.buyer import BuyerCare
from agent.clock import ForwardClock
from agent.config import (
    AgentSettings,
    Config,
    ConfigError,
    PlatformSettings,
    StoreSettings,
    SupplierSettings,
)
from agent.consignment import keepers as pool_keepers
from agent.console.launch import MerchantInterfaces
from agent.engine import Engine
from agent.keybox import parse_master_key
from agent.ledger_watch import (
    EXIT_LEDGER_LOST,
    alert_ledger_lost,
    alert_restored_keys,
    watch_ledger,
)
from agent.listener import build_listener
from agent.logs import get_logger
from agent.notify.base import Notifier
from agent.notify.factory import build_notifier
from agent.periodic import cancel_all
from agent.platforms import kind_module
from agent.platforms.base import Platform
from agent.scheduler import Job, JobFunc, build_scheduler
from agent.secrets import resolve_secret
from agent.service import keep_watchdog, notify, watchdog_interval
from agent.signed_http import DEFAULT_CONNECTIONS
from agent.stocksync import StockSync
from agent.store.base import Store
from agent.store.identity import Opening
from agent.store.sqlite import SQLiteStore, exclusive_ledger
from agent.suppliers import kind_module as supplier_module
from agent.suppliers.base import Supplier

log = get_logger("kami.runtime")
DRAIN_GRACE_SECONDS = 20.0
# The exit code after SIGHUP (EX_TEMPFAIL: "try again"): the daemon drained like on SIGTERM
# and wants to be started again. SIGHUP is not a reload: reading a changed config into a
# running engine (platforms, workers, ledger, secrets) would be a second start-up path, and
# a half-applied config is worse than a restart, which costs a drain and a few seconds and
# which the ledger makes safe. Outside systemd this is also what a closed terminal asks for.
EXIT_RESTART = 75
LONG_POLL_SECONDS = 25.0


def open_store(
    settings: StoreSettings, *, opening: Opening = Opening.OPEN, startup_checks: bool = False
) -> Store:
    """The configured ledger (not yet opened): SQLite by path, or PostgreSQL by URL.
    `opening`: CREATE for `kami-agent init` only; `startup_checks`: the daemon's (SQLite:
    quick_check and a write)."""
    master = parse_master_key(resolve_secret(settings.key_secret))
    if settings.url is None:
        assert settings.path is not None
        return SQLiteStore(settings.path, master, opening=opening, startup_checks=startup_checks)
    try:
        from agent.store.postgres import PostgresStore
    except ImportError as exc:
        raise ConfigError(
            "store.url names PostgreSQL, which needs asyncpg: pip install 'kami-agent[postgres]'"
        ) from exc
    password = resolve_secret(settings.password_secret) if settings.password_secret else None
    return PostgresStore(
        settings.url,
        master,
        instance=settings.instance,
        lease_seconds=settings.lease_seconds,
        pool_size=settings.pool_size,
        password=password,
        opening=opening,
    )


# Platform connections besides the workers' deliveries: the long poll, a poll or catch-up
# listing, buyer notices.
INTAKE_CONNECTIONS = 4


def platform_connections(agent: AgentSettings) -> int:
    """A connection for every worker and for intake: a merchant who raises `concurrency` (a
    distant platform, a flash sale) gets that many calls in flight, not a fixed pool's worth;
    and no more, since each call in flight costs CPU even while it waits."""
    return agent.concurrency + INTAKE_CONNECTIONS


def build_platform(
    settings: PlatformSettings,
    secret: str | None = None,
    max_connections: int = DEFAULT_CONNECTIONS,
) -> Platform:
    return kind_module(settings.kind).build(
        settings,
        secret if secret is not None else resolve_secret(settings.secret_name),
        max_connections,
    )


def build_platforms(config: Config) -> dict[str, Platform]:
    connections = platform_connections(config.agent)
    return {p.name: build_platform(p, max_connections=connections) for p in config.platforms}


def build_supplier(settings: SupplierSettings) -> Supplier:
    return supplier_module(settings.kind).build(settings, resolve_secret(settings.secret_name))


def build_suppliers(config: Config) -> dict[str, Supplier]:
    return {s.name: build_supplier(s) for s in config.suppliers}


GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """A flash sale makes hundreds of thousands of short-lived objects; reference counting
    frees nearly all of them at once, but the cycle collector's default (a young-generation
    pass every 700 allocations, full passes over everything alive) costs measurable
    throughput. Objects alive at start (modules, config) are frozen out of its passes, and
    the young generation is collected every 20,000 allocations."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)


def only_one_agent(store: Store, name: str, func: JobFunc) -> JobFunc:
    """The job runs on one agent at a time among those sharing the store (advisory lock);
    the others skip that round."""

    async def job() -> None:
        async with store.singleton(name) as ours:
            if ours:
                await func()

    return job


async def run_engine(
    config: Config,
    store: Store,
    platforms: Mapping[str, Platform],
    stop: asyncio.Event,
    suppliers: Mapping[str, Supplier] | None = None,
    notifiers: Mapping[str, Notifier] | None = None,
) -> Engine:
    """Runs until `stop` is set, then drains gracefully. The store must already be open."""
    engine = Engine(
        config.agent,
        config.skus,
        store,
        platforms,
        suppliers=suppliers,
        supplier_settings={s.name: s for s in config.suppliers},
        clock=ForwardClock(),
    )
    engine.start_workers()
    resumed = await engine.sweep()  # every non-terminal line left by the last run
    log.info("started", platforms=list(platforms), resumed_lines=resumed)

    evaluator = AlertEvaluator(
        config,
        store,
        engine.clock,
        engine.balances,
        engine.auth_failures,
        unreachable_since=engine.unreachable_since,
    )
    drainer = OutboxDrainer(store, notifiers or {}, engine.clock, config.agent.language)
    buyers = BuyerCare(config, store, platforms, engine.clock)

    async def watch() -> None:
        await evaluator.run()
        await buyers.run()

    alerts = config.alerts
    jobs = [
        Job("forecast", only_one_agent(store, "forecast", watch), alerts.forecast_interval),
        Job("outbox", only_one_agent(store, "outbox", drainer.drain), alerts.outbox_interval),
    ]
    scheduler = build_scheduler(engine, config.agent, jobs)
    scheduler.start()
    background: list[asyncio.Task[None]] = []
    interval = watchdog_interval()
    if interval is not None:
        seen = {"handled": -1}

        async def progressing() -> bool:
            # Only while work progresses: the ledger must answer, and with lines waiting the
            # workers must have finished some since the last ping. A wedged engine or store
            # misses the watchdog and systemd restarts us (the ledger makes that safe).
            await store.count_by_state()
            handled = engine.stats.handled
            alive = engine.backlog == 0 or handled != seen["handled"]
            seen["handled"] = handled
            return alive

        background.append(asyncio.create_task(keep_watchdog(interval, progressing)))
    long_polls = [
        asyncio.create_task(engine.long_poll(p.name, LONG_POLL_SECONDS), name=f"long-poll:{p.name}")
        for p in config.platforms
        if p.long_poll and p.name in platforms
    ]
    notify("READY=1\nSTATUS=delivering")

    async def report_status() -> None:
        while True:
            await asyncio.sleep(30)
            s = engine.snapshot()
            notify(
                f"STATUS=delivered {s['delivered']}, backlog {s['backlog']}, "
                f"needs attention {s['parked']}"
            )

    background.append(asyncio.create_task(report_status()))
    # Keeps the stock shown on the platforms that take it true (oversell 0).
    stock_sync = StockSync(config.skus, store, platforms, suppliers or {}, engine.clock)
    background.append(asyncio.create_task(stock_sync.run(), name="stock-sync"))
    # Keeps the platforms' own card pools topped up from the ledger (consignment).
    for keeper in pool_keepers(store, platforms):
        background.append(asyncio.create_task(keeper.run(), name=f"pools:{keeper.platform.name}"))
    interfaces = MerchantInterfaces(config, store, engine)  # console, metrics, bot: if configured
    # Inbound, if configured; pushed orders go through the engine's intakes.
    listener = build_listener(config, store, platforms, engine.clock, engine.intakes)
    try:
        await interfaces.start()
        if listener is not None:
            await listener.start()
        await stop.wait()
    finally:
        if listener is not None:
            await listener.stop()  # no more calls answered once the engine drains
        await interfaces.stop()
        notify("STOPPING=1\nSTATUS=draining")
        log.info("stopping", backlog=engine.backlog)
        for task in long_polls:
            task.cancel()
        await cancel_all(background)
        await scheduler.stop()
        await engine.stop_workers(DRAIN_GRACE_SECONDS)
    return engine


async def run_daemon(config: Config) -> int:
    if config.store.path is None:
        return await _run_daemon(config)
    with exclusive_ledger(config.store.path):  # one daemon per SQLite ledger
        return await _run_daemon(config)


async def _run_daemon(config: Config) -> int:
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    hung_up = asyncio.Event()

    def hang_up() -> None:
        # Without a handler SIGHUP ends the process on the spot, mid-delivery; systemd takes
        # that for a clean stop and (Restart=on-failure) left the service down.
        log.warning("hangup", action="draining, then exiting for a restart", code=EXIT_RESTART)
        hung_up.set()
        stop.set()

    loop.add_signal_handler(signal.SIGHUP, hang_up)
    store = open_store(config.store, startup_checks=True)
    platforms = build_platforms(config)
    suppliers = build_suppliers(config)
    notifiers = {n.name: build_notifier(n) for n in config.notify}
    await store.open()
    restored = getattr(store, "reconciled", None)  # a SQLite ledger's bound-keys journal
    if restored is not None and restored.set_aside:
        language = config.agent.language
        await alert_restored_keys(notifiers.values(), restored.set_aside, time.time(), language)
    started = time.monotonic()
    lost: list[str] = []

    def ledger_gone(reason: str) -> None:
        lost.append(reason)
        stop.set()

    watch = asyncio.create_task(watch_ledger(store, ledger_gone))
    try:
        engine = await run_engine(config, store, platforms, stop, suppliers, notifiers)
    finally:
        watch.cancel()
        if lost:
            await alert_ledger_lost(notifiers.values(), lost[0], time.time(), config.agent.language)
        for platform in platforms.values():
            await platform.close()
        for supplier in suppliers.values():
            await supplier.close()
        for notifier in notifiers.values():
            await notifier.close()
        await store.close()
    code = EXIT_RESTART if hung_up.is_set() else 0
    code = EXIT_LEDGER_LOST if lost else code
    uptime = round(time.monotonic() - started, 1)
    log.info("stopped", uptime_s=uptime, exit_code=code, **engine.snapshot())
    return code
