"""Stock kept true on the platform (issue 15, item 3): the real engine in-process publishes what
it can fill to the sandbox platform, which sells only that (platform-http v1.1), while
concurrent buyers run the stock to zero. Oversell 0: every order the platform took as paid is
delivered, no key twice, and the platform stops selling at 0."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path

import pytest

from agent import stocksync
from agent.config import SkuSettings
from agent.domain import LineState
from agent.platforms.http import HttpPlatform
from agent.sandbox.platform import SandboxPlatform
from agent.sandbox.supplier import SandboxSupplier
from agent.stocksync import StockSync
from agent.store.base import Store
from tests.conftest import make_config, platform_settings, stock
from tests.contract.test_suppliers import adapter, supplier_settings
from tests.helpers import assert_platform_invariants, running_agent, wait_for
from tests.unit.test_cli import cli

SKU = "GAME-100"
BUYERS = 6


class Buyers:
    """Several buyers at once, each buying 1-3 keys at a time as long as the platform sells."""

    def __init__(self, sandbox: SandboxPlatform, sku: str) -> None:
        self.sandbox = sandbox
        self.sku = sku
        self.orders: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._buy(i)) for i in range(BUYERS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    @property
    def units(self) -> int:
        return sum(self.sandbox.orders[o].data["quantity"] for o in self.orders)

    async def _buy(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            order_id = self.sandbox.try_buy(self.sku, rng.randint(1, 3))
            if order_id is not None:
                self.orders.append(order_id)
            await asyncio.sleep(rng.uniform(0.005, 0.04))


@pytest.fixture
def quick_suppliers(monkeypatch: pytest.MonkeyPatch) -> None:
    """One agent, one clock: the suppliers are read often and purchases counted from then."""
    monkeypatch.setattr(stocksync, "SUPPLIER_REFRESH", 0.2)
    monkeypatch.setattr(stocksync, "CLOCK_MARGIN", 0.0)


async def settled(store: Store, orders: int) -> bool:
    """Every order taken in, and none still on its way (delivered, or stuck for want of keys)."""
    counts = await store.count_by_state()
    final = (LineState.DELIVERED, LineState.BACKORDERED, LineState.NEEDS_ATTENTION)
    return sum(counts.values()) == orders and sum(counts.get(s, 0) for s in final) == orders


async def sell_out(sandbox: SandboxPlatform, store: Store, capacity: int) -> Buyers:
    """Buyers at work until everything that can be filled is sold; then checks that the
    platform sells no more and that every paid order was delivered."""
    buyers = Buyers(sandbox, SKU)
    buyers.start()
    try:
        await wait_for(lambda: buyers.units >= capacity, "the stock sold out")
    finally:
        await buyers.stop()
    assert buyers.units == capacity  # not one key more than can be filled was sold
    assert sandbox.shown_stock(SKU) == 0
    assert all(sandbox.try_buy(SKU, 1) is None for _ in range(20))  # stopped selling at 0

    async def all_settled() -> bool:
        return await settled(store, len(buyers.orders))

    await wait_for(all_settled, "every paid order taken in and settled")
    counts = await store.count_by_state()
    assert counts == {LineState.DELIVERED: len(buyers.orders)}  # oversell 0
    assert all(sandbox.orders[o].delivery is not None for o in buyers.orders)
    assert_platform_invariants(sandbox)  # no key twice, distinct keys per order
    puts = [put for put in sandbox.stock_puts if put[0] == SKU]
    assert all(as_of is not None for _, _, as_of in puts)
    assert len(puts) * 4 < len(buyers.orders), (len(puts), len(buyers.orders))  # coalesced
    return buyers


async def test_local_stock_is_never_oversold_under_concurrent_buyers(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    keys = 600
    await stock(store, SKU, keys)
    async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
        await wait_for(lambda: sandbox.shown_stock(SKU) == keys, "the first publication")
        await sell_out(sandbox, store, keys)
    assert (await store.stock_counts())[0].free == 0


async def test_supplier_stock_within_max_price_is_sold_and_never_oversold(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, quick_suppliers: None
) -> None:
    local, upstream_units = 150, 120
    upstream = SandboxSupplier(name="up", seed=3, secret="up-secret")
    upstream.add_product(SKU, price="5.00", available=upstream_units)
    upstream.add_product("VIP-30D", price="50.00", available=1000)  # above its max_price
    await upstream.start()
    try:
        base = make_config(tmp_path, sandbox.base_url, supplier_retry_interval=0.2)
        skus = {
            SKU: SkuSettings(
                sku=SKU, max_quantity=10, sources=("local", "up"), max_price=Decimal("6.00")
            ),
            "VIP-30D": SkuSettings(
                sku="VIP-30D", max_quantity=10, sources=("up",), max_price=Decimal("9.00")
            ),
        }
        settings = supplier_settings("up", upstream.base_url)
        config = dataclasses.replace(base, skus=skus, suppliers=(settings,))
        await stock(store, SKU, local)
        async with running_agent(config, store, sandbox, {"up": adapter(upstream)}):
            await wait_for(
                lambda: (sandbox.shown_stock(SKU) or 0) > local, "the supplier's keys published"
            )
            assert sandbox.shown_stock("VIP-30D") == 0  # priced above max_price: nothing
            await sell_out(sandbox, store, local + upstream_units)
    finally:
        await upstream.stop()
    bought = sum(p.quantity for p in upstream.charged)
    assert bought == upstream_units
    assert upstream.available[SKU] == 0


def _cli_config(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[store]
path = "kami.db"

[platforms.main]
base_url = "{base_url}"
api_key = "test-key"
secret = "platform.main.secret"

[skus."{SKU}"]
max_quantity = 10
""",
        encoding="utf-8",
    )
    return path


