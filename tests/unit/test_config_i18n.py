"""Config errors in the merchant's language (issue 18, item 3): the config's [agent] language
when the file says one, else the locale's; one line from the real CLI, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_cli import cli

PLATFORM = """
[store]
path = "kami.db"

[platforms.main]
base_url = "http://127.0.0.1:9"
api_key = "k"
secret = "platform.main.secret"
"""

CASES = [
    (
        "timeout = 9999",
        "platforms.main.timeout: 必须在 0.1 到 300 秒之间，收到的是 9999",
        "platforms.main.timeout: must be between 0.1 and 300 seconds, got 9999",
    ),
    (
        "timeot = 3",
        "platforms.main.timeot: 不是已知的设置项（是不是想写 timeout？）",
        "platforms.main.timeot: is not a known setting (did you mean timeout?)",
    ),
    (
        'kind = "woocomerce"',
        "platforms.main.kind: 未知的平台类型 'woocomerce'（是不是想写 'woocommerce'？已知：",
        "platforms.main.kind: unknown platform kind 'woocomerce' (did you mean 'woocommerce'?",
    ),
    (
        "api_key = 3",
        "platforms.main.api_key: 必须是非空字符串，收到的是 3",
        "platforms.main.api_key: must be a non-empty string, got 3",
    ),
    (  # a PostgreSQL setting beside a SQLite path: said so, not "unknown"
        "lease_seconds = 30",
        "store.lease_seconds: 只适用于 PostgreSQL 账本（store.url）；此账本是 SQLite（path）",
        "store.lease_seconds: applies to a PostgreSQL ledger (store.url) only; this one is"
        " SQLite (path)",
    ),
]


@pytest.mark.parametrize(("line", "chinese", "english"), CASES)
@pytest.mark.parametrize("language", ["zh-CN", "en"])
def test_a_bad_setting_is_one_line_in_the_configs_language(
    tmp_path: Path, line: str, chinese: str, english: str, language: str
) -> None:
    config = tmp_path / "config.toml"
    text = f'[agent]\nlanguage = "{language}"\n{PLATFORM}'
    if line.startswith("api_key"):
        text = text.replace('api_key = "k"', line)
    elif line.startswith("lease_seconds"):
        text = text.replace('path = "kami.db"', f'path = "kami.db"\n{line}')
    else:
        text += f"{line}\n"
    config.write_text(text, encoding="utf-8")
    # The locale says the other language: the config's wins.
    locale = "en_US.UTF-8" if language == "zh-CN" else "zh_CN.UTF-8"
    result = cli(config, "check", extra_env={"LANG": locale})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    if language == "zh-CN":
        assert result.stderr.startswith(f"kami-agent: 配置错误：{config}: {chinese}")
    else:
        assert result.stderr.startswith(f"kami-agent: config error: {config}: {english}")


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("zh_CN.UTF-8", "kami-agent: 配置错误：%s：TOML 格式错误：Expected ']'"),
        ("en_US.UTF-8", "kami-agent: config error: %s: invalid TOML: Expected ']'"),
    ],
)
def test_a_config_that_is_no_toml_speaks_the_locale(
    tmp_path: Path, locale: str, expected: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[agent\nlanguage = "en"\n', encoding="utf-8")
    result = cli(config, "status", extra_env={"LANG": locale})
    assert result.returncode == 2
    assert result.stderr.startswith(expected % config)
    assert "Traceback" not in result.stderr


def test_a_config_in_gbk_is_explained_in_chinese(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_bytes(f'[agent]\nlanguage = "zh-CN"\n# 说明\n{PLATFORM}'.encode("gbk"))
    result = cli(config, "check", extra_env={"LANG": "zh_CN.UTF-8"})
    assert result.returncode == 2
    assert "配置文件被保存成了中文编码（GBK/GB18030" in result.stderr
    assert "iconv -f GBK -t UTF-8 config.toml > config.utf8" in result.stderr


@pytest.mark.parametrize(
    ("language", "missing", "empty"),
    [
        (
            "zh-CN",
            "kami-agent: 错误：%s 处没有账本：运行 `kami-agent init` 创建，或从备份恢复\n",
            "kami-agent: 错误：账本 %s 是空的（0 字节）：它已不再是账本；",
        ),
        (
            "en",
            "kami-agent: error: no ledger at %s: run `kami-agent init` to create one, or restore"
            " it from backup\n",
            "kami-agent: error: the ledger %s is empty (0 bytes): it is not a ledger any more;",
        ),
    ],
)
def test_ledger_refusals_in_the_merchants_language(
    tmp_path: Path, language: str, missing: str, empty: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[agent]\nlanguage = "{language}"\n{PLATFORM}', encoding="utf-8")
    ledger = tmp_path / "kami.db"
    gone = cli(config, "status")
    assert gone.returncode == 1 and gone.stderr == missing % ledger
    ledger.write_bytes(b"")
    emptied = cli(config, "stock", "list")
    assert emptied.returncode == 1 and emptied.stderr.startswith(empty % ledger)


@pytest.mark.parametrize(
    ("language", "missing", "foreign"),
    [
        (
            "zh-CN",
            "kami-agent: 错误：账本 %(ledger)s 的已发卡密日志 %(journal)s 不见了：",
            "kami-agent: 错误：%(journal)s 不是已发卡密日志：请从备份恢复\n",
        ),
        (
            "en",
            "kami-agent: error: the bound-keys journal %(journal)s of the ledger %(ledger)s is"
            " missing:",
            "kami-agent: error: %(journal)s is not a bound-keys journal: restore it from backup\n",
        ),
    ],
)
def test_bound_journal_refusals_in_the_merchants_language(
    tmp_path: Path, language: str, missing: str, foreign: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[agent]\nlanguage = "{language}"\n{PLATFORM}', encoding="utf-8")
    assert cli(config, "init").returncode == 0
    ledger = tmp_path / "kami.db"
    journal = tmp_path / "kami.db.bound"
    where = {"ledger": ledger, "journal": journal}
    journal.unlink()
    gone = cli(config, "status")
    assert gone.returncode == 1 and "Traceback" not in gone.stderr
    assert len(gone.stderr.splitlines()) == 1 and gone.stderr.startswith(missing % where)
    journal.write_bytes(b"not a journal at all, but long enough to read a header from")
    junk = cli(config, "stock", "list")
    assert junk.returncode == 1 and junk.stderr == foreign % where


@pytest.mark.parametrize(
    ("language", "refusal"),
    [
        ("zh-CN", "kami-agent: 错误：请写明这些卡密当初作废时的原因\n"),
        ("en", "kami-agent: error: name the reason the keys were voided with\n"),
    ],
)
def test_ledger_operator_refusals_in_the_merchants_language(
    tmp_path: Path, language: str, refusal: str
) -> None:
    """A refusal of the ledger's operator checks (agent/store/ledger/stock.py), raised where
    the language is not known, said by the CLI in the merchant's (issue 18)."""
    config = tmp_path / "config.toml"
    config.write_text(f'[agent]\nlanguage = "{language}"\n{PLATFORM}', encoding="utf-8")
    assert cli(config, "init").returncode == 0
    blank = cli(config, "stock", "unvoid", "GAME-100", "--reason", " ")
    assert blank.returncode == 1 and blank.stderr == refusal
