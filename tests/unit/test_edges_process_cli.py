"""Terminal escapes from platforms never reach the merchant's terminal through the CLI."""

from __future__ import annotations

import asyncio
import time
import unicodedata
from pathlib import Path

from agent.domain import AlertCondition, PlatformOrder, RejectedOrder
from agent.store.sqlite import SQLiteStore
from agent.textsafe import printable
from tests.conftest import master_key_for_tests, stock
from tests.unit.test_cli import cli, config_for

CLEAR_SCREEN_ID = "EVIL-1\x1b[2J\x1b[H"
BIDI_ID = "EVIL-2\u202egnp.exe"
TITLE_SKU = "\x1b]0;title\x07"


def raw_controls(text: str) -> list[str]:
    """Characters a terminal would act on or hide (the newlines of the output aside)."""
    return [c for c in text if c != "\n" and unicodedata.category(c) in {"Cc", "Cf"}]


def test_cli_tables_escape_control_characters_from_platforms(tmp_path: Path) -> None:
    config = config_for(tmp_path)

    async def seed() -> None:
        store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
        await store.open()
        await stock(store, TITLE_SKU, 2)
        now = time.time()
        order = PlatformOrder(
            CLEAR_SCREEN_ID, "paid", TITLE_SKU, 1, buyer_contact="b\x1b[31m@example.test"
        )
        await store.ingest("main", [order, RejectedOrder(BIDI_ID, "bad\x9b2J")], now)
        alert = AlertCondition(f"low_stock:{TITLE_SKU}", "low_stock", "warning", f"{TITLE_SKU} low")
        await store.apply_alerts([alert], [], now, 3600, 3)
        await store.close()

    asyncio.run(seed())
    outputs = {
        "orders list": cli(config, "orders", "list"),
        "orders show": cli(config, "orders", "show", CLEAR_SCREEN_ID),
        "orders show (bidi)": cli(config, "orders", "show", BIDI_ID),
        "status": cli(config, "status"),
        "stock list": cli(config, "stock", "list"),
    }
    for command, result in outputs.items():
        assert result.returncode == 0, (command, result.stderr)
        assert raw_controls(result.stdout + result.stderr) == [], command
    listing = outputs["orders list"].stdout
    assert "EVIL-1\\x1b[2J\\x1b[H" in listing and "EVIL-2\\u202egnp.exe" in listing
    assert "bad\\x9b2J" in listing
    assert "b\\x1b[31m@example.test" in outputs["orders show"].stdout
    assert "\\x1b]0;title" in listing  # the table's SKU column is 14 wide
    for command in ("orders show", "status", "stock list"):
        assert "\\x1b]0;title\\x07" in outputs[command].stdout, command
    assert "\\x1b]0;title\\x07 low" in outputs["status"].stdout


def test_printable_leaves_ordinary_text_of_any_script_alone() -> None:
    for text in ("SB0000001", "游戏点卡-100", "Ключ\u3000100", "a\\x1b"):
        assert printable(text) == text
    assert printable("\ud800x\u2028\U000e0001") == "\\ud800x\\u2028\\U000e0001"
