"""The reasons the agent writes with an order line, said in the merchant's language where they
are shown (agent/reasons.py): the ledger keeps the English, `kami-agent orders`, the console
and the Telegram bot say the agent's own reasons in Chinese with their values as stored, and
show any other text (a platform's words) as it is."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from agent.config import AgentSettings, SkuSettings
from agent.console.settings import TelegramBotSettings
from agent.domain import DeliveryConflict, OrderClosed, PlatformOrder, RejectedOrder
from agent.i18n import CHINESE, ENGLISH, Translator
from agent.intake import screen_order
from agent.platforms.http import HttpPlatform
from agent.platforms.parsing import parse_order
from agent.reasons import (
    CATALOGUE,
    MAX_MATCHED,
    NEED_FREE,
    OVER_MAX_QUANTITY,
    RECONCILE_FAILED,
    STILL_UNDELIVERED,
    UNKNOWN_SKU,
    english,
    match_reason,
    say_reason,
)
from agent.sandbox.platform import SandboxPlatform
from agent.screening import Screening
from agent.store.sqlite import SQLiteStore
from agent.telegram_bot import TelegramBot
from tests.conftest import keys, master_key_for_tests
from tests.console_helpers import FakeEngine, add_orders, console_client, console_config, log_in
from tests.helpers import wait_for
from tests.unit.test_cli import cli
from tests.unit.test_telegram_bot import (  # noqa: F401 (telegram: the fixture)
    BOT_TOKEN,
    MERCHANT,
    FakeTelegram,
    sent_matching,
    telegram,
)

ZH = Translator(CHINESE)
EN = Translator(ENGLISH)
# A value no pattern may trip over: regex metacharacters, a format directive, a newline, and
# the words of a template around it.
HOSTILE = "a.*+?[x](%s)%%\n{0} exceeds max_quantity 1 for \\1"
# Said by a platform, not by us: shown as it came, whatever the language.
PLATFORM_WORDS = "Kinguin: offer 77 disabled by the seller"

# --- the catalogue ------------------------------------------------------------------------


def _filled(template: str) -> str:
    names = re.findall(r"%\((\w+)\)[sr]", template)
    return english(template, **{name: f"<{name}:{HOSTILE}>" for name in names})


@pytest.mark.parametrize("template", CATALOGUE)
def test_every_reason_is_found_again_and_reads_as_written_in_english(template: str) -> None:
    text = _filled(template)
    found = match_reason(text)
    assert found is not None and found[0] == template
    assert say_reason(text, EN) == text


def test_reasons_the_code_writes_are_said_in_chinese_with_their_values() -> None:
    skus = {"GAME-100": SkuSettings(sku="GAME-100", max_quantity=5)}
    unknown = screen_order(PlatformOrder("U-1", "paid", HOSTILE, 1), skus)
    too_many = screen_order(PlatformOrder("Q-1", "paid", "GAME-100", 9), skus)
    zero = parse_order({"id": "Z-1", "sku": "GAME-100", "quantity": 0, "status": "paid"})
    screening = Screening(AgentSettings(blocked_buyers=("bad@example.com",)), skus, None)  # type: ignore[arg-type]
    blocked = screening.blocked(
        PlatformOrder("B-1", "paid", "GAME-100", 1, buyer_contact=" BAD@example.com")
    )
    said = [
        say_reason(r.reason, ZH)
        for r in (unknown, too_many, zero, blocked)
        if isinstance(r, RejectedOrder)
    ]
    assert said == [
        f"未知商品 {HOSTILE!r}（不在配置 [skus] 中）",
        "数量 9 超过 GAME-100 的 max_quantity 5",
        "数量至少为 1，收到的是 0",
        "买家联系方式已被屏蔽（[agent] blocked_buyers）：不发货",
    ]


def test_hostile_values_are_put_back_as_they_were_stored() -> None:
    text = english(OVER_MAX_QUANTITY, quantity=7, max=5, sku=HOSTILE)
    assert say_reason(text, ZH) == f"数量 7 超过 {HOSTILE} 的 max_quantity 5"
    need = english(NEED_FREE, needed="%(free)s", free="%%")
    assert say_reason(need, ZH) == "需要 %(free)s 个，可用 %% 个"


def test_a_reason_quoting_a_reason_is_said_whole_and_the_platforms_words_as_they_came() -> None:
    ours = english(
        STILL_UNDELIVERED, attempts=3, reason=english(RECONCILE_FAILED, error=PLATFORM_WORDS)
    )
    assert say_reason(ours, ZH) == f"尝试 3 次后仍未发货：核对失败：{PLATFORM_WORDS}"
    theirs = english(STILL_UNDELIVERED, attempts=3, reason=PLATFORM_WORDS)
    assert say_reason(theirs, ZH) == f"尝试 3 次后仍未发货：{PLATFORM_WORDS}"


def test_text_no_template_matches_is_shown_as_stored() -> None:
    assert say_reason(PLATFORM_WORDS, ZH) == PLATFORM_WORDS
    assert say_reason("refused", ZH) == "refused"  # a free text of an older version
    assert say_reason(None, ZH) == ""
    # Not matched beyond MAX_MATCHED (the patterns have open values): shown as it is.
    long = english(UNKNOWN_SKU, sku="x" * MAX_MATCHED)
    assert say_reason(long, ZH) == long


async def test_our_protocols_refusals_of_a_delivery_are_said_in_chinese(
    sandbox: SandboxPlatform, http_platform: HttpPlatform
) -> None:
    """The order closed before our delivery, or delivered with other keys: the platform
    adapter's reasons (agent/platforms/http.py), from the real 409 answers."""
    cancelled = sandbox.add_order("GAME-100")
    sandbox.set_status(cancelled, "cancelled")
    with pytest.raises(OrderClosed) as closed:
        await http_platform.deliver(cancelled, "k-1", keys("GAME-100", 1), "")
    assert say_reason(str(closed.value), ZH) == "平台：订单在发货前已取消"
    taken = sandbox.add_order("GAME-100")
    await http_platform.deliver(taken, "k-2", keys("GAME-100", 1), "")
    with pytest.raises(DeliveryConflict) as conflict:
        await http_platform.deliver(taken, "k-3", keys("GAME-100", 1, start=5), "")
    said = say_reason(str(conflict.value), ZH)
    assert said == "订单已用其他卡密发货：HTTP 409 already_delivered: other items"


