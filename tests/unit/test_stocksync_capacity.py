"""What the stock sync publishes: the fillable count (agent/stockcapacity.py), its coalescing,
and a SKU shared by two platforms (agent/stocksync.py)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from agent import stocksync
from agent.config import SkuSettings
from agent.domain import StockPosition
from agent.platforms.http import HttpPlatform
from agent.sandbox.platform import SandboxPlatform
from agent.stockcapacity import capacities, fillable
from agent.stocksync import DECREASE_SPACING, INCREASE_SPACING, REPUBLISH_EVERY, Outlet, StockSync
from agent.store.base import Store
from agent.suppliers.base import SupplierProduct
from tests.conftest import make_config, platform_settings, stock


@functools.cache
def can_strand(bins: tuple[int, ...], budget: int, most: int) -> bool:
    """Whether some sequence of orders (1..most units each, `budget` units in all), each put
    in any bin that holds all of it, can leave an order that no bin holds."""
    for quantity in range(1, min(most, budget) + 1):
        fits = [i for i, size in enumerate(bins) if size >= quantity]
        if not fits:
            return True
        for i in fits:
            rest = tuple(sorted((*bins[:i], bins[i] - quantity, *bins[i + 1 :])))
            if can_strand(rest, budget - quantity, most):
                return True
    return False


def test_the_fillable_count_strands_no_order_whatever_the_sequence() -> None:
    for count in (1, 2, 3):
        for bins in itertools.product(range(7), repeat=count):
            for most in range(1, 5):
                safe = fillable(bins, most)
                assert not can_strand(tuple(sorted(bins)), safe, most), (bins, most, safe)
                assert max(bins, default=0) <= safe <= sum(bins)
    # The plain sum would: two bins of 2 cannot hold an order of 3.
    assert can_strand((2, 2), 4, 3)
    assert fillable((2, 2), 3) == 2
    assert fillable((40,), 10) == 40  # one bin never strands
    assert fillable((), 10) == 0


def sku(name: str = "G", **overrides: object) -> SkuSettings:
    values: dict[str, object] = {"sku": name, "max_quantity": 1}
    values.update(overrides)
    return SkuSettings(**values)  # type: ignore[arg-type]


def position(
    free: dict[str, int] | None = None,
    waiting: dict[str, int] | None = None,
    bought: dict[tuple[str, str], int] | None = None,
) -> StockPosition:
    return StockPosition(free=free or {}, waiting=waiting or {}, bought=bought or {})


def offer(price: str = "5.00", available: int | None = 100) -> SupplierProduct:
    return SupplierProduct(Decimal(price), "CNY", available)


def test_local_keys_less_the_lines_waiting_for_keys() -> None:
    skus = {"G": sku()}
    assert capacities(skus, position({"G": 10}, {"G": 3}), {}, {}) == {"G": 7}
    assert capacities(skus, position({"G": 2}, {"G": 3}), {}, {}) == {"G": 0}
    # A SKU bought upstream only never takes local keys.
    upstream_only = {"G": sku(sources=("up",), max_price=Decimal("6"))}
    assert capacities(upstream_only, position({"G": 10}), {}, {}) == {"G": 0}


def test_a_supplier_counts_only_what_it_says_it_sells_within_max_price() -> None:
    skus = {"G": sku(sources=("local", "up"), max_price=Decimal("6.00"))}
    balances = {"up": Decimal("1000")}
    at = position({"G": 10})
    assert capacities(skus, at, {("up", "G"): offer()}, balances) == {"G": 110}
    assert capacities(skus, at, {("up", "G"): offer(available=None)}, balances) == {"G": 10}
    assert capacities(skus, at, {("up", "G"): offer("6.01")}, balances) == {"G": 10}
    assert capacities(skus, at, {}, balances) == {"G": 10}  # it did not answer
    assert capacities(skus, at, {("up", "G"): offer()}, {}) == {"G": 10}  # balance unknown
    no_cap = {"G": sku(sources=("local", "up"))}
    assert capacities(no_cap, at, {("up", "G"): offer()}, balances) == {"G": 10}
    # Bought since the supplier was read: fewer left there, and less money.
    since = position({"G": 10}, bought={("up", "G"): 30})
    assert capacities(skus, since, {("up", "G"): offer()}, balances) == {"G": 80}
    poor = {"up": Decimal("60")}  # 10 keys at max_price
    assert capacities(skus, at, {("up", "G"): offer()}, poor) == {"G": 20}


def test_a_balance_is_shared_out_between_the_skus_bought_with_it() -> None:
    skus = {name: sku(name, sources=("up",), max_price=Decimal("1.00")) for name in ("A", "B", "C")}
    offers = {
        ("up", "A"): offer("1", 100),
        ("up", "B"): offer("1", 100),
        ("up", "C"): offer("1", 2),
    }
    counts = capacities(skus, position(), offers, {"up": Decimal("10")})
    assert sum(counts.values()) <= 10
    assert counts["C"] == 2 and counts["A"] > 0 and counts["B"] > 0
    # A purchase since of a SKU without max_price may have cost anything.
    skus["D"] = sku("D", sources=("up",))
    spent = position(bought={("up", "D"): 1})
    assert capacities(skus, spent, offers, {"up": Decimal("10")})["A"] == 0


def test_lower_counts_go_out_sooner_than_higher_ones() -> None:
    outlet = Outlet(value=10, as_of="7", exposure=10, sent_at=100.0)
    soon = 100.0 + DECREASE_SPACING
    assert outlet.due(9, soon, "7") and not outlet.due(11, soon, "7")
    assert outlet.due(11, 100.0 + INCREASE_SPACING, "7")
    assert not outlet.due(10, 100.0 + INCREASE_SPACING, "7")
    assert outlet.due(10, 100.0 + REPUBLISH_EVERY, "7")
    # The same count as of a later cursor: the platform shows it less the sales since "7".
    assert not outlet.due(10, soon, "9") and outlet.due(10, 100.0 + INCREASE_SPACING, "9")
    assert Outlet().due(5, 0.0)  # never published: at once
    assert not Outlet(retry_at=5.0).due(5, 1.0)
    assert not Outlet(off=True).due(5, 1e9)


@pytest.fixture
async def second_sandbox() -> AsyncIterator[SandboxPlatform]:
    platform = SandboxPlatform(api_key="test-key", secret="test-secret", seed=2)
    await platform.start()
    yield platform
    await platform.stop()


async def test_a_sku_on_two_platforms_is_shared_never_sold_twice(
    tmp_path: Path,
    sandbox: SandboxPlatform,
    second_sandbox: SandboxPlatform,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stocksync, "DECREASE_SPACING", 0.0)
    monkeypatch.setattr(stocksync, "INCREASE_SPACING", 0.0)
    config = make_config(tmp_path, sandbox.base_url)
    one = HttpPlatform(platform_settings(sandbox.base_url, name="one"), sandbox.secret)
    two = HttpPlatform(platform_settings(second_sandbox.base_url, name="two"), "test-secret")
    skus = {"GAME-100": config.skus["GAME-100"]}
    sync = StockSync(skus, store, {"one": one, "two": two}, {})
    for name in ("one", "two"):
        await store.set_cursor(name, "0", 0.0)
    await stock(store, "GAME-100", 10)
    try:
        shown: list[tuple[int, int]] = []
        for _ in range(4):
            await sync.step()
            shown.append(
                (sandbox.shown_stock("GAME-100") or 0, second_sandbox.shown_stock("GAME-100") or 0)
            )
        assert all(a + b <= 10 for a, b in shown), shown  # never more than can be filled
        assert shown[-1] == (5, 5)
        # The first platform sells out its share; the agent has not listed those orders.
        assert all(sandbox.try_buy("GAME-100") is not None for _ in range(5))
        assert sandbox.try_buy("GAME-100") is None
        await sync.step()
        assert second_sandbox.shown_stock("GAME-100") == 5  # 5 + 5 sold: all 10 keys
    finally:
        await one.close()
        await two.close()


async def test_a_failed_publication_is_tried_again_later(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stocksync, "RETRY_BASE", 0.0)
    monkeypatch.setattr(stocksync, "DECREASE_SPACING", 0.0)
    config = make_config(tmp_path, sandbox.base_url)
    platform = HttpPlatform(platform_settings(sandbox.base_url), sandbox.secret)
    sync = StockSync({"GAME-100": config.skus["GAME-100"]}, store, {"main": platform}, {})
    await store.set_cursor("main", "0", 0.0)
    await stock(store, "GAME-100", 4)
    try:
        sandbox.faults.error_rate = 1.0  # 503: the PUT may or may not have been applied
        await sync.step()
        assert sandbox.stock == {}
        outlet = sync.outlets["main", "GAME-100"]
        assert outlet.value is None and outlet.failures == 1
        sandbox.faults.error_rate = 0.0
        await sync.step()
        assert sandbox.shown_stock("GAME-100") == 4 and outlet.value == 4
    finally:
        await platform.close()
