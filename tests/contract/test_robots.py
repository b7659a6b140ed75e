"""The chat-robot channels against local fakes of their webhooks built from the vendors'
documentation (tests/fakes/robots.py): signatures, answers, rate limits and size limits."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from agent.config import NotifySettings
from agent.domain import AlertMessage, Permanent, Transient
from agent.notify.base import Notifier
from agent.notify.factory import build_notifier
from tests.fakes.robots import RobotFakes

DING_SECRET = "SECding0123456789abcdef"
FEISHU_SECRET = "feishu-sign-secret-0123"


@pytest.fixture
async def robots() -> AsyncIterator[RobotFakes]:
    fakes = RobotFakes(ding_secret=DING_SECRET, feishu_secret=FEISHU_SECRET, now=time.time())
    await fakes.start()
    yield fakes
    await fakes.stop()


def channel(robots: RobotFakes, kind: str) -> Notifier:
    secrets = {
        "ding.url": robots.dingtalk_url,
        "ding.sign": DING_SECRET,
        "feishu.url": robots.feishu_url,
        "feishu.sign": FEISHU_SECRET,
        "wecom.url": robots.wecom_url,
        "tg.token": robots.telegram_token,
    }
    options = {
        "dingtalk": {"url_secret": "ding.url", "sign_secret": "ding.sign"},
        "feishu": {"url_secret": "feishu.url", "sign_secret": "feishu.sign"},
        "wecom": {"url_secret": "wecom.url"},
        "telegram": {"token": "tg.token", "chat_id": "42", "api_base": robots.base_url},
    }[kind]
    return build_notifier(NotifySettings(kind, kind, options), secrets.__getitem__)


def alert(summary: str = "GAME-100 low") -> AlertMessage:
    return AlertMessage("low_stock:GAME-100", "low_stock", "opened", "warning", summary, 1.0)


async def test_signed_robots_are_accepted(robots: RobotFakes) -> None:
    for kind in ("dingtalk", "feishu", "wecom", "telegram"):
        notifier = channel(robots, kind)
        try:
            await notifier.send(alert())
        finally:
            await notifier.close()
        assert robots.accepted[kind] == [alert().text], kind


async def test_wrong_signing_secret_is_permanent(robots: RobotFakes) -> None:
    robots.ding_secret = "SECsomething-else"
    robots.feishu_secret = "another-secret"
    for kind in ("dingtalk", "feishu"):
        notifier = channel(robots, kind)
        try:
            with pytest.raises(Permanent, match=r"310000|19021"):
                await notifier.send(alert())
        finally:
            await notifier.close()


async def test_missing_keyword_is_permanent(robots: RobotFakes) -> None:
    robots.keyword = "库存告警"
    notifier = channel(robots, "dingtalk")
    try:
        with pytest.raises(Permanent, match="keywords not in content"):
            await notifier.send(alert())
    finally:
        await notifier.close()


@pytest.mark.parametrize(
    ("kind", "allowed"),
    [("dingtalk", 20), ("wecom", 20), ("feishu", 5)],  # Feishu: 5 a second, 100 a minute
)
async def test_rate_limited_robot_is_retried_later(
    robots: RobotFakes, kind: str, allowed: int
) -> None:
    # A robot over its documented rate answers 200 with an error code (DingTalk 130101,
    # WeCom 45009, Feishu 11232): the alert must wait in the outbox (Transient), not be
    # dropped as a misconfigured channel (Permanent).
    notifier = channel(robots, kind)
    try:
        for _ in range(allowed):
            await notifier.send(alert())
        with pytest.raises(Transient):
            await notifier.send(alert())
        robots.now += 61  # the window has passed: the same channel sends again
        await notifier.send(alert())
    finally:
        await notifier.close()
    assert len(robots.accepted[kind]) == allowed + 1


@pytest.mark.parametrize(("kind", "limit"), [("wecom", 2048), ("feishu", 18 * 1024)])
async def test_long_alert_fits_the_robot(robots: RobotFakes, kind: str, limit: int) -> None:
    # WeCom takes at most 2048 bytes of text, Feishu a body of at most 20 KB: a long alert
    # (many order numbers, in Chinese) is cut to fit instead of being refused for good.
    long_summary = "订单等待发货 " * 3000
    notifier = channel(robots, kind)
    try:
        await notifier.send(alert(long_summary))
    finally:
        await notifier.close()
    (text,) = robots.accepted[kind]
    assert text.endswith("…") and len(text.encode()) <= limit
    assert alert(long_summary).text.startswith(text[:-1])


async def test_long_alert_fits_telegram(robots: RobotFakes) -> None:
    long_summary = "GAME-100 👾 " * 1000  # astral characters count twice in Telegram's 4096
    notifier = channel(robots, "telegram")
    try:
        await notifier.send(alert(long_summary))
    finally:
        await notifier.close()
    (text,) = robots.accepted["telegram"]
    assert text.endswith("…") and len(text.encode("utf-16-le")) // 2 <= 4096


async def test_telegram_flood_control_is_transient(robots: RobotFakes) -> None:
    robots.telegram_flood_until = robots.now + 30
    notifier = channel(robots, "telegram")
    try:
        with pytest.raises(Transient, match="429"):
            await notifier.send(alert())
    finally:
        await notifier.close()
