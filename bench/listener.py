"""How fast does the listener answer Eneba's PROVIDE? `python -m bench.listener [--orders 12000]`.

Two servers, each in a process of its own, loaded by the same client in this process with
100 concurrent callbacks (keep-alive connections, as a platform's sender keeps them):

- hello: aiohttp's own hello world (one POST route answering a small JSON) on the same
  machine, the ceiling for any aiohttp server here;
- listener: the agent's listener with Eneba's routes on a SQLite ledger holding --orders
  reservations: each order's first PROVIDE (a ledger write: the lines move to `provided`,
  the reply is sealed and committed before it is sent), half as a sustained load and half in
  bursts of 100 sent at once (a sale's callbacks arriving together), then as many repeated
  PROVIDEs (retries: the stored reply replayed, read without the write lock).

"Sustained": 100 clients each sending the next request as soon as its reply is in, so
latency is queueing (Little's law: 100 / throughput). "Bursts": 100 at once, the next burst
once all are answered: each reply's time from a burst's start.

Reported per phase: replies' p50/p99/max latency and throughput, the server process's CPU
time per reply (all its threads, from /proc: what a reply costs, which other work on the
machine does not change, where throughput and latency swing with it), and the listener's
throughput over hello's (the ratio). Figures also go to bench/results/listener.json with the
machine's state (CPUs, load average before and after: other work on the machine weighs on
both servers alike, and is said).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from agent.domain import CardItem
from agent.stats import percentile
from agent.store.identity import Opening
from agent.store.ledger.responder import Want
from agent.store.sqlite import SQLiteStore

TOKEN = "YmVuY2gtY2FsbGJhY2stdG9rZW4="
AUCTION = "b0b0b0b0-0000-11ee-be56-0242ac120002"
SKU = "GAME-100"
MASTER_KEY = "a2FtaS1hZ2VudCBiZW5jaCBzdG9yZSBrZXkgMzIgYnk="
CONCURRENCY = 100
RESULTS = Path(__file__).resolve().parent / "results" / "listener.json"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the servers (run as `python -m bench.listener --serve KIND --port P [--db PATH]`) -------
async def serve_hello(port: int) -> None:
    from aiohttp import web

    async def hello(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(body=b'{"hello":"world"}', content_type="application/json")

    # aiohttp's low-level server, as the listener's: no router, no middleware, no access log.
    server = web.Server(hello, access_log=None)
    await asyncio.get_running_loop().create_server(server, "127.0.0.1", port)
    await asyncio.Event().wait()


async def serve_listener(port: int, db: Path) -> None:
    from agent import logs
    from agent.config import PlatformSettings
    from agent.keybox import parse_master_key
    from agent.listener import Listener, listener_mounts
    from agent.listener_routes import ListenerContext
    from agent.listener_settings import ListenerSettings
    from agent.platforms.eneba import EnebaOptions, EnebaPlatform

    # As the daemon logs (`kami-agent run`): a JSON line per request at info, here to a file
    # beside the ledger. Unconfigured, structlog would render its colourful console lines,
    # a fifth of a reply's cost, which no daemon pays.
    logs.configure("info", (db.parent / "listener.log").open("a", encoding="utf-8"))
    store = SQLiteStore(db, parse_master_key(MASTER_KEY))
    await store.open()
    settings = PlatformSettings(
        name="bench",
        kind="eneba",
        base_url="http://127.0.0.1:9/graphql",
        api_key="bench",
        secret_name="bench.secret",
        options=None,
    )
    options = EnebaOptions(
        auctions={AUCTION: SKU},
        callback_token_secret="bench.callback",
        sweep_interval=3600.0,
        reconcile_after=86_400.0,
    )
    eneba = EnebaPlatform(settings, options, "bench-secret", TOKEN)
    context = ListenerContext(store, time.time)
    mounts = listener_mounts({"bench": eneba}, {"bench": "eneba"}, context)
    listener = Listener(ListenerSettings(port=port, max_connections=1000), mounts, store)
    await listener.start()
    await asyncio.Event().wait()


def start_server(kind: str, port: int, db: Path | None = None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "bench.listener", "--serve", kind, "--port", str(port)]
    if db is not None:
        args += ["--db", str(db)]
    return subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1])


async def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("the server never came up")


# --- the ledger ---------------------------------------------------------------------------
async def prepare(db: Path, orders: int) -> list[str]:
    from agent.keybox import parse_master_key

    store = SQLiteStore(db, parse_master_key(MASTER_KEY), opening=Opening.CREATE)
    await store.open()
    try:
        items = [
            CardItem(code="", secret=f"BENCH-{i:07d}-{random.getrandbits(48):012x}")
            for i in range(orders)
        ]
        await store.import_keys(SKU, items, "bench", time.time())
        ids = [f"order-{n:06d}" for n in range(orders)]
        for order in ids:
            await store.reserve(
                "bench", order, [Want(SKU, 1)], time.time(), lambda ok: (200, b"{}")
            )
    finally:
        await store.close()
    return ids


# --- the client -------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(port: int, bodies: list[bytes], pid: int) -> dict[str, Any]:
    """Posts every body, CONCURRENCY at a time; latency of each reply, and the throughput."""
    url = f"http://127.0.0.1:{port}/eneba/bench"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    times: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as http:
        # Warm the connections up (and the server's code paths) outside the measurement.
        async def warm() -> None:
            async with http.post(
                url, data=b'{"action":"CANCEL","orderId":"warm"}', headers=headers
            ) as resp:
                await resp.read()

        await asyncio.gather(*(warm() for _ in range(CONCURRENCY)))

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                async with http.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        failures += 1
                times.append(time.perf_counter() - started)

        began, cpu = time.perf_counter(), cpu_seconds(pid)
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed, cpu = time.perf_counter() - began, cpu_seconds(pid) - cpu
    ms = sorted(t * 1000 for t in times)
    return {
        "requests": len(times),
        "failures": failures,
        "seconds": round(elapsed, 3),
        "per_second": round(len(times) / elapsed, 1),
        "server_cpu_ms_per_reply": round(cpu * 1000 / len(times), 3),
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(ms[-1], 2),
    }


async def bursts(port: int, bodies: list[bytes]) -> dict[str, Any]:
    """The bodies in bursts of CONCURRENCY sent at once (a sale's callbacks arriving
    together), one burst after the other has been answered: each reply's latency."""
    url = f"http://127.0.0.1:{port}/eneba/bench"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    times: list[float] = []
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(body: bytes) -> None:
            started = time.perf_counter()
            async with http.post(url, data=body, headers=headers) as resp:
                await resp.read()
            times.append(time.perf_counter() - started)

        await asyncio.gather(
            *(one(b'{"action":"CANCEL","orderId":"warm"}') for _ in range(CONCURRENCY))
        )
        times.clear()
        for start in range(0, len(bodies), CONCURRENCY):
            await asyncio.gather(*(one(b) for b in bodies[start : start + CONCURRENCY]))
            await asyncio.sleep(0.05)
    ms = sorted(t * 1000 for t in times)
    return {
        "requests": len(times),
        "bursts": -(-len(bodies) // CONCURRENCY),
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(ms[-1], 2),
    }


def provide(order: str) -> bytes:
    return json.dumps({"action": "PROVIDE", "orderId": order}).encode()


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "sqlite": sqlite3.sqlite_version,
        "system": f"{platform.system()} {platform.release()}",
    }


