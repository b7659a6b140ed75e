"""Buyer side: a notice with an ETA for an order waiting on stock, then the automatic refund."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agent.config import SkuSettings
from agent.domain import LineState
from agent.sandbox.platform import SandboxPlatform
from agent.store.base import Store
from tests.conftest import make_config, stock
from tests.helpers import delivered_all, line_state_is, running_agent, wait_for


def buyer_config(tmp_path: Path, base_url: str, refund_after: float | None) -> object:
    config = make_config(tmp_path, base_url)
    sku = SkuSettings(sku="GAME-100", max_quantity=5, refund_after=refund_after, promise=120)
    alerts = dataclasses.replace(config.alerts, forecast_interval=0.05, buyer_notice_after=0.2)
    return dataclasses.replace(config, skus={"GAME-100": sku}, alerts=alerts)


async def test_waiting_buyer_gets_one_notice_then_the_keys(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    order_id = sandbox.add_order("GAME-100")
    config = buyer_config(tmp_path, sandbox.base_url, refund_after=None)
    async with running_agent(config, store, sandbox):  # type: ignore[arg-type]
        await wait_for(lambda: bool(sandbox.orders[order_id].notices), "notice")
        await stock(store, "GAME-100", 1)
        await wait_for(delivered_all(sandbox, [order_id]), "delivery after restock")
    (notice,) = sandbox.orders[order_id].notices
    assert "waiting for new stock" in notice and "about 2 minutes" in notice
    kinds = [e.kind for e in await store.events((await store.find_lines(order_id))[0].id)]
    assert kinds.count("buyer_notice") == 1


async def test_overdue_backorder_is_refunded_once(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    order_id = sandbox.add_order("GAME-100")
    config = buyer_config(tmp_path, sandbox.base_url, refund_after=0.5)
    async with running_agent(config, store, sandbox):  # type: ignore[arg-type]
        await wait_for(line_state_is(store, order_id, LineState.REFUNDED), "refund")
        await stock(store, "GAME-100", 1)  # stock arriving later must not deliver it
    assert sandbox.orders[order_id].status == "refunded"
    assert sandbox.refunds == [order_id]
    assert sandbox.orders[order_id].delivery is None
    assert (await store.stock_counts())[0].free == 1
