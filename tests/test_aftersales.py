"""After-sales and stock tools on both ledgers (issue 19): keys voided by mistake returned to
stock, key expiry, a parked order retried with what the platform says now, a bad key replaced
on a delivered order, a merchant's refund, buyer limits, delayed delivery, templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.domain import LineState, PlatformOrder
from agent.store.base import Store, StoreError
from tests.conftest import stock
from tests.test_cli import cli, config_for

NOW = 1_700_000_000.0
SKU = "GAME-100"


def order(
    order_id: str, sku: str = SKU, quantity: int = 1, buyer: str | None = None
) -> PlatformOrder:
    return PlatformOrder(
        order_id=order_id, status="paid", sku=sku, quantity=quantity, buyer_contact=buyer
    )


def counts(found: list[object]) -> dict[str, tuple[int, int, int]]:
    return {c.sku: (c.free, c.bound, c.void) for c in found}  # type: ignore[attr-defined]


# --- item 1: unvoid ----------------------------------------------------------------------------
async def test_unvoid_returns_only_keys_voided_with_that_reason(store: Store) -> None:
    await stock(store, SKU, 6)
    assert await store.void_free_keys(SKU, 3, "oops", NOW) == 3
    assert await store.void_free_keys(SKU, 1, "leaked", NOW) == 1
    assert counts(await store.stock_counts())[SKU] == (2, 0, 4)
    assert await store.unvoid_keys(SKU, "oop", None, NOW) == 0  # the reason must match
    assert await store.unvoid_keys("OTHER", "oops", None, NOW) == 0
    assert await store.unvoid_keys(SKU, "oops", 2, NOW) == 2
    assert await store.unvoid_keys(SKU, "oops", None, NOW) == 1
    assert counts(await store.stock_counts())[SKU] == (5, 0, 1)
    with pytest.raises(StoreError):
        await store.unvoid_keys(SKU, "leaked", 0, NOW)
    # The keys returned deliver like any other.
    (line_id,) = await store.ingest("main", [order("A", quantity=5)], NOW)
    assert (await store.allocate(line_id, NOW)).state == LineState.ALLOCATED


def test_stock_unvoid_command(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    path = tmp_path / "keys.txt"
    path.write_text("".join(f"K-{i:03}\n" for i in range(5)), encoding="utf-8")
    assert cli(config, "stock", "import", SKU, str(path)).returncode == 0
    assert cli(config, "stock", "void", SKU, "--count", "4", "--reason", "oops").returncode == 0
    none = cli(config, "stock", "unvoid", SKU, "--reason", "other")
    assert none.returncode == 1 and "Traceback" not in none.stderr
    back = cli(config, "stock", "unvoid", SKU, "--reason", "oops", "--count", "3")
    assert back.returncode == 0, back.stderr
    assert "3 key(s)" in back.stdout
    listing = cli(config, "stock", "list").stdout.splitlines()
    assert next(ln.split() for ln in listing if ln.startswith(SKU))[:4] == [SKU, "4", "0", "1"]
