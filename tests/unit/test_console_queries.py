"""The console's figures from the ledger itself (issue 18, item 1): "delivered today" exact and
its latency p50/p99 from one read over the delivered lines since midnight (the delivered
state's partial index), and the orders page's SKU/platform filters run by the database."""

from __future__ import annotations

import time

from agent.console.data import read_overview, search_lines, start_of_day
from agent.domain import LineState, PlatformOrder
from agent.stats import percentile
from agent.store.base import Store

# More than the 1,000 delivered lines the console used to sample (it showed "1000+").
TODAY = 1_050


async def test_delivered_today_is_exact_with_its_latency(store: Store) -> None:
    now = time.time()
    midnight = start_of_day(now)
    seen = midnight + 100.0
    old = await store.ingest("main", [PlatformOrder("Y-1", "paid", "A", 1)], midnight - 500)
    await store.mark_delivered(old[0], midnight - 10, "yesterday")  # not today
    orders = [PlatformOrder(f"T-{i}", "paid", "A", 1) for i in range(TODAY)]
    ids = await store.ingest("main", orders, seen)
    latencies = []
    for n, line_id in enumerate(ids):
        latency = 0.25 * ((n * 7919) % TODAY)  # distinct, not in id order
        latencies.append(latency)
        await store.mark_delivered(line_id, seen + latency, "ok")
    (waiting,) = await store.ingest("main", [PlatformOrder("W-1", "paid", "A", 1)], seen)
    assert waiting  # a line not delivered counts for nothing
    exact = await store.delivered_since(midnight)
    assert exact.count == TODAY
    assert exact.p50 == percentile(latencies, 0.50)
    assert exact.p99 == percentile(latencies, 0.99)
    overview = await read_overview(store, now)
    assert overview.delivered_today == TODAY and not overview.delivered_today_more
    assert (overview.latency_p50, overview.latency_p99) == (exact.p50, exact.p99)
    empty = await store.delivered_since(now + 86_400)
    assert (empty.count, empty.p50, empty.p99) == (0, None, None)


async def test_the_orders_filters_run_in_the_database(store: Store) -> None:
    rare = await store.ingest("other", [PlatformOrder("R-1", "paid", "RARE", 1)], 1.0)
    await store.ingest(
        "main", [PlatformOrder(f"C-{i}", "paid", "COMMON", 1) for i in range(30)], 2.0
    )
    await store.ingest("other", [PlatformOrder("C-X", "paid", "COMMON", 1)], 3.0)
    assert [ln.id for ln in await store.filter_lines(None, "RARE", "", 5)] == rare
    on_other = await store.filter_lines(None, "", "other", 10)
    assert [ln.order_id for ln in on_other] == ["C-X", "R-1"]  # newest first
    both = await store.filter_lines(LineState.NEW, "COMMON", "main", 3)
    every = await store.filter_lines(None, "COMMON", "main", 100)
    assert len(every) == 30 and all(ln.platform == "main" for ln in every)
    assert [ln.id for ln in both] == sorted((ln.id for ln in every), reverse=True)[:3]
    assert await store.filter_lines(LineState.DELIVERED, "COMMON", "", 3) == []
    assert len(await store.filter_lines(None, "", "", 100)) == 32
    # The page: an old line of a rare SKU is found however many newer lines there are.
    page = await search_lines(store, "", None, "RARE", "", 50)
    assert [ln.order_id for ln in page] == ["R-1"]
