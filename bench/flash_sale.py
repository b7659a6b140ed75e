"""Flash-sale benchmark: `python -m bench.flash_sale [--orders 20000] [--rounds 3]`.

One run measures, against the sandbox platform on loopback (its own process), with the agent
in-process on its SQLite ledger (synchronous=FULL; or PostgreSQL with --store-url), already
running:
  1. rounds of two back-to-back measurements, so that both see the machine in the same state:
     the raw limit (plain aiohttp delivery calls, signed as the protocol wants, as many as the
     burst, 16 and 64 at a time, the better of the two; the agent never sees these orders),
     then the agent on a burst of N orders: orders delivered per second. The ratio of the two
     is reported for every round, and the median round as the headline;
  2. a steady stream at --rate orders/s: latency from the order being visible on the platform
     to the delivery being acknowledged, and what the agent adds after the listing;
  3. the agent idle with a 2 s poll interval: CPU share. Also peak RSS and CPU seconds.
Figures also go to bench/results/flash_sale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import resource
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from agent import logs
from agent.config import (
    AgentSettings,
    AlertSettings,
    Config,
    LogSettings,
    PlatformSettings,
    SkuSettings,
    StoreSettings,
)
from agent.domain import CardItem
from agent.keybox import new_master_key, parse_master_key
from agent.runtime import build_platform, platform_connections, run_engine, tune_gc
from agent.signed_http import SignedClient
from agent.signing import auth_headers
from agent.stats import percentile
from agent.store.base import Store
from agent.store.identity import Opening
from agent.store.sqlite import SQLiteStore
from bench.sandbox_process import start_platform_process

SKU = "FLASH-1"
API_KEY = "bench"
CONCURRENCY = 64  # in flight at once, for the agent and for the raw-limit client alike
POLL_INTERVAL = 2.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def raw_limit(
    client: SignedClient, secret: str, count: int, in_flight: int, prefix: str
) -> float:
    """Delivery calls per second with nothing but plain aiohttp and the protocol's signature
    in the way: one default session, the body and headers built inline, no ledger."""
    await client.request(
        "POST",
        "/_admin/orders",
        payload={"sku": SKU, "prefix": prefix, "count": count, "listed": False},
    )
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    base_url = str(client.url_for(""))

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            path = f"/api/v1/orders/{prefix}{i:07d}/delivery"
            items = [{"code": "", "secret": f"{prefix}{i}"}]
            body = json.dumps({"items": items, "message": ""}).encode()
            headers = auth_headers(API_KEY, secret, time.time(), "POST", path, body)
            headers["Idempotency-Key"] = f"{prefix}{i}"
            headers["Content-Type"] = "application/json"
            async with session.post(base_url + path, data=body, headers=headers) as resp:
                await resp.read()
                assert resp.status == 200, resp.status

    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(in_flight)))
        return count / (time.perf_counter() - start)


async def timings(client: SignedClient, prefix: str) -> list[tuple[float, float | None]]:
    resp = await client.request("GET", "/_admin/timings", params={"prefix": prefix})
    return [(row[1], row[2]) for row in resp.json()["orders"]]


async def listing_times(client: SignedClient) -> list[float]:
    resp = await client.request("GET", "/_admin/timings", params={"prefix": "-"})
    return sorted(resp.json()["listed_at"])


async def wait_listed(client: SignedClient, count: int) -> None:
    """Until the platform has answered `count` order listings."""
    for _ in range(600):
        if len(await listing_times(client)) >= count:
            return
        await asyncio.sleep(0.05)
    raise SystemExit("the agent did not list orders within 30 s of starting")


def added_latencies(orders: list[tuple[float, float]], listed: list[float]) -> list[float]:
    """Per order: delivery ack minus the first listing that could show it (its poll)."""
    added = []
    for visible, acked in orders:
        index = bisect.bisect_left(listed, visible)
        if index < len(listed) and listed[index] <= acked:
            added.append(acked - listed[index])
    return added


async def wait_delivered(
    client: SignedClient, prefix: str, count: int, limit: float
) -> list[tuple[float, float]]:
    deadline = time.monotonic() + limit
    while True:
        resp = await client.request("GET", "/_admin/progress", params={"prefix": prefix})
        delivered = int(resp.json()["delivered"])
        if delivered >= count:
            rows = await timings(client, prefix)
            return [(v, d) for v, d in rows if d is not None]
        if time.monotonic() > deadline:
            raise SystemExit(f"{prefix}: only {delivered}/{count} delivered in {limit:.0f} s")
        await asyncio.sleep(0.5)


def bench_config(workdir: Path, base_url: str, long_poll: bool, log_level: str) -> Config:
    return Config(
        source=workdir / "bench.toml",
        agent=AgentSettings(
            poll_interval=POLL_INTERVAL,
            sweep_interval=5.0,
            reconcile_interval=3600,
            concurrency=CONCURRENCY,
        ),
        store=StoreSettings(path=workdir / "kami.db"),  # run_engine is handed the store
        log=LogSettings(level=log_level),
        platforms=(
            PlatformSettings(
                name="main",
                kind="http",
                base_url=base_url,
                api_key=API_KEY,
                secret_name="bench",
                timeout=10.0,
                page_size=1000,
                long_poll=long_poll,
            ),
        ),
        skus={SKU: SkuSettings(sku=SKU, max_quantity=5, lead_time=0.0)},
        alerts=AlertSettings(forecast_interval=60.0),
    )


def bench_store(sqlite_path: Path, store_url: str | None) -> Store:
    """The agent's ledger: SQLite in the work directory, or the PostgreSQL database named
    (it must be one for the bench alone: the bench fills it with keys and orders)."""
    master = parse_master_key(new_master_key())
    if store_url is None:
        return SQLiteStore(sqlite_path, master, opening=Opening.CREATE)
    from agent.store.postgres import PostgresStore

    return PostgresStore(store_url, master, instance="bench")


async def burst_round(client: SignedClient, secret: str, orders: int, index: int) -> dict[str, Any]:
    """The raw limit, then right after it the agent on a burst of as many orders: measured
    back to back, so both see the machine in the same state."""
    # The limit is the best plain aiohttp does: 16 in flight, and the agent's number.
    limits = {
        n: await raw_limit(client, secret, orders, n, f"RAW{index}-{n}-")
        for n in sorted({16, CONCURRENCY})
    }
    limit = max(limits.values())
    prefix = f"BURST{index}-"
    cpu_before = cpu_seconds()
    await client.request(
        "POST", "/_admin/orders", payload={"sku": SKU, "prefix": prefix, "count": orders}
    )
    burst = await wait_delivered(client, prefix, orders, 600)
    cpu_per_order = (cpu_seconds() - cpu_before) / orders
    first_ack, last_ack = min(d for _, d in burst), max(d for _, d in burst)
    visible = min(v for v, _ in burst)
    delivered_per_s = orders / (last_ack - first_ack)
    print(
        f"round {index + 1}: raw limit "
        + ", ".join(f"{v:,.0f}/s with {n} in flight" for n, v in limits.items())
        + f"; agent {orders:,} orders in {last_ack - visible:.1f} s,"
        f" {delivered_per_s:,.0f}/s, {cpu_per_order * 1e6:.0f} us CPU per order;"
        f" ratio {delivered_per_s / limit:.3f}"
    )
    return {
        "raw_limit_by_in_flight": {str(n): round(v, 1) for n, v in limits.items()},
        "raw_limit_calls_per_s": round(limit, 1),
        "agent_delivered_per_s": round(delivered_per_s, 1),
        "ratio_agent_to_limit": round(delivered_per_s / limit, 3),
        "burst_seconds_visible_to_last_ack": round(last_ack - visible, 2),
        # The process's CPU over the burst (up to half a second of waiting for the end
        # included): what one order costs the agent, whatever the machine's speed today.
        "agent_cpu_us_per_order": round(cpu_per_order * 1e6, 1),
    }


async def run(
    orders: int,
    rate: float,
    steady_seconds: float,
    idle_seconds: float,
    rounds: int,
    long_poll: bool = True,
    log_level: str = "warning",
    store_url: str | None = None,
) -> dict[str, Any]:
    secret = secrets.token_hex(16)
    process, base_url = start_platform_process(API_KEY, secret)
    client = SignedClient(base_url, API_KEY, secret, timeout=30.0)
    workdir = Path(tempfile.mkdtemp(prefix="kami-bench-"))
    logs.configure(log_level, (workdir / "agent.log").open("w", encoding="utf-8"))
    try:
        config = bench_config(workdir, base_url, long_poll, log_level)
        store = bench_store(workdir / "kami.db", store_url)
        await store.open()
        steady_count = int(rate * steady_seconds)
        keys = (
            CardItem("", f"key-{i}-{secrets.token_hex(6)}")
            for i in range(rounds * orders + steady_count)
        )
        await store.import_keys(SKU, keys, "bench", time.time())
        platform = build_platform(config.platforms[0], secret, platform_connections(config.agent))
        stop = asyncio.Event()
        tune_gc()  # as run_daemon does at start
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        engine = asyncio.create_task(run_engine(config, store, {"main": platform}, stop))
        # A flash sale meets a running agent: its start-up poll and catch-up listing are done.
        await wait_listed(client, 2)

        bursts = [await burst_round(client, secret, orders, i) for i in range(rounds)]

        await client.request(
            "POST",
            "/_admin/stream",
            payload={"sku": SKU, "prefix": "STEADY", "rate": rate, "count": steady_count},
        )
        steady = await wait_delivered(client, "STEADY", steady_count, 120)
        latencies = [d - v for v, d in steady]
        added = added_latencies(steady, await listing_times(client))
        busy_cpu, busy_wall = cpu_seconds() - cpu0, time.perf_counter() - wall0

        await asyncio.sleep(POLL_INTERVAL)  # let the last poll land
        cpu_idle0, idle0 = cpu_seconds(), time.perf_counter()
        await asyncio.sleep(idle_seconds)
        idle_share = (cpu_seconds() - cpu_idle0) / (time.perf_counter() - idle0)

        stop.set()
        await engine
        await platform.close()
        await store.close()
    finally:
        await client.close()
        process.terminate()
        shutil.rmtree(workdir, ignore_errors=True)

    def median_of(key: str) -> float:
        return float(statistics.median(b[key] for b in bursts))

    return {
        "orders_per_burst": orders,
        "rounds": rounds,
        # Headline figures: the median round (each round measures the limit, then the agent).
        "raw_limit_calls_per_s": median_of("raw_limit_calls_per_s"),
        "agent_delivered_per_s": median_of("agent_delivered_per_s"),
        "ratio_agent_to_limit": median_of("ratio_agent_to_limit"),
        "ratio_range": [
            min(b["ratio_agent_to_limit"] for b in bursts),
            max(b["ratio_agent_to_limit"] for b in bursts),
        ],
        "bursts": bursts,
        "agent_concurrency": CONCURRENCY,
        "steady_rate_per_s": rate,
        "steady_orders": steady_count,
        "steady_latency_ms": {
            "p50": round(percentile(latencies, 0.5) * 1000, 1),
            "p99": round(percentile(latencies, 0.99) * 1000, 1),
            "max": round(max(latencies) * 1000, 1),
        },
        "steady_added_latency_after_poll_ms": {
            "p50": round(percentile(added, 0.5) * 1000, 1),
            "p99": round(percentile(added, 0.99) * 1000, 1),
        },
        "poll_interval_s": POLL_INTERVAL,
        "long_poll": long_poll,
        "log_level": log_level,
        "store": "postgresql" if store_url else "sqlite",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_seconds_busy": round(busy_cpu, 2),
        "cpu_share_busy": round(busy_cpu / busy_wall, 3),
        "cpu_share_idle": round(idle_share, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="bursts, each right after its own raw-limit run; the median round is reported",
    )
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--steady-seconds", type=float, default=10.0)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--json", default="bench/results/flash_sale.json")
    parser.add_argument(
        "--no-long-poll",
        action="store_true",
        help="take orders by polling only (latency then includes the poll wait)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="the agent's log level (at info, every delivery also writes a JSON line)",
    )
    parser.add_argument(
        "--store-url",
        help="postgresql://user@host:port/db: run the agent on that (empty, bench-only)"
        " PostgreSQL database instead of SQLite; the password from PGPASSWORD or ~/.pgpass",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    result = asyncio.run(
        run(
            args.orders,
            args.rate,
            args.steady_seconds,
            args.idle_seconds,
            args.rounds,
            long_poll=not args.no_long_poll,
            log_level=args.log_level,
            store_url=args.store_url,
        )
    )
    result["bench_wall_seconds"] = round(time.perf_counter() - started, 1)
    target = Path(args.json)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
