"""Telegram bot control against a fake Telegram Bot API served on 127.0.0.1 (getUpdates long
poll, sendMessage, getFile and the file download, answerCallbackQuery), over a real ledger.

The fake's sendMessage checks what the Bot API documents (core.telegram.org/bots/api,
sendMessage and "Formatting options"): with parse_mode HTML only the supported tags, properly
closed, and only &lt; &gt; &amp; &quot; and numerical entities; the text 1-4096 characters
(UTF-16 code units) after entities parsing; and flood control answered with HTTP 429 and
parameters.retry_after."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.config import SkuSettings
from agent.console.settings import TelegramBotSettings
from agent.domain import AlertCondition, LineState
from agent.i18n import display_width
from agent.sandbox.platform import SandboxPlatform
from agent.store.sqlite import SQLiteStore
from agent.telegram_bot import TelegramBot
from tests.conftest import stock
from tests.console_helpers import FakeEngine, add_orders, console_config
from tests.helpers import wait_for
from tests.loopback import serve

BOT_TOKEN = "123456:fake-bot-token-for-tests-AbCdEf"
MERCHANT = 4242
STRANGER = 666

# The Bot API's HTML style: these tags (with their documented synonyms), nothing else.
HTML_TAGS = frozenset(
    {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler", "a"}
    | {"tg-emoji", "code", "pre", "blockquote"}
)
_HTML_TOKEN = re.compile(r"<(/?)([a-z-]+)(?:\s[^<>]*)?>|&(#[0-9]+|#x[0-9a-fA-F]+|[a-zA-Z]+);|[<>&]")
_NAMED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}


def telegram_html_text(text: str) -> str:
    """The text Telegram shows for `text` sent with parse_mode HTML; ValueError (its words)
    for what it refuses to parse."""
    shown: list[str] = []
    open_tags: list[str] = []
    at = 0
    for token in _HTML_TOKEN.finditer(text):
        shown.append(text[at : token.start()])
        at = token.end()
        closing, tag, entity = token.group(1), token.group(2), token.group(3)
        if tag is not None:
            if tag not in HTML_TAGS:
                raise ValueError(f'Unsupported start tag "{tag}"')
            if not closing:
                open_tags.append(tag)
            elif not open_tags or open_tags.pop() != tag:
                raise ValueError(f'Unmatched end tag "{tag}"')
        elif entity is not None:
            if entity.startswith("#"):
                shown.append(chr(int(entity[2:], 16) if entity[1] == "x" else int(entity[1:])))
            elif entity in _NAMED_ENTITIES:
                shown.append(_NAMED_ENTITIES[entity])
            else:
                raise ValueError(f'Unsupported HTML entity "&{entity};"')
        else:
            raise ValueError(f'Unexpected "{token.group(0)}": it must be escaped')
    shown.append(text[at:])
    if open_tags:
        raise ValueError(f'Can\'t find end tag corresponding to start tag "{open_tags[-1]}"')
    return "".join(shown)


@dataclass
class FakeTelegram:
    """Just enough of the Bot API, recording what the bot sends."""

    token: str
    updates: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    answered: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    refused_tokens: int = 0
    refused_messages: list[str] = field(default_factory=list)
    flood_until: float = 0.0  # time.monotonic() before which sendMessage answers 429
    blocked_by: set[int] = field(default_factory=set)  # chats whose user blocked the bot
    next_id: int = 1
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    base_url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self._method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._file)
        self._runner, self.base_url = await serve(app)

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def _update(self, **content: Any) -> None:
        self.updates.append({"update_id": self.next_id, **content})
        self.next_id += 1
        self.arrived.set()

    def message(self, chat_id: int, text: str = "", **extra: Any) -> None:
        body = {"message_id": self.next_id, "chat": {"id": chat_id, "type": "private"}}
        if text:
            body["caption" if "document" in extra else "text"] = text
        self._update(message={**body, **extra})

    def press(self, chat_id: int, data: str) -> str:
        query_id = f"cb-{self.next_id}"
        self._update(
            callback_query={
                "id": query_id,
                "data": data,
                "message": {"message_id": 1, "chat": {"id": chat_id, "type": "private"}},
            }
        )
        return query_id

    def document(self, chat_id: int, caption: str, name: str, content: bytes) -> None:
        file_id = f"file-{self.next_id}"
        self.files[file_id] = (f"documents/{name}", content)
        self.message(chat_id, caption, document={"file_id": file_id, "file_name": name})

    async def _method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            self.refused_tokens += 1
            return web.json_response({"ok": False, "description": "Unauthorized"}, status=401)
        method = request.match_info["method"]
        payload = await request.json()
        if method == "getUpdates":
            deadline = time.monotonic() + float(payload.get("timeout", 0))
            while True:
                pending = [u for u in self.updates if u["update_id"] >= payload.get("offset", 0)]
                if pending or time.monotonic() >= deadline:
                    return web.json_response({"ok": True, "result": pending})
                self.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.arrived.wait(), deadline - time.monotonic())
        if method == "sendMessage":
            wait = self.flood_until - time.monotonic()
            if wait > 0:
                return web.json_response(
                    {
                        "ok": False,
                        "error_code": 429,
                        "description": f"Too Many Requests: retry after {math.ceil(wait)}",
                        "parameters": {"retry_after": math.ceil(wait)},
                    },
                    status=429,
                )
            if payload.get("chat_id") in self.blocked_by:
                return web.json_response(
                    {
                        "ok": False,
                        "error_code": 403,
                        "description": "Forbidden: bot was blocked by the user",
                    },
                    status=403,
                )
            text = payload.get("text")
            try:
                if not isinstance(text, str):
                    raise ValueError("message text is empty")
                shown = telegram_html_text(text) if payload.get("parse_mode") == "HTML" else text
                if not shown.strip():
                    raise ValueError("message text is empty")
                if len(shown.encode("utf-16-le")) // 2 > 4096:
                    raise ValueError("message is too long")
            except ValueError as exc:
                self.refused_messages.append(str(exc))
                return web.json_response(
                    {
                        "ok": False,
                        "error_code": 400,
                        "description": f"Bad Request: can't parse entities: {exc}",
                    },
                    status=400,
                )
            self.sent.append(payload)
            return web.json_response({"ok": True, "result": {"message_id": len(self.sent)}})
        if method == "answerCallbackQuery":
            self.answered.append(payload)
            return web.json_response({"ok": True, "result": True})
        if method == "getFile":
            path, content = self.files[payload["file_id"]]
            return web.json_response(
                {
                    "ok": True,
                    "result": {
                        "file_id": payload["file_id"],
                        "file_path": path,
                        "file_size": len(content),
                    },
                }
            )
        return web.json_response({"ok": False, "description": "no such method"}, status=404)

    async def _file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            raise web.HTTPUnauthorized()
        for path, content in self.files.values():
            if path == request.match_info["path"]:
                return web.Response(body=content)
        raise web.HTTPNotFound()

    def replies_to(self, chat_id: int) -> list[str]:
        return [m["text"] for m in self.sent if m["chat_id"] == chat_id]


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram(BOT_TOKEN)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def bot(
    tmp_path: Path,
    telegram: FakeTelegram,
    sqlite_store: SQLiteStore,
    sandbox: SandboxPlatform,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[TelegramBot, FakeEngine]]:
    monkeypatch.setenv("KAMI_SECRET_PLATFORM_MAIN_SECRET", sandbox.secret)
    config = console_config(tmp_path, sandbox.base_url)
    skus = dict(config.skus)
    skus["王者荣耀点券"] = SkuSettings(sku="王者荣耀点券")
    config = dataclasses.replace(config, skus=skus)
    settings = TelegramBotSettings(
        token_secret="bot.token",
        allowed_chats=(MERCHANT,),
        api_base=telegram.base_url,
        language="en",
        poll_seconds=1,
        alert_interval=0.05,
    )
    engine = FakeEngine()
    running = TelegramBot(settings, BOT_TOKEN, config, sqlite_store, engine)
    await running.start()
    yield running, engine
    await running.stop()


def sent_matching(
    telegram: FakeTelegram, chat: int, check: Callable[[str], bool]
) -> Callable[[], bool]:
    return lambda: any(check(text) for text in telegram.replies_to(chat))


async def test_status_answers_the_merchant_only(
    telegram: FakeTelegram, bot: tuple[TelegramBot, FakeEngine], sqlite_store: SQLiteStore
):
    await add_orders(sqlite_store, ("S-1", "GAME-100", 1))
    telegram.message(STRANGER, "/status")
    telegram.message(MERCHANT, "/status")
    await wait_for(sent_matching(telegram, MERCHANT, lambda t: "Delivered today" in t), "status")
    (text,) = telegram.replies_to(MERCHANT)
    assert "Waiting to be delivered: 1" in text
    # Bot API 7.0: link previews are turned off by link_preview_options.
    (sent,) = [m for m in telegram.sent if m["chat_id"] == MERCHANT]
    assert sent["link_preview_options"] == {"is_disabled": True}
    assert "disable_web_page_preview" not in sent
    telegram.message(MERCHANT, "/help")
    await wait_for(sent_matching(telegram, MERCHANT, lambda t: "/import SKU" in t), "help")
    assert telegram.replies_to(STRANGER) == []  # never answered, whatever it sends
    telegram.press(STRANGER, "stock")
    telegram.message(MERCHANT, "/help")
    await wait_for(lambda: len(telegram.replies_to(MERCHANT)) == 3, "the second help")
    assert telegram.replies_to(STRANGER) == []


async def test_stock_table_lines_up_with_chinese_skus(
    telegram: FakeTelegram, bot: tuple[TelegramBot, FakeEngine], sqlite_store: SQLiteStore
):
    await stock(sqlite_store, "王者荣耀点券", 7)
    await stock(sqlite_store, "GAME-100", 12)
    telegram.message(MERCHANT, "/stock")
    await wait_for(sent_matching(telegram, MERCHANT, lambda t: "<pre>" in t), "stock")
    (text,) = telegram.replies_to(MERCHANT)
    table = text.split("<pre>", 1)[1].split("</pre>", 1)[0].splitlines()
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) >= {"GAME-100", "王者荣耀点券"}
    # The right-aligned "free keys" column ends in the same cell on every row.
    ends = {
        display_width(line[: line.index(count) + len(count)])
        for line, count in ((rows["GAME-100"], " 12"), (rows["王者荣耀点券"], " 7"))
    }
    assert len(ends) == 1


async def test_retry_by_command_and_by_button(
    telegram: FakeTelegram,
    bot: tuple[TelegramBot, FakeEngine],
    sqlite_store: SQLiteStore,
    sandbox: SandboxPlatform,
):
    """As `kami-agent orders retry` does: a line parked before it held anything is read
    again from its platform first; one cancelled there meanwhile is closed, not retried."""
    p1, p2, p3 = (sandbox.add_order("GAME-100") for _ in range(3))
    sandbox.set_status(p3, "cancelled")
    first, second, third = await add_orders(
        sqlite_store, (p1, "GAME-100", 1), (p2, "GAME-100", 1), (p3, "GAME-100", 1)
    )
    now = time.time()
    for line_id in (first, second, third):
        await sqlite_store.park(line_id, "refused", now)
    _, engine = bot
    telegram.message(MERCHANT, f"/retry {p3}")
    await wait_for(
        sent_matching(telegram, MERCHANT, lambda t: "platform reports cancelled" in t), "closed"
    )
    assert (await sqlite_store.get_line(third)).state == LineState.CANCELLED  # type: ignore[union-attr]
    telegram.message(MERCHANT, f"/retry {p1}")
    await wait_for(sent_matching(telegram, MERCHANT, lambda t: "is now: new" in t), "retry")
    assert (await sqlite_store.get_line(first)).state == LineState.NEW  # type: ignore[union-attr]
    assert engine.dispatched == [first]
    # /orders needs_attention lists P-2 with its button; pressing it retries.
    telegram.message(MERCHANT, "/orders needs_attention")
    await wait_for(lambda: any("reply_markup" in m for m in telegram.sent), "the orders list")
    listing = next(m for m in telegram.sent if "reply_markup" in m)
    [[button]] = listing["reply_markup"]["inline_keyboard"]
    assert button["callback_data"] == f"retry:{second}" and p2 in button["text"]
    query_id = telegram.press(MERCHANT, button["callback_data"])
    await wait_for(
        lambda: any(a["callback_query_id"] == query_id for a in telegram.answered), "answer"
    )
    assert (await sqlite_store.get_line(second)).state == LineState.NEW  # type: ignore[union-attr]
    telegram.message(MERCHANT, f"/retry {p2}")  # no longer parked: the ledger says why
    await wait_for(
        sent_matching(telegram, MERCHANT, lambda t: "only needs_attention can be retried" in t),
        "the refusal",
    )


async def test_import_a_file_sent_to_the_bot(
    telegram: FakeTelegram, bot: tuple[TelegramBot, FakeEngine], sqlite_store: SQLiteStore
):
    content = b"".join(b"TG-KEY-%04d\n" % i for i in range(40))
    telegram.document(MERCHANT, "/import VIP-30D", "keys.txt", content)
    await wait_for(sent_matching(telegram, MERCHANT, lambda t: "Added 40" in t), "import")
    assert await sqlite_store.free_counts() == {"VIP-30D": 40}
    telegram.document(MERCHANT, "/import NO-SUCH-SKU", "keys.txt", content)
    await wait_for(sent_matching(telegram, MERCHANT, lambda t: "Say a SKU" in t), "refusal")
    telegram.document(STRANGER, "/import VIP-30D", "more.txt", b"STRANGER-KEY\n")
    telegram.message(MERCHANT, "/help")
    await wait_for(sent_matching(telegram, MERCHANT, lambda t: "/import SKU" in t), "help")
    assert await sqlite_store.free_counts() == {"VIP-30D": 40}


async def test_new_alerts_are_pushed_once_with_buttons(
    telegram: FakeTelegram, bot: tuple[TelegramBot, FakeEngine], sqlite_store: SQLiteStore
):
    [line] = await add_orders(sqlite_store, ("A-1", "GAME-100", 1))
    await sqlite_store.park(line, "refused", time.time())
    await sqlite_store.apply_alerts(
        [
            AlertCondition(
                "needs_attention", "needs_attention", "warning", "1 orders need attention"
            )
        ],
        [],
        time.time(),
        3600,
        3,
    )
    await wait_for(lambda: any("reply_markup" in m for m in telegram.sent), "the alert")
    await asyncio.sleep(0.3)  # several more looks at the alerts
    pushed = [m for m in telegram.sent if "reply_markup" in m]
    assert len(pushed) == 1 and "orders need attention" in pushed[0]["text"]
    [[button]] = pushed[0]["reply_markup"]["inline_keyboard"]
    telegram.press(MERCHANT, button["callback_data"])
    await wait_for(
        lambda: any(
            b["callback_data"] == f"retry:{line}"
            for m in telegram.sent
            for row in m.get("reply_markup", {}).get("inline_keyboard", [])
            for b in row
        ),
        "the parked order with its retry button",
    )


async def test_errors_never_show_the_token_or_the_url(tmp_path: Path, sqlite_store: SQLiteStore):
    from agent.telegram_bot import BotApiError

    fake = FakeTelegram("another-token")
    await fake.start()
    settings = TelegramBotSettings(
        token_secret="bot.token", allowed_chats=(MERCHANT,), api_base=fake.base_url
    )
    bot = TelegramBot(settings, BOT_TOKEN, console_config(tmp_path), sqlite_store, None)
    await bot.start()
    try:
        with pytest.raises(BotApiError) as caught:
            await bot.call("getMe")
        assert "Unauthorized" in str(caught.value) and BOT_TOKEN not in str(caught.value)
    finally:
        await fake.stop()
    try:
        with pytest.raises(BotApiError) as caught:  # nobody listening any more
            await bot.call("getMe")
        assert BOT_TOKEN not in str(caught.value) and fake.base_url not in str(caught.value)
    finally:
        await bot.stop()


async def test_the_bot_speaks_chinese(
    tmp_path: Path, telegram: FakeTelegram, sqlite_store: SQLiteStore
):
    settings = TelegramBotSettings(
        token_secret="bot.token",
        allowed_chats=(MERCHANT,),
        api_base=telegram.base_url,
        language="zh-CN",
        poll_seconds=1,
    )
    bot = TelegramBot(settings, BOT_TOKEN, console_config(tmp_path), sqlite_store, None)
    await bot.start()
    try:
        telegram.message(MERCHANT, "/status")
        await wait_for(sent_matching(telegram, MERCHANT, lambda t: "今日已发货" in t), "status")
        telegram.message(MERCHANT, "/help")
        await wait_for(sent_matching(telegram, MERCHANT, lambda t: "命令" in t), "help")
    finally:
        await bot.stop()


async def test_a_refused_retry_is_said_in_chinese(
    tmp_path: Path,
    telegram: FakeTelegram,
    sqlite_store: SQLiteStore,
    sandbox: SandboxPlatform,
    monkeypatch: pytest.MonkeyPatch,
):
    """The after-sales refusal (agent/aftersales.py) is raised without the merchant's
    language; the bot says it in its own (issue 18)."""
    monkeypatch.setenv("KAMI_SECRET_PLATFORM_MAIN_SECRET", sandbox.secret)
    order = sandbox.add_order("GAME-100")
    (line_id,) = await add_orders(sqlite_store, (order, "GAME-100", 1))
    settings = TelegramBotSettings(
        token_secret="bot.token",
        allowed_chats=(MERCHANT,),
        api_base=telegram.base_url,
        language="zh-CN",
        poll_seconds=1,
    )
    config = console_config(tmp_path, sandbox.base_url)
    bot = TelegramBot(settings, BOT_TOKEN, config, sqlite_store, FakeEngine())
    await bot.start()
    try:
        telegram.message(MERCHANT, f"/retry {order}")
        refusal = f"订单 {order} 当前为 new；只有 needs_attention（需人工处理）的订单可以重试"
        await wait_for(sent_matching(telegram, MERCHANT, lambda t: refusal in t), "the refusal")
    finally:
        await bot.stop()
    assert (await sqlite_store.get_line(line_id)).state == LineState.NEW  # type: ignore[union-attr]


async def test_a_long_stock_table_is_cut_as_telegram_parses_it(
    telegram: FakeTelegram, bot: tuple[TelegramBot, FakeEngine], sqlite_store: SQLiteStore
):
    # More SKUs than one message holds, with "&" in their names (escaped as &amp;): the reply
    # is cut by what Telegram counts (the text after entities parsing) and never through a tag
    # or an entity, so it is still valid HTML; cutting the raw markup left <pre> unclosed and
    # Telegram refused the whole reply.
    running, _ = bot
    skus = dict(running.config.skus)
    for n in range(300):
        skus[f"R&D-KEY-{n:03d}"] = SkuSettings(sku=f"R&D-KEY-{n:03d}")
    running.config = dataclasses.replace(running.config, skus=skus)
    telegram.message(MERCHANT, "/stock")
    telegram.message(MERCHANT, "/help")  # handled after /stock: its reply ends the wait
    await wait_for(sent_matching(telegram, MERCHANT, lambda t: "/import SKU" in t), "help")
    assert telegram.refused_messages == []
    stock_reply = next(t for t in telegram.replies_to(MERCHANT) if "<pre>" in t)
    shown = telegram_html_text(stock_reply)
    assert "R&D-KEY-000" in shown and shown.rstrip().endswith("…")
    assert len(shown.encode("utf-16-le")) // 2 <= 4096


async def test_flood_control_is_waited_out(
    telegram: FakeTelegram, bot: tuple[TelegramBot, FakeEngine]
):
    # Over Telegram's flood limits sendMessage answers 429 with parameters.retry_after: the
    # reply is sent again once that wait is over, not lost.
    telegram.flood_until = time.monotonic() + 1
    telegram.message(MERCHANT, "/help")
    await wait_for(sent_matching(telegram, MERCHANT, lambda t: "/import SKU" in t), "help")


async def test_one_update_failing_on_our_side_does_not_stop_the_bot(
    telegram: FakeTelegram,
    bot: tuple[TelegramBot, FakeEngine],
    sqlite_store: SQLiteStore,
    monkeypatch: pytest.MonkeyPatch,
):
    running, _ = bot
    real = running.handle
    failed: list[int] = []

    async def faulty_once(update: dict[str, Any]) -> None:
        if not failed:
            failed.append(update["update_id"])
            raise RuntimeError("a fault of ours")
        await real(update)

    monkeypatch.setattr(running, "handle", faulty_once)
    telegram.message(MERCHANT, "/status")
    await wait_for(lambda: bool(failed), "the faulty update")
    telegram.message(MERCHANT, "/help")
    await wait_for(sent_matching(telegram, MERCHANT, lambda t: "/import SKU" in t), "help")
    # A row number past 63 bits names no order: answered, not lost in the ledger's refusal.
    telegram.message(MERCHANT, "/retry " + "9" * 40)
    await wait_for(lambda: len(telegram.replies_to(MERCHANT)) == 2, "the retry's answer")


async def test_an_alert_round_failing_at_one_chat_tells_no_chat_twice(
    tmp_path: Path,
    telegram: FakeTelegram,
    sqlite_store: SQLiteStore,
    sandbox: SandboxPlatform,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("KAMI_SECRET_PLATFORM_MAIN_SECRET", sandbox.secret)
    partner = MERCHANT + 1
    telegram.blocked_by.add(partner)  # the partner blocked the bot for a while
    settings = TelegramBotSettings(
        token_secret="bot.token",
        allowed_chats=(MERCHANT, partner),
        api_base=telegram.base_url,
        language="en",
        poll_seconds=1,
        alert_interval=0.05,
    )
    config = console_config(tmp_path, sandbox.base_url)
    running = TelegramBot(settings, BOT_TOKEN, config, sqlite_store, FakeEngine())
    await running.start()
    try:
        low = AlertCondition("low_stock:G", "low_stock", "warning", "G runs out soon")
        await sqlite_store.apply_alerts([low], [], time.time(), 3600, 3)
        await wait_for(lambda: len(telegram.replies_to(MERCHANT)) == 1, "the merchant's alert")
        await asyncio.sleep(0.3)  # several rounds failing at the partner
        telegram.blocked_by.clear()
        await wait_for(lambda: len(telegram.replies_to(partner)) == 1, "the partner's alert")
        await asyncio.sleep(0.3)
        assert len(telegram.replies_to(MERCHANT)) == 1 and len(telegram.replies_to(partner)) == 1
    finally:
        await running.stop()