async def test_import_and_void_in_another_process_reach_the_platform(
    tmp_path: Path, sandbox: SandboxPlatform, sqlite_store: Store
) -> None:
    await stock(sqlite_store, SKU, 5)
    config = _cli_config(tmp_path, sandbox.base_url)
    keys = tmp_path / "keys.csv"
    keys.write_text(
        "code,secret\n" + "".join(f"C{i},CLI-SECRET-{i:04d}\n" for i in range(20)),
        encoding="utf-8",
    )

    def shows(count: int) -> Callable[[], bool]:
        return lambda: sandbox.shown_stock(SKU) == count

    async with running_agent(make_config(tmp_path, sandbox.base_url), sqlite_store, sandbox):
        await wait_for(shows(5), "the first publication")
        imported = await asyncio.to_thread(cli, config, "stock", "import", SKU, str(keys))
        assert imported.returncode == 0, imported.stderr
        await wait_for(shows(25), "the import published")
        voided = await asyncio.to_thread(
            cli, config, "stock", "void", SKU, "--count", "8", "--reason", "leaked"
        )
        assert voided.returncode == 0, voided.stderr
        await wait_for(shows(17), "the void published")


@pytest.fixture
async def platform_adapter(sandbox: SandboxPlatform) -> AsyncIterator[HttpPlatform]:
    platform = HttpPlatform(platform_settings(sandbox.base_url), sandbox.secret)
    yield platform
    await platform.close()


async def test_a_platform_without_the_stock_endpoint_is_left_alone(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, platform_adapter: HttpPlatform
) -> None:
    sandbox.stock_offered = False  # a platform-http v1 platform: 404
    config = make_config(tmp_path, sandbox.base_url)
    await store.set_cursor("main", "0", 0.0)
    sync = StockSync(config.skus, store, {"main": platform_adapter}, {})
    await stock(store, SKU, 3)
    await sync.step()
    refused = sandbox.stock_refused
    assert 1 <= refused <= len(config.skus)  # the publications under way when it said 404
    await stock(store, SKU, 3, start=10)
    for _ in range(3):
        await sync.step()
    assert sandbox.stock_refused == refused  # no more tries
    assert sync.publishers == {} and sandbox.stock == {}


async def test_a_supplier_balance_change_reaches_the_platform(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, quick_suppliers: None
) -> None:
    upstream = SandboxSupplier(name="up", seed=5, secret="up-secret", balance="120.00")
    upstream.add_product(SKU, price="5.00", available=1000)
    await upstream.start()
    try:
        base = make_config(tmp_path, sandbox.base_url)
        bought = SkuSettings(sku=SKU, max_quantity=10, sources=("up",), max_price=Decimal("6.00"))
        settings = supplier_settings("up", upstream.base_url)
        config = dataclasses.replace(base, skus={SKU: bought}, suppliers=(settings,))

        def shows(count: int) -> Callable[[], bool]:
            return lambda: sandbox.shown_stock(SKU) == count

        async with running_agent(config, store, sandbox, {"up": adapter(upstream)}):
            await wait_for(shows(20), "what the balance pays at max_price")  # 120 / 6
            upstream.balance = Decimal("30.00")
            await wait_for(shows(5), "the lower balance published")
            upstream.balance = Decimal("600.00")
            await wait_for(shows(100), "the top-up published")
    finally:
        await upstream.stop()