# --- where they are shown -------------------------------------------------------------------

STILL_UNDELIVERED_TEXT = english(
    STILL_UNDELIVERED, attempts=4, reason=english(RECONCILE_FAILED, error="timeout")
)


async def _seed(store: SQLiteStore) -> dict[str, int]:
    """Lines parked and backordered by the ledger and the intake code with their reasons;
    their line ids by order id."""
    skus = {"GAME-100": SkuSettings(sku="GAME-100", max_quantity=5)}
    orders = [
        PlatformOrder("P-UNKNOWN", "paid", "NO.*SUCH(%s)", 1),
        PlatformOrder("P-MANY", "paid", "GAME-100", 9),
    ]
    screened = [o for o in (screen_order(o, skus) for o in orders) if o is not None]
    now = time.time()
    await store.ingest("main", screened, now)
    (waiting, stuck, foreign) = await add_orders(
        store, ("P-WAIT", "GAME-100", 2), ("P-STUCK", "GAME-100", 1), ("P-FOREIGN", "GAME-100", 1)
    )
    await store.allocate(waiting, now)  # no stock: backordered, "need 2, free 0"
    await store.park(stuck, STILL_UNDELIVERED_TEXT, now)
    await store.park(foreign, PLATFORM_WORDS, now)
    lines = [ln for ref in ("P-UNKNOWN", "P-MANY") for ln in await store.find_lines(ref)]
    return {ln.order_id: ln.id for ln in lines} | {
        "P-WAIT": waiting,
        "P-STUCK": stuck,
        "P-FOREIGN": foreign,
    }


CHINESE_REASONS = [
    "未知商品 'NO.*SUCH(%s)'（不在配置 [skus] 中）",
    "数量 9 超过 GAME-100 的 max_quantity 5",
    "尝试 4 次后仍未发货：核对失败：timeout",
]


