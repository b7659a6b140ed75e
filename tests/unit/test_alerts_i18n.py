"""Alerts in the merchant's language (issue 18, item 3), on a real channel (aiosmtpd), and an
Agiso deposit that ran out said as such, not as refused credentials."""

from __future__ import annotations

import dataclasses
import email
import io
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from agent.alerts import AlertEvaluator, OutboxDrainer
from agent.config import Config, NotifySettings, SkuSettings
from agent.domain import AuthFailed
from agent.engine import Engine
from agent.ledger_watch import alert_ledger_lost
from agent.notify.console import ConsoleNotifier
from agent.platforms.agiso import AgisoPlatform
from agent.store.base import Store
from tests.conftest import make_config, stock
from tests.contract.test_platform_agiso import adapters, fake, fresh_app_state  # noqa: F401 (fixtures)
from tests.fakes.agiso import FakeAgiso
from tests.unit.test_alerts import Clock, email_to, smtp  # noqa: F401 (the fixture)

SKU = "王者荣耀点券"


def shop(tmp_path: Path, language: str) -> Config:
    base = make_config(tmp_path, "http://127.0.0.1:9", language=language)
    settings = SkuSettings(sku=SKU, max_quantity=10, min_stock=5)
    channels = (NotifySettings("mail", "email", {}),)
    return dataclasses.replace(base, skus={SKU: settings}, notify=channels)


def mail_text(raw: bytes) -> tuple[str, str]:
    """The subject and the body of a message as the merchant's mail reader shows them."""
    message: Message = email.message_from_bytes(raw)
    subject = str(email.header.make_header(email.header.decode_header(message["Subject"])))
    part = message.get_payload(decode=True)
    assert isinstance(part, bytes)
    return subject, part.decode(message.get_content_charset() or "utf-8")


@pytest.mark.parametrize(
    ("language", "opened", "resolved"),
    [
        (
            "zh-CN",
            "[kami-agent] 告警 (警告): 王者荣耀点券 库存将在 – 后耗尽（每小时售出 0.0，补货周期"
            " 60 分钟）：本地卡密 3 个，供应商可买 0 个，等待中的订单 0 笔",
            "[kami-agent] 已恢复 (警告): 王者荣耀点券 库存将在",
        ),
        (
            "en",
            "[kami-agent] ALERT (warning): 王者荣耀点券 stock runs out in – at 0.0/h (lead time"
            " 60 min): 3 local keys, 0 affordable upstream, 0 orders waiting",
            "[kami-agent] RESOLVED (warning): 王者荣耀点券 stock runs out in",
        ),
    ],
)
async def test_low_stock_and_its_recovery_in_the_merchants_language(
    tmp_path: Path,
    store: Store,
    smtp: Any,  # noqa: F811
    language: str,
    opened: str,
    resolved: str,
) -> None:
    clock = Clock()
    config = shop(tmp_path, language)
    drainer = OutboxDrainer(store, {"mail": email_to(smtp)}, clock, config.agent.language)
    await stock(store, SKU, 3)  # below min_stock 5
    await AlertEvaluator(config, store, clock, {}, {}).run()
    await drainer.drain()
    await stock(store, SKU, 20, start=100)
    await AlertEvaluator(config, store, clock, {}, {}).run()
    await drainer.drain()
    assert len(smtp.inbox.messages) == 2
    (subject, body), (_, recovery) = (mail_text(m) for m in smtp.inbox.messages)
    assert body.startswith(opened + "\n"), body
    assert subject.startswith(opened.split(":")[0])  # the channel's name for it, translated
    assert recovery.startswith(resolved), recovery


async def test_an_agiso_deposit_run_out_asks_for_a_top_up_not_for_credentials(
    tmp_path: Path,
    store: Store,
    fake: FakeAgiso,  # noqa: F811
    adapters: dict[str, AgisoPlatform],  # noqa: F811
) -> None:
    config = make_config(tmp_path, "http://127.0.0.1:9")
    engine = Engine(config.agent, config.skus, store, {"taobao": adapters["taobao"]})
    fake.deposit = 0.0  # 预存款余额不足了 (code 16)
    await engine.poll("taobao", follow=False)
    assert set(engine.auth_failures) == {"taobao"}
    for language, says, never in (
        ("en", "the prepaid balance for them ran out", "credentials"),
        ("zh-CN", "预付余额已用完", "凭据"),
    ):
        lang_config = dataclasses.replace(
            config, agent=dataclasses.replace(config.agent, language=language)
        )
        evaluator = AlertEvaluator(lang_config, store, Clock(), {}, engine.auth_failures)
        (alert,) = [c for c in await evaluator.conditions() if c.key == "auth:taobao"]
        assert alert.kind == "platform_unpaid" and says in alert.summary
        assert never not in alert.summary
    # Credentials refused are still said as such.
    refused = {"taobao": AuthFailed("refused our credentials: 401")}
    zh = dataclasses.replace(config, agent=dataclasses.replace(config.agent, language="zh-CN"))
    (alert,) = await AlertEvaluator(zh, store, Clock(), {}, refused).conditions()
    assert alert.kind == "platform_auth" and "拒绝了我们的凭据" in alert.summary


async def test_ledger_lost_alert_in_chinese() -> None:
    terminal = io.StringIO()
    await alert_ledger_lost([ConsoleNotifier("tty", terminal)], "kami.db was deleted", 0.0, "zh-CN")
    assert terminal.getvalue().startswith(
        "[kami-agent] 告警 (严重): kami.db was deleted：代理已停止接单并退出"
    )