async def bench(orders: int) -> dict[str, Any]:
    before = machine()
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "kami.db"
        ids = await prepare(db, orders)
        port = free_port()
        hello = start_server("hello", port)
        try:
            await wait_listening(port)
            hello_first = await load(port, [provide(o) for o in ids], hello.pid)
            hello_again = await load(port, [provide(random.choice(ids)) for _ in ids], hello.pid)
            hello_bursts = await bursts(port, [provide(o) for o in ids[: orders // 2]])
        finally:
            hello.terminate()
            hello.wait()
        port = free_port()
        server = start_server("listener", port, db)
        try:
            await wait_listening(port)
            half = orders // 2
            first = await load(port, [provide(o) for o in ids[:half]], server.pid)
            first_bursts = await bursts(port, [provide(o) for o in ids[half:]])
            replays = await load(port, [provide(random.choice(ids)) for _ in ids], server.pid)
        finally:
            server.terminate()
            server.wait()
        with sqlite3.connect(db) as conn:
            states = dict(conn.execute("SELECT state, COUNT(*) FROM orders GROUP BY state"))
    hello_rate = (hello_first["per_second"] + hello_again["per_second"]) / 2
    return {
        "what": "Eneba PROVIDE replies through the listener (SQLite ledger) vs aiohttp's hello"
        " world, 100 concurrent keep-alive callbacks, client in another process",
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "orders": orders,
        "concurrency": CONCURRENCY,
        "hello": {"first_pass": hello_first, "second_pass": hello_again, "bursts": hello_bursts},
        "provide_first": first,
        "provide_first_bursts": first_bursts,
        "provide_replayed": replays,
        "ratio_first_vs_hello": round(first["per_second"] / hello_rate, 2),
        "ratio_replayed_vs_hello": round(replays["per_second"] / hello_rate, 2),
        "ledger_states_after": states,
        "machine_before": before,
        "machine_after": machine(),
        "targets": {"p99_ms": 50, "ratio": 0.5},
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every run, and the median of each headline figure across them (the machine's load
    moves between runs: the spread is part of the result)."""

    def median(path: tuple[str, ...]) -> float:
        values = []
        for run in runs:
            value: Any = run
            for key in path:
                value = value[key]
            values.append(float(value))
        return sorted(values)[len(values) // 2]

    return {
        "median": {
            "hello_per_second": median(("hello", "first_pass", "per_second")),
            "hello_p99_ms": median(("hello", "first_pass", "p99_ms")),
            "hello_bursts_p99_ms": median(("hello", "bursts", "p99_ms")),
            "provide_per_second": median(("provide_first", "per_second")),
            "provide_p99_ms": median(("provide_first", "p99_ms")),
            "provide_bursts_p99_ms": median(("provide_first_bursts", "p99_ms")),
            "replayed_per_second": median(("provide_replayed", "per_second")),
            "replayed_p99_ms": median(("provide_replayed", "p99_ms")),
            "hello_cpu_ms_per_reply": median(("hello", "first_pass", "server_cpu_ms_per_reply")),
            "provide_cpu_ms_per_reply": median(("provide_first", "server_cpu_ms_per_reply")),
            "replayed_cpu_ms_per_reply": median(("provide_replayed", "server_cpu_ms_per_reply")),
            "ratio_first_vs_hello": median(("ratio_first_vs_hello",)),
            "ratio_replayed_vs_hello": median(("ratio_replayed_vs_hello",)),
        },
        "runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--orders", type=int, default=12_000)
    parser.add_argument("--runs", type=int, default=3, help="whole runs, each reported")
    parser.add_argument("--serve", choices=("hello", "listener"))
    parser.add_argument("--port", type=int)
    parser.add_argument("--db", type=Path)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.serve == "hello":
        asyncio.run(serve_hello(args.port))
        return 0
    if args.serve == "listener":
        from agent import logs

        with open(os.devnull, "w") as sink:  # a log line per request, as in production
            logs.configure("info", sink)
            asyncio.run(serve_listener(args.port, args.db))
        return 0
    from agent import logs

    with open(os.devnull, "w") as sink:
        logs.configure("warning", sink)
        runs = [asyncio.run(bench(args.orders)) for _ in range(args.runs)]
    result = summary(runs)
    print(json.dumps(result, indent=2))
    if not args.no_save:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