def _config(tmp_path: Path, language: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[agent]
language = "{language}"

[store]
path = "kami.db"

[platforms.main]
base_url = "http://127.0.0.1:9"
api_key = "test-key"
secret = "platform.main.secret"

[skus."GAME-100"]
max_quantity = 5
""",
        encoding="utf-8",
    )
    made = cli(path, "init")
    assert made.returncode == 0, made.stderr
    return path


def test_the_cli_says_the_reasons_in_the_merchants_language(tmp_path: Path) -> None:
    config = _config(tmp_path, "zh-CN")

    async def seed() -> None:
        store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
        await store.open()
        try:
            await _seed(store)
        finally:
            await store.close()

    asyncio.run(seed())
    listing = cli(config, "orders", "list", "--state", "needs_attention")
    assert listing.returncode == 0, listing.stderr
    for said in CHINESE_REASONS:
        assert said in listing.stdout, listing.stdout
    assert PLATFORM_WORDS in listing.stdout  # a platform's words, as they came
    assert "unknown SKU" not in listing.stdout and "still undelivered" not in listing.stdout
    shown = cli(config, "orders", "show", "P-WAIT")
    assert "需要 2 个，可用 0 个" in shown.stdout and "need 2" not in shown.stdout
    # --json is never translated: the ledger's English.
    raw = cli(config, "orders", "list", "--state", "needs_attention", "--json").stdout
    assert "unknown SKU 'NO.*SUCH(%s)' (not in config [skus])" in raw
    # English merchants read the English, as stored.
    (tmp_path / "config.toml").write_text(
        config.read_text(encoding="utf-8").replace('"zh-CN"', '"en"'), encoding="utf-8"
    )
    english_listing = cli(config, "orders", "list", "--state", "needs_attention").stdout
    assert STILL_UNDELIVERED_TEXT in english_listing


async def test_the_console_says_the_reasons_in_the_merchants_language(
    tmp_path: Path, sqlite_store: SQLiteStore
) -> None:
    ids = await _seed(sqlite_store)
    async with console_client(tmp_path, sqlite_store, language="zh-CN") as client:
        await log_in(client)
        listing = await (await client.get("/orders?state=needs_attention")).text()
        for said in CHINESE_REASONS:
            assert said.replace("'", "&#39;") in listing
        assert PLATFORM_WORDS in listing
        page = await (await client.get(f"/orders/{ids['P-STUCK']}")).text()
        assert "尝试 4 次后仍未发货：核对失败：timeout" in page  # the reason and its event
        assert "still undelivered" not in page
        waiting = await (await client.get(f"/orders/{ids['P-WAIT']}")).text()
        assert "需要 2 个，可用 0 个" in waiting


async def test_the_console_escapes_a_hostile_value_in_a_reason(
    tmp_path: Path, sqlite_store: SQLiteStore
) -> None:
    (line_id,) = await add_orders(sqlite_store, ("P-X", "GAME-100", 1))
    sku = '<script>alert("%s")</script>\n.*'
    await sqlite_store.park(
        line_id, english(OVER_MAX_QUANTITY, quantity=7, max=5, sku=sku), time.time()
    )
    async with console_client(tmp_path, sqlite_store, language="zh-CN") as client:
        await log_in(client)
        page = await (await client.get(f"/orders/{line_id}")).text()
    assert "<script>alert" not in page
    assert (
        "数量 7 超过 &lt;script&gt;alert(&#34;%s&#34;)&lt;/script&gt;\n.* 的 max_quantity 5" in page
    )


async def test_a_retry_refused_by_the_screening_quotes_the_reason_in_chinese(
    tmp_path: Path,
    sqlite_store: SQLiteStore,
    sandbox: SandboxPlatform,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`orders retry` reads a parked order again; refused again, the line stays parked with
    the new reason, which the refusal quotes (agent/aftersales.py) in the merchant's
    language, as the timeline does."""
    monkeypatch.setenv("KAMI_SECRET_PLATFORM_MAIN_SECRET", sandbox.secret)
    order = sandbox.add_order("NO-SUCH-SKU")
    (line_id,) = await add_orders(sqlite_store, (order, "GAME-100", 1))
    await sqlite_store.park(line_id, "refused", time.time())
    async with console_client(
        tmp_path, sqlite_store, FakeEngine(), sandbox.base_url, language="zh-CN"
    ) as client:
        csrf = await log_in(client)
        retried = await (await client.post(f"/orders/{line_id}/retry", data={"csrf": csrf})).text()
        assert (
            f"订单 {order} 仍需人工处理：未知商品 &#39;NO-SUCH-SKU&#39;（不在配置 [skus] 中）"
            in retried
        )
        page = await (await client.get(f"/orders/{line_id}")).text()
    unknown = "未知商品 &#39;NO-SUCH-SKU&#39;（不在配置 [skus] 中）"
    timeline = f"重新读取（sku=NO-SUCH-SKU quantity=1）：{unknown}"
    assert timeline in page


async def test_the_bot_says_the_reasons_in_the_merchants_language(
    tmp_path: Path,
    telegram: FakeTelegram,  # noqa: F811 (the fixture)
    sqlite_store: SQLiteStore,
) -> None:
    await _seed(sqlite_store)
    settings = TelegramBotSettings(
        token_secret="bot.token",
        allowed_chats=(MERCHANT,),
        api_base=telegram.base_url,
        language="zh-CN",
        poll_seconds=1,
    )
    bot = TelegramBot(settings, BOT_TOKEN, console_config(tmp_path), sqlite_store, FakeEngine())
    await bot.start()
    try:
        telegram.message(MERCHANT, "/orders needs_attention")
        reason = "P-STUCK: 尝试 4 次后仍未发货：核对失败：timeout"
        await wait_for(sent_matching(telegram, MERCHANT, lambda t: reason in t), "the orders")
    finally:
        await bot.stop()
    [listing] = [t for t in telegram.replies_to(MERCHANT) if "P-STUCK" in t]
    assert "数量 9 超过 GAME-100 的 max_quantity 5" in listing
    assert PLATFORM_WORDS in listing and "still undelivered" not in listing
