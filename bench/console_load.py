"""Does the console slow delivery? `python -m bench.console_load [--rate 100] [--seconds 20]`.

The agent runs in-process on its SQLite ledger with its web console, against the sandbox
platform in its own process (as bench/flash_sale.py). First a burst fills the ledger with
delivered orders (so the overview reads a full sample); then steady streams of --rate orders/s
alternate between the console left alone and the console polled every second by a logged-in
merchant (overview, stock and orders pages each second, as fast as they answer), --rounds
times each, in A B B A order. Reported: deliveries' latency p50/p99 (order visible on the
platform -> delivery acknowledged) per phase, and the console pages served. Figures also go
to bench/results/console_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from agent import logs
from agent.console.settings import ConsoleSettings, InterfaceSettings
from agent.domain import CardItem
from agent.runtime import build_platform, platform_connections, run_engine, tune_gc
from agent.signed_http import SignedClient
from agent.stats import percentile
from bench.flash_sale import API_KEY, SKU, bench_config, bench_store, wait_delivered, wait_listed
from bench.sandbox_process import start_platform_process

CONSOLE_TOKEN = secrets.token_urlsafe(24)
PAGES = ("/", "/stock", "/orders")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def poll_console(base: str, stop: asyncio.Event, served: list[float]) -> None:
    """A merchant with the console open: every second, each page once (their answer times
    go into `served`)."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        page = await (await session.get(f"{base}/login")).text()
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        await session.post(f"{base}/login", data={"csrf": csrf, "secret": CONSOLE_TOKEN})
        while not stop.is_set():
            tick = time.perf_counter()
            for path in PAGES:
                start = time.perf_counter()
                async with session.get(f"{base}{path}", allow_redirects=False) as response:
                    assert response.status == 200, (path, response.status)
                    await response.read()
                served.append(time.perf_counter() - start)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, 1.0 - (time.perf_counter() - tick)))


async def steady(client: SignedClient, prefix: str, rate: float, count: int) -> list[float]:
    await client.request(
        "POST",
        "/_admin/stream",
        payload={"sku": SKU, "prefix": prefix, "rate": rate, "count": count},
    )
    rows = await wait_delivered(client, prefix, count, 120 + count / rate)
    return [d - v for v, d in rows]


async def run(rate: float, seconds: float, rounds: int, preload: int) -> dict[str, Any]:
    secret = secrets.token_hex(16)
    process, base_url = start_platform_process(API_KEY, secret)
    client = SignedClient(base_url, API_KEY, secret, timeout=30.0)
    workdir = Path(tempfile.mkdtemp(prefix="kami-bench-console-"))
    logs.configure("warning", (workdir / "agent.log").open("w", encoding="utf-8"))
    os.environ["KAMI_SECRET_BENCH_CONSOLE"] = CONSOLE_TOKEN
    port = free_port()
    console_url = f"http://127.0.0.1:{port}"
    phases: dict[str, list[float]] = {"console idle": [], "console polled every second": []}
    per_round: list[dict[str, Any]] = []
    served: list[float] = []
    try:
        config = dataclasses.replace(
            bench_config(workdir, base_url, True, "warning"),
            interfaces=InterfaceSettings(
                console=ConsoleSettings(port=port, token_secret="bench.console")
            ),
        )
        store = bench_store(workdir / "kami.db", None)
        await store.open()
        count = int(rate * seconds)
        keys = (
            CardItem("", f"key-{i}-{secrets.token_hex(6)}")
            for i in range(preload + 2 * rounds * count)
        )
        await store.import_keys(SKU, keys, "bench", time.time())
        platform = build_platform(config.platforms[0], secret, platform_connections(config.agent))
        stop = asyncio.Event()
        tune_gc()
        engine = asyncio.create_task(run_engine(config, store, {"main": platform}, stop))
        await wait_listed(client, 2)
        await client.request(
            "POST", "/_admin/orders", payload={"sku": SKU, "prefix": "PRELOAD-", "count": preload}
        )
        await wait_delivered(client, "PRELOAD-", preload, 600)
        for index in range(rounds):
            # A B B A ...: a drift of the machine's load over the run weighs on both alike.
            order = list(phases) if index % 2 == 0 else list(reversed(phases))
            for name in order:
                polling = name != "console idle"
                halt = asyncio.Event()
                poller = (
                    asyncio.create_task(poll_console(console_url, halt, served))
                    if polling
                    else None
                )
                latencies = await steady(client, f"R{index}-{int(polling)}-", rate, count)
                halt.set()
                if poller is not None:
                    await poller
                phases[name] += latencies
                row = {
                    "round": index + 1,
                    "phase": name,
                    "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
                    "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
                }
                per_round.append(row)
                print(row)
        stop.set()
        await engine
        await platform.close()
        await store.close()
    finally:
        await client.close()
        process.terminate()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "rate_per_s": rate,
        "orders_per_phase": int(rate * seconds),
        "rounds": rounds,
        "preloaded_delivered_orders": preload,
        "pages_polled_each_second": list(PAGES),
        "latency_ms": {
            name: {
                "p50": round(percentile(values, 0.5) * 1000, 1),
                "p99": round(percentile(values, 0.99) * 1000, 1),
                "orders": len(values),
            }
            for name, values in phases.items()
        },
        "console_page_ms": {
            "pages": len(served),
            "median": round(statistics.median(served) * 1000, 1) if served else None,
            "p99": round(percentile(served, 0.99) * 1000, 1) if served else None,
        },
        "rounds_detail": per_round,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="orders per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preload", type=int, default=6000, help="orders delivered first")
    args = parser.parse_args()
    result = asyncio.run(run(args.rate, args.seconds, args.rounds, args.preload))
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "console_load.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
