"""What the console's pages show, read from the ledger through the Store port only.

"Delivered today" and its latency p50/p99 are one exact read over the lines delivered since
midnight (Store.delivered_since); the orders page's filters run in the database.

Reads share the ledger with delivery (on SQLite they ride in the writer's group commit), so
the pages reuse what they read for CACHE_SECONDS: a console left open and refreshed every
second costs the ledger one overview and one stock read every ten seconds, each a few
milliseconds (bench/console_load.py measures what that does to deliveries' latency).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from agent.alerts import Forecaster
from agent.config import Config
from agent.domain import ACTIVE_STATES, LineState, OpenAlert, OrderLine
from agent.forecast import SkuForecast
from agent.store.base import Store
from agent.suppliers.base import Balance

DELIVERED_SAMPLE = 1_000
# Pages polled every second must not read the ledger every second: figures are reused this
# long (the delivery engine has the ledger to itself in between).
CACHE_SECONDS = 10.0


class EngineView(Protocol):
    """What the console reads from the running engine (None in tests without one)."""

    balances: dict[str, Balance]

    def snapshot(self) -> dict[str, Any]:
        """The engine's figures now: delivered, parked, retries, backlog."""

    def dispatch(self, line_ids: Sequence[int]) -> None:
        """Queues lines an operator action made ready for the engine's workers at once."""


@dataclass(frozen=True, slots=True)
class Overview:
    delivered_today: int
    delivered_today_more: bool  # more than the sample read: the count is a lower bound
    backlog: int
    by_state: Mapping[LineState, int]
    latency_p50: float | None
    latency_p99: float | None
    latency_count: int
    alerts: Sequence[OpenAlert]
    read_at: float


def start_of_day(now: float) -> float:
    moment = datetime.fromtimestamp(now)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def delivery_latency(line: OrderLine) -> float | None:
    """Seconds from the ledger first seeing the order to its delivery being recorded."""
    if line.delivered_at is None:
        return None
    return max(0.0, line.delivered_at - line.seen_at)


async def read_overview(store: Store, now: float) -> Overview:
    by_state = await store.count_by_state()
    # Exact, from one read over the delivered lines since midnight (their partial index).
    today = await store.delivered_since(start_of_day(now))
    return Overview(
        delivered_today=today.count,
        delivered_today_more=False,  # the count is exact: never a lower bound now
        backlog=sum(n for state, n in by_state.items() if state in ACTIVE_STATES),
        by_state=by_state,
        latency_p50=today.p50,
        latency_p99=today.p99,
        latency_count=today.count,
        alerts=await store.open_alerts(),
        read_at=now,
    )


@dataclass(frozen=True, slots=True)
class StockRow:
    forecast: SkuForecast
    bound: int
    void: int
    lead_time: float
    configured: bool
    sales: Sequence[tuple[float, int]]  # (time, units) over the chart's range


async def read_stock(
    config: Config,
    store: Store,
    balances: Mapping[str, Balance],
    clock: Callable[[], float],
    since: float,
) -> list[StockRow]:
    forecasts = await Forecaster(config, store, clock).forecast(balances)
    counts = {c.sku: c for c in await store.stock_counts()}
    sales: dict[str, list[tuple[float, int]]] = {}
    for sku, at, quantity in await store.demand_since(since):
        sales.setdefault(sku, []).append((at, quantity))
    rows = []
    for f in forecasts:
        count = counts.get(f.sku)
        settings = config.skus.get(f.sku)
        rows.append(
            StockRow(
                forecast=f,
                bound=count.bound if count else 0,
                void=count.void if count else 0,
                lead_time=settings.lead_time if settings else 3600.0,
                configured=settings is not None,
                sales=sales.get(f.sku, []),
            )
        )
    return rows


async def search_lines(
    store: Store,
    query: str,
    state: LineState | None,
    sku: str,
    platform: str,
    limit: int,
) -> list[OrderLine]:
    """Order lines for the orders page: by order id or row id when `query` is given (then
    filtered here: a handful of lines), else the newest in `state`, of `sku`, on `platform`
    as the database filters them (no window: an old order of a rare SKU is found too)."""
    if not query:
        return await store.filter_lines(state, sku, platform, limit)
    lines = await store.find_lines(query)
    found = [
        ln
        for ln in lines
        if (state is None or ln.state == state)
        and (not sku or ln.sku == sku)
        and (not platform or ln.platform == platform)
    ]
    return found[:limit]


class TimedCache:
    """One value per key, reused for CACHE_SECONDS (monotonic time)."""

    def __init__(self, seconds: float = CACHE_SECONDS) -> None:
        self.seconds = seconds
        self._values: dict[str, tuple[float, Any]] = {}

    def get(self, key: str) -> Any | None:
        entry = self._values.get(key)
        if entry is None or time.monotonic() - entry[0] > self.seconds:
            return None
        return entry[1]

    def put(self, key: str, value: Any) -> None:
        if len(self._values) > 64:
            self._values.clear()
        self._values[key] = (time.monotonic(), value)

    def clear(self) -> None:
        self._values.clear()
