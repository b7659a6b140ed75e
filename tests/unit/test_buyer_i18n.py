"""Buyer notices in the buyers' language (issue 18, item 3): agent.language, or
agent.buyer_language when the shop's buyers read another language than the merchant; against
the sandbox platform over HTTP with the real engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.config import Config, SkuSettings
from agent.domain import LineState
from agent.sandbox.platform import SandboxPlatform
from agent.store.base import Store
from tests.conftest import make_config, stock
from tests.helpers import delivered_all, line_state_is, running_agent, wait_for


def buyer_config(tmp_path: Path, base_url: str, refund_after: float | None, **agent: str) -> Config:
    config = make_config(tmp_path, base_url, **agent)
    sku = SkuSettings(sku="GAME-100", max_quantity=5, refund_after=refund_after, promise=120)
    alerts = dataclasses.replace(config.alerts, forecast_interval=0.05, buyer_notice_after=0.2)
    return dataclasses.replace(config, skus={"GAME-100": sku}, alerts=alerts)


@pytest.mark.parametrize(
    ("languages", "expected"),
    [
        (
            {"language": "zh-CN"},
            "您的订单 %s 正在等待补货。预计约 2 分钟内发货，届时会自动发送给您。",
        ),
        (
            {"language": "en"},
            "Your order %s is waiting for new stock. We expect to deliver it within about 2"
            " minutes and will send it automatically.",
        ),
        (  # a Chinese merchant selling to buyers who read English
            {"language": "zh-CN", "buyer_language": "en"},
            "Your order %s is waiting for new stock. We expect to deliver it within about 2"
            " minutes and will send it automatically.",
        ),
    ],
)
async def test_the_eta_notice_in_the_buyers_language(
    tmp_path: Path,
    sandbox: SandboxPlatform,
    store: Store,
    languages: dict[str, str],
    expected: str,
) -> None:
    order_id = sandbox.add_order("GAME-100")
    config = buyer_config(tmp_path, sandbox.base_url, None, **languages)
    async with running_agent(config, store, sandbox):
        await wait_for(lambda: bool(sandbox.orders[order_id].notices), "notice")
    assert sandbox.orders[order_id].notices == [expected % order_id]


async def test_the_refund_reason_in_the_buyers_language(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    order_id = sandbox.add_order("GAME-100")
    config = buyer_config(tmp_path, sandbox.base_url, 0.5, language="zh-CN")
    async with running_agent(config, store, sandbox):
        await wait_for(line_state_is(store, order_id, LineState.REFUNDED), "refund")
    (line,) = await store.find_lines(order_id)
    assert line.reason == "GAME-100 缺货，已超过发货期限"


@pytest.mark.parametrize(
    ("agent", "expected"),
    [
        ({"language": "zh-CN"}, "感谢您的购买。"),
        ({"language": "zh-CN", "buyer_language": "en"}, "Thank you for your order."),
        # The merchant's own message goes out as written.
        ({"language": "en", "delivery_message": "祝您游戏愉快"}, "祝您游戏愉快"),
    ],
)
async def test_the_default_delivery_message_in_the_buyers_language(
    tmp_path: Path,
    sandbox: SandboxPlatform,
    store: Store,
    agent: dict[str, str],
    expected: str,
) -> None:
    order_id = sandbox.add_order("GAME-100")
    config = buyer_config(tmp_path, sandbox.base_url, None, **agent)
    await stock(store, "GAME-100", 1)
    async with running_agent(config, store, sandbox):
        await wait_for(delivered_all(sandbox, [order_id]), "delivery")
    delivery = sandbox.orders[order_id].delivery
    assert delivery is not None and delivery["message"] == expected
