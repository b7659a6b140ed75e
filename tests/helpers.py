"""Shared helpers for the in-process end-to-end tests."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from agent.config import Config
from agent.domain import LineState
from agent.platforms.http import HttpPlatform
from agent.runtime import platform_connections, run_engine
from agent.sandbox.platform import SandboxPlatform
from agent.sandbox.supplier import SandboxSupplier
from agent.store.base import Store
from agent.suppliers.base import Supplier
from tests.conftest import platform_settings


def ledger_bytes(folder: Path) -> bytes:
    """The ledger and its WAL, as bytes on disk (for scans for clear-text secrets)."""
    return b"".join(p.read_bytes() for p in folder.glob("kami.db*"))


SAFETY_TIMEOUT = 30.0  # a hang guard, not a performance assertion


async def wait_for(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def line_state_is(store: Store, order_id: str, state: LineState) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        lines = await store.find_lines(order_id)
        return bool(lines) and lines[0].state == state

    return check


@asynccontextmanager
async def running_agent(
    config: Config,
    store: Store,
    sandbox: SandboxPlatform,
    suppliers: Mapping[str, Supplier] | None = None,
    **platform: object,
) -> AsyncIterator[None]:
    """`platform`: settings of the platform adapter that differ from the tests' usual ones.
    The supplier adapters given are closed on the way out, like the platform's."""
    adapter = HttpPlatform(
        platform_settings(sandbox.base_url, **platform),
        sandbox.secret,
        platform_connections(config.agent),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_engine(config, store, {"main": adapter}, stop, suppliers))
    try:
        yield
    finally:
        stop.set()
        await task
        await adapter.close()
        for supplier in (suppliers or {}).values():
            await supplier.close()


def delivered_all(sandbox: SandboxPlatform, ids: list[str]) -> Callable[[], bool]:
    return lambda: all(sandbox.orders[i].delivery is not None for i in ids)


def assert_platform_invariants(sandbox: SandboxPlatform) -> None:
    delivered = sandbox.delivered_secrets()
    for order_id, secrets in delivered.items():
        assert len(set(secrets)) == sandbox.orders[order_id].data["quantity"], order_id
    everything = Counter(s for secrets in delivered.values() for s in secrets)
    assert [k for k, n in everything.items() if n > 1] == []
    keys_per_order: dict[str, set[str]] = {}
    for call in sandbox.delivery_calls:
        keys_per_order.setdefault(call.order_id, set()).add(call.idempotency_key)
    assert all(len(k) == 1 for k in keys_per_order.values()), "re-sent with another key"


def assert_exactly_once(
    sandbox: SandboxPlatform,
    upstream: SandboxSupplier,
    imported: dict[str, set[str]],
    bought_sku: str,
    orders: int,
) -> Counter[str]:
    """The end-to-end invariants, from the platform's and the supplier's side; returns how
    often each key was delivered (always once)."""
    # 1. Every paid order has exactly its quantity of distinct keys, all from our stock.
    delivered = sandbox.delivered_secrets()
    assert len(delivered) == orders
    stock = dict(imported)
    stock[bought_sku] = {item["secret"] for p in upstream.charged for item in p.items}
    for order_id, secrets in delivered.items():
        order = sandbox.orders[order_id].data
        assert len(secrets) == len(set(secrets)) == order["quantity"], order_id
        assert set(secrets) <= stock[order["sku"]], order_id
    # 2. Never bought twice for one need: one charged purchase per bought order, all delivered.
    bought_orders = [o for o in sandbox.orders.values() if o.data["sku"] == bought_sku]
    assert len(upstream.charged) == len(bought_orders) > 0
    assert stock[bought_sku] == {s for o in bought_orders for s in delivered[o.data["id"]]}
    # 3. No key went to two orders.
    usage = Counter(s for secrets in delivered.values() for s in secrets)
    assert max(usage.values()) == 1
    # 4. The platform only ever saw re-sends with the same idempotency key and the same keys.
    calls: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
    for call in sandbox.delivery_calls:
        calls.setdefault(call.order_id, set()).add(
            (call.idempotency_key, tuple(sorted(call.secrets)))
        )
    assert all(len(variants) == 1 for variants in calls.values())
    assert not [c for c in sandbox.delivery_calls if c.outcome == "conflict"]
    return usage
