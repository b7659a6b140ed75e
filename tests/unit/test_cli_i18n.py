"""The CLI in Chinese and English (issue 18, item 3), run as the merchant runs it: the language
from `[agent] language` or the locale, tables lined up by display width with Chinese SKUs, one
translated line for an error, and `--json` the same in every language."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from agent.domain import AlertCondition, PlatformOrder
from agent.i18n import display_width
from agent.store.sqlite import SQLiteStore
from tests.conftest import master_key_for_tests, stock
from tests.unit.test_cli import cli

SKUS = ("GAME-100", "王者荣耀点券", "Steam 钱包 ¥50")


def shop(tmp_path: Path, language: str | None) -> Path:
    """A config with Chinese SKUs, its ledger made by `init` and stocked."""
    path = tmp_path / "config.toml"
    agent = f'[agent]\nlanguage = "{language}"\n' if language else ""
    skus = "".join(f'[skus."{sku}"]\nmax_quantity = 5\n' for sku in SKUS)
    path.write_text(
        f"""{agent}
[store]
path = "kami.db"

[platforms.main]
base_url = "http://127.0.0.1:9"
api_key = "test-key"
secret = "platform.main.secret"

{skus}""",
        encoding="utf-8",
    )
    made = cli(path, "init")
    assert made.returncode == 0, made.stderr

    async def seed() -> None:
        store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
        await store.open()
        for count, sku in zip((7, 12, 1234), SKUS, strict=True):
            await stock(store, sku, count)
        now = time.time()
        orders = [PlatformOrder(f"O-{i}", "paid", "王者荣耀点券", 1) for i in range(3)]
        await store.ingest("main", orders, now - 60)
        await store.apply_alerts(
            [AlertCondition("low_stock:王者荣耀点券", "low_stock", "warning", "王者荣耀点券 low")],
            [],
            now,
            3600,
            3,
        )
        await store.close()

    asyncio.run(seed())
    return path


def columns(line: str, cells: list[str]) -> list[tuple[int, int]]:
    """(first cell, cell after the last) of each value in the line, in display cells."""
    spans, search_from = [], 0
    for cell in cells:
        index = line.index(cell, search_from)
        start = display_width(line[:index])
        spans.append((start, start + display_width(cell)))
        search_from = index + len(cell)
    return spans


def sku_rows(stdout: str) -> dict[str, str]:
    return {sku: next(line for line in stdout.splitlines() if line.startswith(sku)) for sku in SKUS}


def assert_status_aligned(stdout: str, header: list[str]) -> None:
    """SKUs start at cell 0; stock, rate/h and pending end under their headings' right edge
    on every row, whatever the SKU's script (a Chinese character takes two cells)."""
    head = next(line for line in stdout.splitlines() if line.startswith(header[0]))
    edges = [end for _start, end in columns(head, header)]
    stocks = {"GAME-100": "7", "王者荣耀点券": "12", "Steam 钱包 ¥50": "1234"}
    pendings = {"GAME-100": "0", "王者荣耀点券": "3", "Steam 钱包 ¥50": "0"}
    for sku, line in sku_rows(stdout).items():
        rest = line[len(sku) :].split()
        rate = rest[1]
        spans = columns(line, [sku, stocks[sku], rate])
        assert spans[0][0] == 0
        assert [end for _start, end in spans[1:]] == edges[1:3], (line, head)
        pending_end = display_width(line[: line.index(f" {pendings[sku]}", len(sku) + 20) + 2])
        assert pending_end == edges[3], (line, head)


def test_status_in_chinese_lines_up_chinese_skus(tmp_path: Path) -> None:
    result = cli(shop(tmp_path, "zh-CN"), "status")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert_status_aligned(out, ["商品编码", "库存", "每小时", "待发"])
    assert "未关闭的告警" in out and "库存不足" in sku_rows(out)["王者荣耀点券"]
    assert "open alerts" not in out and "stock" not in out.splitlines()[0]


def test_status_in_english_lines_up_chinese_skus(tmp_path: Path) -> None:
    result = cli(shop(tmp_path, "en"), "status")
    assert result.returncode == 0, result.stderr
    assert_status_aligned(result.stdout, ["SKU", "stock", "rate/h", "pending"])
    assert "open alerts:" in result.stdout
    assert "low stock" in sku_rows(result.stdout)["王者荣耀点券"]


def test_the_language_defaults_from_the_locale(tmp_path: Path) -> None:
    config = shop(tmp_path, None)
    chinese = cli(config, "check", extra_env={"LANG": "zh_CN.UTF-8"})
    assert "配置" in chinese.stdout and "密钥 platform.main.secret：缺失" in chinese.stdout
    english = cli(config, "check", extra_env={"LANG": "en_US.UTF-8"})
    assert "secret platform.main.secret: MISSING" in english.stdout
    # The config's language wins over the locale.
    config.write_text('[agent]\nlanguage = "en"\n' + config.read_text(encoding="utf-8"))
    assert "MISSING" in cli(config, "check", extra_env={"LANG": "zh_CN.UTF-8"}).stdout


