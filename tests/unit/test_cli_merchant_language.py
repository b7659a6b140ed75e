"""The last English-only words of the CLI, in the merchant's language (each test failed before):
`kami-agent demo`'s progress and summary; where a secret is stored and why one is missing; the
line states and audit trail of `orders list/show`; argparse's headings, the range errors and
the options that had no help. The English stays as it was, byte for byte; `--state` and
`--json` keep the ledger's codes."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.config import SkuSettings
from agent.console.labels import EVENT_KINDS, STATE_LABELS
from agent.domain import LineState, PlatformOrder
from agent.i18n import CHINESE, Translator, display_width
from agent.intake import screen_order
from agent.lifecycle import NOTE_EVENTS, TABLES, event_kinds
from agent.store.sqlite import SQLiteStore
from tests.conftest import STORE_KEY_ENV, TEST_STORE_KEY, master_key_for_tests
from tests.console_helpers import add_orders
from tests.unit.test_cli import cli
from tests.unit.test_ops_secrets import agent as agent_without_keyring
from tests.unit.test_ops_secrets import write_config

ZH = Translator(CHINESE)

# --- kami-agent demo ------------------------------------------------------------------------


def run_demo(tmp_path: Path, lang: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAMI_", "LC_", "LANG"))}
    env |= {STORE_KEY_ENV: TEST_STORE_KEY, "TMPDIR": str(tmp_path), "LANG": lang}
    result = subprocess.run(
        [sys.executable, "-m", "agent", "demo", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # no config.toml here: the locale's language
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def summary_rows(stdout: str, heading: str) -> list[str]:
    return stdout.split(f"\n{heading}\n", 1)[1].splitlines()


def test_the_demo_speaks_the_locales_chinese(tmp_path: Path) -> None:
    out = run_demo(tmp_path, "zh_CN.UTF-8", "--orders", "10", "--burst", "20").stdout
    assert out.startswith("kami-agent 演示 —— 沙盒平台 http://127.0.0.1:"), out
    assert "  库存 GAME-100：1500 个卡密\n" in out
    assert "在本地库存用完时供应 GIFT-50" in out
    assert re.search(r"  t=\s*[\d.]+s  限时抢购：一下子涌入 20 笔订单\n", out), out
    assert re.search(r"\n  订单 +\d+  已发货 +\d+  等待库存 +\d+  需人工处理 \d+\n", out), out
    rows = summary_rows(out, "摘要")
    labels = ["平台上的订单", "已发货", "抢购订单已发货", "延迟 p50 / p99", "发货调用"]
    labels += ["向供应商补货", "低库存告警", "需人工处理", "不变量检查", "日志", "账本"]
    assert [row.split()[0] for row in rows if row.strip()][:5] == [
        "平台上的订单",
        "已发货",
        "抢购订单已发货",
        "延迟",
        "发货调用",
    ]
    for label in labels:
        assert any(row.startswith(f"  {label} ") for row in rows), (label, out)
    # The values line up in one column, whatever the labels' widths in cells.
    starts = set()
    for row in rows:
        label = next(lbl for lbl in sorted(labels, key=len, reverse=True) if f"  {lbl} " in row)
        value = row[2 + len(label) :].lstrip(" ")
        starts.add(display_width(row[: len(row) - len(value)]))
    assert len(starts) == 1, out
    assert "20/20" in out and "：未知商品 'NO-SUCH-SKU'（不在配置 [skus] 中）" in out
    assert re.search(r"  不变量检查 +正常：没有卡密发出两次（0 个重复）", out), out
    assert "账本完整性 正常" in out
    english = r"\b(orders|delivered|waiting|summary|keys|stock|supplier|invariants|latency)\b"
    # The alerts are the alert channel's (in Chinese too, quoting a command to run).
    ours = "\n".join(line for line in out.splitlines() if "[kami-agent]" not in line)
    assert not re.search(english, ours), out


def test_the_demo_in_english_is_as_it_was(tmp_path: Path) -> None:
    out = run_demo(tmp_path, "C.UTF-8", "--orders", "0", "--burst", "20").stdout
    assert out.startswith("kami-agent demo — sandbox platform at http://127.0.0.1:"), out
    assert "\n  stock GAME-100: 1500 keys\n  stock VIP-30D: 800 keys\n" in out
    assert "  supplier upstream at http://127.0.0.1:" in out
    assert "sells GIFT-50 when local stock is out\n" in out
    assert re.search(r"\n  t=\s*\d+\.\ds  flash sale: 20 orders at once\n", out), out
    assert re.search(r"\n  orders   22  delivered   20  waiting   0  needs attention 2\n", out)
    rows = summary_rows(out, "summary")
    assert rows[:3] == [
        "  orders on platform      22",
        "  delivered               20  (20 keys)",
        "  burst delivered         20/20",
    ]
    assert re.fullmatch(
        r"  latency p50 / p99       \d+ ms / \d+ ms  \(order visible -> delivery acked\)", rows[3]
    )
    assert rows[4:7] == [
        "  delivery calls          20 (faults injected: 5xx, lost responses, duplicate listings)",
        "  supplier fallback       not needed: 40 local GIFT-50 keys sufficed",
        "  low-stock alert         none for TOPUP-10: it never ran low, no order had to wait",
    ]
    assert sorted(rows[7:9]) == [
        "  needs attention         SB0000021: unknown SKU 'NO-SUCH-SKU' (not in config [skus])",
        "  needs attention         SB0000022: quantity must be at least 1, got 0",
    ]
    assert rows[9] == (
        "  invariants              ok: no key twice (0 reused), exact quantities (0 wrong),"
        " every good order delivered (0 not), ledger integrity ok"
    )
    assert rows[10].startswith("  logs                    ") and rows[10].endswith("kami-agent.log")
    assert rows[11].startswith("  ledger                  ") and rows[11].endswith("kami.db")


# --- where a secret is stored, and why one is missing ----------------------------------------


def secrets_shop(tmp_path: Path, language: str) -> tuple[Path, dict[str, str], Path]:
    config = write_config(tmp_path)
    config.write_text(f'[agent]\nlanguage = "{language}"\n' + config.read_text(encoding="utf-8"))
    store = tmp_path / "credstore"
    return config, {"KAMI_CREDSTORE": str(store), "KAMI_CREDSTORE_SEAL": "file"}, store


def test_where_a_secret_is_stored_is_said_in_chinese(tmp_path: Path) -> None:
    config, env, store = secrets_shop(tmp_path, "zh-CN")
    made = agent_without_keyring(config, "keys", "init", env=env)
    assert made.stdout.startswith(
        f"密钥 store.key：新的随机账本密钥已保存，封存在 {store / 'store.key'}（加密文件）。请备份"
    ), made.stdout + made.stderr
    name = "platform.main.secret"
    stored = agent_without_keyring(config, "secrets", "set", name, "--stdin", env=env, stdin="p\n")
    assert stored.stdout == f"密钥 {name}：已保存，封存在 {store / name}（加密文件）\n"
    where = agent_without_keyring(config, "secrets", "where", env=env).stdout
    assert f"{name}：封存在 {store / name}（加密文件）\n" in where
    variable = "KAMI_SECRET_PLATFORM_MAIN_SECRET"
    env_where = agent_without_keyring(config, "secrets", "where", env=env | {variable: "p"})
    assert f"{name}：环境变量（{variable}）\n" in env_where.stdout
    deleted = agent_without_keyring(config, "secrets", "delete", name, env=env)
    assert deleted.stdout == f"密钥 {name}：已从凭据库删除\n"
    again = agent_without_keyring(config, "secrets", "delete", name, env=env)
    assert again.stderr == f"kami-agent: 错误：密钥 '{name}' 既不在凭据库中，也不在密钥环中\n"
    assert f"{name}：缺失" in agent_without_keyring(config, "secrets", "where", env=env).stdout
    assert agent_without_keyring(config, "init", env=env).returncode == 0
    run = agent_without_keyring(config, "run", env=env)
    assert run.returncode == 1
    assert run.stderr == (
        f"kami-agent: 错误：密钥 '{name}' 未设置：请用 `kami-agent secrets set {name}` 保存，"
        f"或提供环境变量 {variable}\n"
    )


def test_where_a_secret_is_stored_in_english_is_as_it_was(tmp_path: Path) -> None:
    config, env, store = secrets_shop(tmp_path, "en")
    made = agent_without_keyring(config, "keys", "init", env=env)
    assert made.stdout.startswith(
        f"secret store.key: a new random store key is stored sealed in {store / 'store.key'}"
        " (encrypted file) — back it up"
    ), made.stdout + made.stderr
    name = "platform.main.secret"
    stored = agent_without_keyring(config, "secrets", "set", name, "--stdin", env=env, stdin="p\n")
    assert stored.stdout == f"secret {name}: stored sealed in {store / name} (encrypted file)\n"
    variable = "KAMI_SECRET_PLATFORM_MAIN_SECRET"
    env_where = agent_without_keyring(config, "secrets", "where", env=env | {variable: "p"})
    assert f"{name}: environment ({variable})\n" in env_where.stdout
    deleted = agent_without_keyring(config, "secrets", "delete", name, env=env)
    assert deleted.stdout == f"secret {name}: deleted from the credential store\n"
    again = agent_without_keyring(config, "secrets", "delete", name, env=env)
    assert again.stderr == (
        f"kami-agent: error: secret '{name}' is neither in the credential store nor the keyring\n"
    )
    assert agent_without_keyring(config, "init", env=env).returncode == 0
    run = agent_without_keyring(config, "run", env=env)
    assert run.stderr == (
        f"kami-agent: error: secret '{name}' is not set: store it with `kami-agent secrets set"
        f" {name}` or provide environment variable {variable}\n"
    )


# --- orders list / show: states and audit trail -----------------------------------------------


def every_line_event_kind() -> frozenset[str]:
    return frozenset().union(*(event_kinds(kind) for kind in TABLES)) | NOTE_EVENTS


def test_every_state_and_event_kind_of_the_lifecycle_has_a_chinese_name() -> None:
    assert set(STATE_LABELS) == set(LineState)
    missing = sorted(every_line_event_kind() - set(EVENT_KINDS))
    assert not missing, f"add to EVENT_KINDS in agent/console/labels.py: {missing}"
    for label in [*STATE_LABELS.values(), *EVENT_KINDS.values()]:
        assert ZH(label) != label and not ZH(label).isascii(), label


def orders_shop(tmp_path: Path, language: str, *, orders: bool = True) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.toml"
    path.write_text(
        f'[agent]\nlanguage = "{language}"\n\n[store]\npath = "kami.db"\n\n[platforms.main]\n'
        'base_url = "http://127.0.0.1:9"\napi_key = "k"\nsecret = "platform.main.secret"\n\n'
        '[skus."GAME-100"]\nmax_quantity = 5\n',
        encoding="utf-8",
    )
    assert cli(path, "init").returncode == 0
    if not orders:
        return path

    async def seed() -> None:
        store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
        await store.open()
        try:
            skus = {"GAME-100": SkuSettings(sku="GAME-100", max_quantity=5)}
            unknown = screen_order(PlatformOrder("P-UNKNOWN", "paid", "NO-SUCH", 1), skus)
            assert unknown is not None
            await store.ingest("main", [unknown], time.time())  # rejected at intake
            waiting, stuck = await add_orders(
                store, ("P-WAIT", "GAME-100", 2), ("P-STUCK", "GAME-100", 1)
            )
            await store.allocate(waiting, time.time())  # no stock: backordered
            await store.park(stuck, "the merchant should look", time.time())
        finally:
            await store.close()

    asyncio.run(seed())
    return path


def test_orders_say_states_and_events_in_chinese_and_filter_by_code(tmp_path: Path) -> None:
    config = orders_shop(tmp_path, "zh-CN")
    listing = cli(config, "orders", "list")
    assert listing.returncode == 0, listing.stderr
    states = {row.split()[2]: row.split()[5] for row in listing.stdout.splitlines()[1:]}
    assert states == {"P-UNKNOWN": "需人工处理", "P-WAIT": "缺货等待", "P-STUCK": "需人工处理"}
    parked = cli(config, "orders", "list", "--state", "needs_attention").stdout
    assert "P-STUCK" in parked and "P-WAIT" not in parked and "needs_attention" not in parked
    rejected = cli(config, "orders", "show", "P-UNKNOWN").stdout
    assert "接单时拒收" in rejected and "rejected" not in rejected, rejected
    stuck = cli(config, "orders", "show", "P-STUCK").stdout
    assert "转人工处理" in stuck and "parked" not in stuck and "收到订单" in stuck, stuck
    waiting = cli(config, "orders", "show", "P-WAIT").stdout
    assert "缺货等待" in waiting and "backordered" not in waiting, waiting
    # --json is for programs: the ledger's codes in every language.
    shown = json.loads(cli(config, "orders", "show", "P-UNKNOWN", "--json").stdout)
    assert shown[0]["state"] == "needs_attention"
    assert [e["kind"] for e in shown[0]["events"]] == ["rejected"]


def test_orders_in_english_show_the_codes_as_before(tmp_path: Path) -> None:
    config = orders_shop(tmp_path, "en")
    listing = cli(config, "orders", "list").stdout
    states = {row.split()[2]: row.split()[5] for row in listing.splitlines()[1:]}
    assert states == {
        "P-UNKNOWN": "needs_attention",
        "P-WAIT": "backordered",
        "P-STUCK": "needs_attention",
    }
    trail = cli(config, "orders", "show", "P-STUCK").stdout.split("audit trail:\n", 1)[1]
    assert [row.split()[2] for row in trail.splitlines()[1:]] == ["intake", "parked"]


def test_an_empty_listing_says_so(tmp_path: Path) -> None:
    # A header alone says nothing: the ledger is empty, or nothing is in the state asked for.
    for language, empty, none_parked in (
        ("en", "no order lines in the ledger yet", "no order lines are delivered"),
        ("zh-CN", "账本中还没有订单行", "没有状态为“已发货”的订单行"),
    ):
        config = orders_shop(tmp_path / language, language)
        listing = cli(config, "orders", "list", "--state", "delivered")
        assert listing.returncode == 0 and listing.stdout.strip() == none_parked, listing
        config = orders_shop(tmp_path / f"{language}-empty", language, orders=False)
        listing = cli(config, "orders", "list")
        assert listing.returncode == 0 and listing.stdout.strip() == empty, listing


# --- argparse's headings, range errors, options without help ----------------------------------


def language_only(tmp_path: Path, language: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[agent]\nlanguage = "{language}"\n', encoding="utf-8")
    return path


def test_help_headings_end_with_a_full_width_colon_in_chinese(tmp_path: Path) -> None:
    zh = cli(language_only(tmp_path, "zh-CN"), "orders", "show", "--help").stdout
    assert "\n位置参数：\n" in zh and "\n选项：\n" in zh, zh
    assert not re.search(r"^\S.*[^\x00-\x7f]:$", zh, re.M), zh
    en = cli(language_only(tmp_path, "en"), "orders", "show", "--help").stdout
    assert "\npositional arguments:\n" in en and "\noptions:\n" in en


@pytest.mark.parametrize(
    ("args", "chinese", "english"),
    [
        (
            ("orders", "list", "--limit", "0"),
            "参数 --limit：必须在 1 到 1,000,000 行之间，收到的是 0\n",
            "argument --limit: must be between 1 and 1,000,000 lines, got 0\n",
        ),
        (
            ("orders", "replace-key", "A-1", "--reason", "x", "--slot", "99999"),
            "参数 --slot：必须在 0 到 10,000 之间，收到的是 99999\n",
            "argument --slot: must be between 0 and 10,000, got 99999\n",
        ),
    ],
)
def test_a_number_out_of_range_reads_naturally(
    tmp_path: Path, args: tuple[str, ...], chinese: str, english: str
) -> None:
    zh = cli(language_only(tmp_path, "zh-CN"), *args)
    assert zh.returncode == 2 and zh.stderr.endswith(chinese), zh.stderr
    en = cli(language_only(tmp_path, "en"), *args)
    assert en.returncode == 2 and en.stderr.endswith(english), en.stderr


def test_a_setting_out_of_range_reads_naturally(tmp_path: Path) -> None:
    config = language_only(tmp_path, "zh-CN")
    config.write_text(config.read_text() + "poll_interval = 0\n", encoding="utf-8")
    assert (
        "agent.poll_interval: 必须在 0.05 到 3600 秒之间，收到的是 0" in cli(config, "check").stderr
    )


def test_every_option_has_its_help() -> None:
    """An option without help shows only its name in `--help` (stock export --state did)."""
    bare: list[str] = []

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    walk(child)
            elif not action.help:
                bare.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser())
    assert not bare, bare


def test_stock_export_says_which_states_in_chinese(tmp_path: Path) -> None:
    shown = cli(language_only(tmp_path, "zh-CN"), "stock", "export", "--help").stdout
    assert "导出哪些卡密：free（在库存中，默认）" in shown, shown
