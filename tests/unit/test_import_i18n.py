"""A stock file with bad lines imported from the web console and through the Telegram bot: the
rejection reasons come back in the merchant's language, by line number, never by content."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import FormData

from agent.console.settings import TelegramBotSettings
from agent.store.sqlite import SQLiteStore
from agent.telegram_bot import TelegramBot
from tests.console_helpers import console_client, console_config, log_in
from tests.helpers import wait_for
from tests.unit.test_telegram_bot import BOT_TOKEN, MERCHANT, FakeTelegram, sent_matching

# Line 2 has a field too many, line 3 no secret, line 4 expired long ago.
BAD_LINES = "C1,SECRET-1\nC2,SECRET-2,2030-01-01,x\nC3,\nC4,SECRET-4,2001-01-01\n"
SECRET_LIKE = "SECRET-4"  # a rejected line's content never shows


async def _upload(language: str, tmp_path: Path, store: SQLiteStore) -> str:
    async with console_client(tmp_path, store, language=language) as client:
        csrf = await log_in(client)
        form = FormData()
        form.add_field("csrf", csrf)
        form.add_field("sku", "GAME-100")
        form.add_field("file", BAD_LINES.encode(), filename="bad.csv")
        started = await client.post("/stock/import", data=form, allow_redirects=False)
        progress_url = started.headers["Location"]

        async def finished() -> bool:
            return 'id="import-result"' in await (await client.get(progress_url)).text()

        await wait_for(finished, "the import to finish")
        return await (await client.get(progress_url)).text()


async def test_console_upload_says_the_rejections_in_chinese(
    tmp_path: Path, sqlite_store: SQLiteStore
):
    page = await _upload("zh-CN", tmp_path, sqlite_store)
    assert "新增 1，重复 0，拒收 3。" in page
    rejections = page.split('id="import-rejections"', 1)[1].split("</ul>", 1)[0]
    assert "第 2 行：4 个字段" in rejections
    assert "第 3 行：卡密为空" in rejections
    assert "第 4 行：已过期" in rejections
    assert "line" not in rejections and "expired" not in rejections
    assert SECRET_LIKE not in page


async def test_console_upload_says_the_rejections_in_english(
    tmp_path: Path, sqlite_store: SQLiteStore
):
    page = await _upload("en", tmp_path, sqlite_store)
    rejections = page.split('id="import-rejections"', 1)[1].split("</ul>", 1)[0]
    assert "line 2: 4 fields" in rejections and "line 4: expired" in rejections
    assert SECRET_LIKE not in page


async def _bot_import(language: str, tmp_path: Path, store: SQLiteStore) -> str:
    telegram = FakeTelegram(BOT_TOKEN)
    await telegram.start()
    settings = TelegramBotSettings(
        token_secret="bot.token",
        allowed_chats=(MERCHANT,),
        api_base=telegram.base_url,
        language=language,
        poll_seconds=1,
    )
    bot = TelegramBot(settings, BOT_TOKEN, console_config(tmp_path), store, None)
    await bot.start()
    try:
        telegram.document(MERCHANT, "/import VIP-30D", "bad.csv", BAD_LINES.encode())
        await wait_for(sent_matching(telegram, MERCHANT, lambda t: "VIP-30D" in t), "the reply")
        [reply] = telegram.replies_to(MERCHANT)
        return reply
    finally:
        await bot.stop()
        await telegram.stop()


async def test_bot_import_says_the_rejections_in_chinese(tmp_path: Path, sqlite_store: SQLiteStore):
    reply = await _bot_import("zh-CN", tmp_path, sqlite_store)
    assert "拒收 第 2 行：4 个字段" in reply
    assert "拒收 第 3 行：卡密为空" in reply
    assert "拒收 第 4 行：已过期" in reply
    assert "line" not in reply and SECRET_LIKE not in reply


async def test_bot_import_says_the_rejections_in_english(tmp_path: Path, sqlite_store: SQLiteStore):
    reply = await _bot_import("en", tmp_path, sqlite_store)
    assert "rejected line 2: 4 fields" in reply and "rejected line 4: expired" in reply
    assert SECRET_LIKE not in reply


async def test_console_upload_too_large_is_said_in_chinese(
    tmp_path: Path, sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("agent.console.uploads.MAX_UPLOAD_BYTES", 1024 * 1024)
    async with console_client(tmp_path, sqlite_store, language="zh-CN") as client:
        csrf = await log_in(client)
        form = FormData()
        form.add_field("csrf", csrf)
        form.add_field("sku", "GAME-100")
        form.add_field("file", b"K\n" * (600 * 1024), filename="big.txt")
        page = await (await client.post("/stock/import", data=form)).text()
    assert "文件太大（超过 1 MiB）。" in page
    assert await sqlite_store.free_counts() == {}