@pytest.mark.parametrize(
    ("language", "expected"),
    [
        ("zh-CN", "kami-agent: 错误：%s 中没有告警渠道（请添加 [notify.<name>] 表）"),
        ("en", "kami-agent: error: no alert channels in %s (add a [notify.<name>] table)"),
    ],
)
def test_an_error_is_one_line_in_the_merchants_language(
    tmp_path: Path, language: str, expected: str
) -> None:
    config = shop(tmp_path, language)
    result = cli(config, "notify", "test")
    assert result.returncode == 1
    assert result.stderr == expected % config + "\n"


def test_an_argument_error_before_the_config_speaks_the_locale(tmp_path: Path) -> None:
    config = shop(tmp_path, None)
    result = cli(config, "notify", "test", "--timeout", "999", extra_env={"LANG": "zh_CN.UTF-8"})
    assert result.returncode == 2
    assert "必须在 1 到 120 秒之间，收到的是 999" in result.stderr


def test_json_is_the_same_in_every_language(tmp_path: Path) -> None:
    config = shop(tmp_path, "zh-CN")
    chinese = json.loads(cli(config, "status", "--json").stdout)
    config.write_text(config.read_text(encoding="utf-8").replace("zh-CN", "en"))
    english = json.loads(cli(config, "status", "--json").stdout)
    for data in (chinese, english):
        for sku in data["skus"]:
            sku.pop("rate_per_hour")  # the sales rate moves with the clock
            sku.pop("time_to_empty_seconds")
    assert chinese == english
    assert [s["sku"] for s in chinese["skus"]] == sorted(SKUS)
    assert chinese["alerts"][0]["kind"] == "low_stock"


def test_terminal_escapes_in_a_sku_are_shown_not_obeyed(tmp_path: Path) -> None:
    config = shop(tmp_path, "zh-CN")
    hostile = "点券\x1b[2J\u202e"

    async def seed() -> None:
        store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
        await store.open()
        await stock(store, hostile, 2)
        await store.close()

    asyncio.run(seed())
    out = cli(config, "status").stdout
    assert "\x1b" not in out and "\u202e" not in out
    assert "点券\\x1b[2J\\u202e" in out


def test_import_report_and_refusals_in_chinese(tmp_path: Path) -> None:
    config = shop(tmp_path, "zh-CN")
    keys = tmp_path / "keys.csv"
    keys.write_text("code,secret\nC1,S1\nC2,S2\nC2,S2\nC3,S3\nbad,line,here\n", encoding="utf-8")
    result = cli(config, "stock", "import", "王者荣耀点券", str(keys))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("王者荣耀点券：新增 3，重复 1，拒收 1（")
    assert "  拒收 " in result.stdout and "S1" not in result.stdout + result.stderr
    # More than 10 keys to void without a terminal: refused, in Chinese, nothing voided.
    void = cli(config, "stock", "void", "Steam 钱包 ¥50", "--count", "11", "--reason", "泄露")
    assert void.returncode == 1
    assert void.stderr == "kami-agent: 错误：不作废这 11 个卡密：没有终端可询问，请加 --yes 确认\n"


def test_orders_list_lines_up_chinese_skus_and_reasons(tmp_path: Path) -> None:
    config = shop(tmp_path, "zh-CN")

    async def seed() -> None:
        store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
        await store.open()
        await store.ingest("main", [PlatformOrder("A-1", "paid", "GAME-100", 2)], time.time())
        await store.close()

    asyncio.run(seed())
    result = cli(config, "orders", "list")
    assert result.returncode == 0, result.stderr
    head, *rows = result.stdout.splitlines()
    assert head.split()[:4] == ["行", "平台", "订单", "商品编码"]
    by_order = {row.split()[2]: row for row in rows}
    assert set(by_order) == {"O-0", "O-1", "O-2", "A-1"}
    # The state column starts at the same cell on every row, Chinese SKU or not.
    starts = {columns(row, [order, row.split()[5]])[1][0] for order, row in by_order.items()}
    assert len(starts) == 1, result.stdout
    assert columns(head, ["状态"])[0][0] in starts


@pytest.mark.parametrize(("language", "header"), [("zh-CN", "商品编码"), ("en", "SKU")])
def test_stock_list_lines_up_chinese_skus(tmp_path: Path, language: str, header: str) -> None:
    result = cli(shop(tmp_path, language), "stock", "list")
    assert result.returncode == 0, result.stderr
    head, *rows = result.stdout.splitlines()
    assert head.startswith(header)
    # Every row ends in the same cell: the right-aligned counts line up under their headings.
    assert len({display_width(line) for line in [head, *rows]}) == 1, result.stdout
    assert {row.split()[-3] for row in rows} == {"7", "12", "1234"}
