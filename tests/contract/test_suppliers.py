"""Buying keys upstream: the HTTP supplier adapter and the engine's purchase state machine,
against the sandbox supplier (and platform) on loopback."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from agent.config import Config, SkuSettings, SupplierSettings
from agent.domain import Ambiguous, LineState, PurchaseState
from agent.sandbox.platform import SandboxPlatform
from agent.sandbox.supplier import SandboxSupplier
from agent.store.base import Store
from agent.suppliers.http import HttpSupplier
from tests.conftest import make_config, stock
from tests.helpers import (
    assert_platform_invariants,
    delivered_all,
    line_state_is,
    running_agent,
    wait_for,
)


def supplier_settings(name: str, base_url: str, **overrides: object) -> SupplierSettings:
    values: dict[str, object] = {
        "name": name,
        "kind": "http",
        "base_url": base_url,
        "api_key": "supplier",
        "secret_name": f"supplier.{name}.secret",
        "timeout": 0.5,
        "query_grace": 0.2,
        "processing_poll": 0.05,
        "unknown_window": 30.0,
    }
    values.update(overrides)
    return SupplierSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def upstream() -> AsyncIterator[SandboxSupplier]:
    supplier = SandboxSupplier(name="up", seed=3, secret="up-secret")
    supplier.add_product("GAME-100", price="5.00")
    await supplier.start()
    yield supplier
    await supplier.stop()


@pytest.fixture
async def backup() -> AsyncIterator[SandboxSupplier]:
    supplier = SandboxSupplier(name="bk", seed=4, secret="bk-secret")
    supplier.add_product("GAME-100", price="6.00")
    await supplier.start()
    yield supplier
    await supplier.stop()


def adapter(sandbox: SandboxSupplier, **overrides: object) -> HttpSupplier:
    return HttpSupplier(
        supplier_settings(sandbox.name, sandbox.base_url, **overrides), sandbox.secret
    )


def with_suppliers(
    config: Config,
    sources: tuple[str, ...],
    *settings: SupplierSettings,
    max_price: str | None = None,
) -> Config:
    sku = SkuSettings(
        sku="GAME-100",
        max_quantity=10,
        sources=sources,
        max_price=Decimal(max_price) if max_price else None,
    )
    return dataclasses.replace(
        config, skus={**config.skus, "GAME-100": sku}, suppliers=tuple(settings)
    )


# --- the adapter -------------------------------------------------------------------------------


async def test_adapter_purchase_is_idempotent_by_reference(upstream: SandboxSupplier) -> None:
    client = adapter(upstream)
    try:
        first = await client.purchase("ref-1", "GAME-100", 2, Decimal("9.00"))
        again = await client.purchase("ref-1", "GAME-100", 2, Decimal("9.00"))
        assert first.status == "completed" and len(first.items) == 2
        assert again == first
        assert len(upstream.charged) == 1
        assert await client.find_purchase("ref-1") == first
        assert await client.find_purchase("never") is None
        assert (await client.balance()).amount == Decimal("99990.00")
    finally:
        await client.close()


async def test_adapter_reports_definite_failures(upstream: SandboxSupplier) -> None:
    client = adapter(upstream)
    try:
        expensive = await client.purchase("r1", "GAME-100", 1, Decimal("1.00"))
        assert (expensive.status, expensive.failure_code) == ("failed", "price_changed")
        upstream.available["GAME-100"] = 0
        empty = await client.purchase("r2", "GAME-100", 1, None)
        assert empty.failure_code == "out_of_stock"
        upstream.available["GAME-100"] = None
        upstream.balance = Decimal("1")
        broke = await client.purchase("r3", "GAME-100", 1, None)
        assert broke.failure_code == "insufficient_balance"
        assert upstream.charged == []
    finally:
        await client.close()


async def test_adapter_lost_and_stalled_responses_are_ambiguous(upstream: SandboxSupplier) -> None:
    client = adapter(upstream, timeout=0.3)
    try:
        upstream.faults.drop_after_commit_rate = 1.0
        with pytest.raises(Ambiguous):
            await client.purchase("lost", "GAME-100", 1, None)
        upstream.faults.drop_after_commit_rate = 0.0
        upstream.faults.stall_after_commit_rate = 1.0
        with pytest.raises(Ambiguous):
            await client.purchase("stalled", "GAME-100", 1, None)
        upstream.faults.stall_after_commit_rate = 0.0
        assert len(upstream.charged) == 2  # both went through; the agent must ask, not rebuy
        assert (await client.find_purchase("lost")) is not None
    finally:
        await client.close()


# --- the engine ------------------------------------------------------------------------------


async def test_buys_when_local_stock_is_empty(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, upstream: SandboxSupplier
) -> None:
    await stock(store, "GAME-100", 3)
    ids = [sandbox.add_order("GAME-100", quantity=1 + i % 2) for i in range(10)]
    config = with_suppliers(
        make_config(tmp_path, sandbox.base_url),
        ("local", "up"),
        supplier_settings("up", upstream.base_url),
    )
    async with running_agent(config, store, sandbox, {"up": adapter(upstream)}):
        await wait_for(delivered_all(sandbox, ids), "deliveries")
    assert_platform_invariants(sandbox)
    bought = sum(p.quantity for p in upstream.charged)
    assert bought == sum(sandbox.orders[i].data["quantity"] for i in ids) - 3
    counts = (await store.stock_counts())[0]
    assert counts.free == 0 and counts.bound == bought + 3


async def test_lost_responses_never_buy_twice(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, upstream: SandboxSupplier
) -> None:
    upstream.faults.drop_after_commit_rate = 0.2
    upstream.faults.stall_after_commit_rate = 0.05
    upstream.faults.error_rate = 0.1
    ids = [sandbox.add_order("GAME-100") for _ in range(60)]
    config = with_suppliers(
        make_config(tmp_path, sandbox.base_url), ("up",), supplier_settings("up", upstream.base_url)
    )
    async with running_agent(config, store, sandbox, {"up": adapter(upstream)}):
        await wait_for(delivered_all(sandbox, ids), "deliveries")
    assert_platform_invariants(sandbox)
    # exactly one charged purchase per order that needed one
    assert len(upstream.charged) == len(ids)
    assert len({p.merchant_ref for p in upstream.charged}) == len(ids)
    assert sorted(s for secrets in sandbox.delivered_secrets().values() for s in secrets) == sorted(
        item["secret"] for p in upstream.charged for item in p.items
    )


async def test_fails_over_to_the_next_supplier(
    tmp_path: Path,
    sandbox: SandboxPlatform,
    store: Store,
    upstream: SandboxSupplier,
    backup: SandboxSupplier,
) -> None:
    upstream.available["GAME-100"] = 0
    order_id = sandbox.add_order("GAME-100", quantity=2)
    config = with_suppliers(
        make_config(tmp_path, sandbox.base_url),
        ("local", "up", "bk"),
        supplier_settings("up", upstream.base_url),
        supplier_settings("bk", backup.base_url),
        max_price="8.00",
    )
    suppliers = {"up": adapter(upstream), "bk": adapter(backup)}
    async with running_agent(config, store, sandbox, suppliers):
        await wait_for(delivered_all(sandbox, [order_id]), "delivery")
    (line,) = await store.find_lines(order_id)
    attempts = await store.purchases_for(line.id)
    assert [(p.supplier, p.state) for p in attempts] == [
        ("up", PurchaseState.FAILED),
        ("bk", PurchaseState.COMPLETED),
    ]
    assert "out_of_stock" in (attempts[0].failure or "")
    assert upstream.charged == [] and len(backup.charged) == 1


async def test_processing_purchases_complete_later(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, upstream: SandboxSupplier
) -> None:
    upstream.faults.processing_rate = 1.0
    upstream.faults.processing_seconds = 0.3
    ids = [sandbox.add_order("GAME-100") for _ in range(5)]
    config = with_suppliers(
        make_config(tmp_path, sandbox.base_url), ("up",), supplier_settings("up", upstream.base_url)
    )
    async with running_agent(config, store, sandbox, {"up": adapter(upstream)}):
        await wait_for(delivered_all(sandbox, ids), "deliveries")
    assert len(upstream.charged) == 5
    events = [e.kind for e in await store.events((await store.find_lines(ids[0]))[0].id)]
    assert "purchase_processing" in events and "purchase_completed" in events


async def test_unknown_outcome_parks_instead_of_buying_again(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, upstream: SandboxSupplier
) -> None:
    upstream.faults.drop_after_commit_rate = 1.0
    order_id = sandbox.add_order("GAME-100")
    settings = supplier_settings("up", upstream.base_url, unknown_window=1.0)
    config = with_suppliers(make_config(tmp_path, sandbox.base_url), ("up",), settings)
    async with running_agent(config, store, sandbox, {"up": adapter(upstream)}):
        await wait_for(lambda: len(upstream.purchases) == 1, "the purchase")
        upstream.faults.down = True  # and now the supplier cannot even be asked
        await wait_for(line_state_is(store, order_id, LineState.NEEDS_ATTENTION), "parked")
    (line,) = await store.find_lines(order_id)
    assert "unknown outcome" in (line.reason or "") and "no second purchase" in (line.reason or "")
    assert len(upstream.purchases) == 1
    # once the supplier answers again, an operator retry resolves it without a new purchase
    upstream.faults.down = False
    upstream.faults.drop_after_commit_rate = 0.0
    await store.retry_line(line.id, 0.0)
    async with running_agent(config, store, sandbox, {"up": adapter(upstream)}):
        await wait_for(delivered_all(sandbox, [order_id]), "delivery after retry")
    assert len(upstream.purchases) == 1


async def test_backorders_fill_when_the_supplier_recovers(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, upstream: SandboxSupplier
) -> None:
    upstream.available["GAME-100"] = 0
    ids = [sandbox.add_order("GAME-100") for _ in range(3)]
    config = with_suppliers(
        make_config(tmp_path, sandbox.base_url, supplier_retry_interval=0.2),
        ("local", "up"),
        supplier_settings("up", upstream.base_url),
    )
    async with running_agent(config, store, sandbox, {"up": adapter(upstream)}):
        for order_id in ids:
            await wait_for(line_state_is(store, order_id, LineState.BACKORDERED), "backorder")
        upstream.available["GAME-100"] = None  # restocked upstream
        await wait_for(delivered_all(sandbox, ids), "backfill")
    assert len(upstream.charged) == 3


async def test_supplier_first_sku_buys_even_with_local_stock(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, upstream: SandboxSupplier
) -> None:
    await stock(store, "GAME-100", 5)
    order_id = sandbox.add_order("GAME-100")
    config = with_suppliers(
        make_config(tmp_path, sandbox.base_url),
        ("up", "local"),
        supplier_settings("up", upstream.base_url),
    )
    async with running_agent(config, store, sandbox, {"up": adapter(upstream)}):
        await wait_for(delivered_all(sandbox, [order_id]), "delivery")
    assert len(upstream.charged) == 1
    assert (await store.stock_counts())[0].free == 5
