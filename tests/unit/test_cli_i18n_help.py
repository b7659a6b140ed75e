"""The rest of the CLI in Chinese and English (issue 18, item 3), run as the merchant runs it:
`--help` of every command and argparse's own words, chosen before the parser is built (the
config's language, else the locale's); install-service; the import's progress line, its
per-line rejection reasons and a stock file it cannot read."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.cli.language import config_argument, early_language, speak_argparse
from agent.i18n import CHINESE, ENGLISH, Translator, display_width
from agent.progress import Progress
from tests.unit.test_cli import cli
from tests.unit.test_cli_i18n import shop
from tests.unit.test_ops_secrets import agent as agent_without_keyring
from tests.unit.test_ops_secrets import write_config


def language_only(tmp_path: Path, language: str | None) -> Path:
    """A config the parser can read its language from (nothing else needed for --help)."""
    path = tmp_path / "config.toml"
    path.write_text(f'[agent]\nlanguage = "{language}"\n' if language else "", encoding="utf-8")
    return path


def test_help_in_chinese_from_the_config(tmp_path: Path) -> None:
    config = language_only(tmp_path, "zh-CN")
    top = cli(config, "--help", extra_env={"LANG": "en_US.UTF-8", "COLUMNS": "80"})
    assert top.returncode == 0, top.stderr
    assert top.stdout.startswith("用法：kami-agent")
    assert "选项" in top.stdout and "显示此帮助信息并退出" in top.stdout
    assert "卡密库存" in top.stdout and "card key stock" not in top.stdout
    # Lines wrapped by display width: none with Chinese runs past the 80 cells asked for (the
    # list of every command, one word, is argparse's to wrap or not).
    assert max(display_width(line) for line in top.stdout.splitlines() if not line.isascii()) <= 80
    sub = cli(config, "stock", "import", "--help", extra_env={"COLUMNS": "80"})
    assert "把每条拒收行的行号和原因写入 FILE" in sub.stdout
    assert "write every rejected line" not in sub.stdout
    assert max(display_width(line) for line in sub.stdout.splitlines()) <= 80
    service = cli(config, "install-service", "--help")
    assert "以 root 运行时的步骤" in service.stdout and "只打印计划，不做改动" in service.stdout


def test_help_in_english_from_the_config_whatever_the_locale(tmp_path: Path) -> None:
    config = language_only(tmp_path, "en")
    top = cli(config, "--help", extra_env={"LANG": "zh_CN.UTF-8"})
    assert top.stdout.startswith("usage: kami-agent")
    assert "card key stock" in top.stdout and "卡密" not in top.stdout
    orders = cli(config, "orders", "refund", "--help", extra_env={"LANG": "zh_CN.UTF-8"})
    assert "Refund an order through its platform; its keys stay bound." in orders.stdout


def test_help_speaks_the_locale_when_the_config_names_no_language(tmp_path: Path) -> None:
    config = language_only(tmp_path, None)
    assert "卡密库存" in cli(config, "--help", extra_env={"LANG": "zh_CN.UTF-8"}).stdout
    assert "card key stock" in cli(config, "--help", extra_env={"LANG": "C.UTF-8"}).stdout
    # A config that cannot be read yet: the locale's language, and load() reports it later.
    config.write_text("[agent\nlanguage = 'en'\n", encoding="utf-8")
    broken = cli(config, "status", extra_env={"LANG": "zh_CN.UTF-8"})
    assert broken.returncode == 2
    assert "Traceback" not in broken.stderr


@pytest.mark.parametrize(
    ("language", "expected"),
    [
        ("zh-CN", "kami-agent orders list: 错误：参数 --state：无效的选择：'bogus'（可选："),
        ("en", "kami-agent orders list: error: argument --state: invalid choice: 'bogus'"),
    ],
)
def test_argparse_errors_in_the_configs_language(
    tmp_path: Path, language: str, expected: str
) -> None:
    config = language_only(tmp_path, language)
    result = cli(config, "orders", "list", "--state", "bogus", extra_env={"LANG": "C.UTF-8"})
    assert result.returncode == 2
    assert expected in result.stderr
    assert result.stderr.startswith("用法：" if language == "zh-CN" else "usage:")
    missing = cli(config, "stock", "import", extra_env={"LANG": "C.UTF-8"})
    assert ("缺少必需的参数：sku, file" if language == "zh-CN" else "are required: sku") in (
        missing.stderr
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-c", "a.toml", "status"], "a.toml"),
        (["-ca.toml", "status"], "a.toml"),
        (["--config", "a.toml", "status"], "a.toml"),
        (["--config=a.toml", "status"], "a.toml"),
        (["--conf", "a.toml", "status"], "a.toml"),
        (["status"], None),
        (["--", "-c", "a.toml"], None),
    ],
)
def test_the_config_argument_is_found_as_argparse_finds_it(
    argv: list[str], expected: str | None
) -> None:
    assert config_argument(argv) == expected


def test_early_language_reads_the_config_then_the_locale(tmp_path: Path) -> None:
    config = language_only(tmp_path, "zh-CN")
    assert early_language(["-c", str(config)], {"LANG": "en_US.UTF-8"}) == CHINESE
    assert early_language([], {"KAMI_AGENT_CONFIG": str(config)}) == CHINESE
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())  # Notepad's BOM
    assert early_language(["-c", str(config)], {}) == CHINESE
    config.write_text("not toml [", encoding="utf-8")
    assert early_language(["-c", str(config)], {"LANG": "zh_CN.UTF-8"}) == CHINESE
    assert early_language(["-c", str(config)], {"LANG": "en_US.UTF-8"}) == ENGLISH
    assert early_language(["-c", str(tmp_path / "absent.toml")], {}) == ENGLISH


def test_every_command_has_its_help_in_chinese() -> None:
    """Every subcommand's help line and every option's help in the parser built in Chinese
    is Chinese: a help string left outside `_()` would show English here."""
    from agent.cli.common import _

    argparse_words = (argparse._, argparse.ngettext)  # type: ignore[attr-defined]
    _.switch(CHINESE)
    speak_argparse(_)
    try:
        parser = build_parser()
    finally:
        _.switch(ENGLISH)
        argparse._, argparse.ngettext = argparse_words  # type: ignore[attr-defined]
    english: list[str] = []

    def walk(p: object) -> None:
        for action in p._actions:  # type: ignore[attr-defined]
            help_text = action.help
            if help_text and help_text != "==SUPPRESS==" and help_text.isascii():
                english.append(f"{p.prog}: {help_text}")  # type: ignore[attr-defined]
            for choice in (
                (action.choices or {}).values() if isinstance(action.choices, dict) else ()
            ):
                walk(choice)
            for sub in getattr(action, "_choices_actions", ()):
                if sub.help and sub.help.isascii():
                    english.append(f"{p.prog} {sub.dest}: {sub.help}")  # type: ignore[attr-defined]

    walk(parser)
    # What stays as written: addresses that are examples of what to type.
    allowed = ("sqlite:/path/to/kami.db", "postgresql://user@host:port/database")
    left = [line for line in english if not line.endswith(allowed)]
    assert not left, left


def test_install_service_speaks_chinese(tmp_path: Path) -> None:
    config = write_config(tmp_path, "/var/lib/kami-agent/kami.db")
    config.write_text('[agent]\nlanguage = "zh-CN"\n' + config.read_text(encoding="utf-8"))
    store = tmp_path / "credstore"
    env = {"KAMI_CREDSTORE": str(store), "KAMI_CREDSTORE_SEAL": "file"}
    missing = agent_without_keyring(
        config, "install-service", "--dry-run", "--credstore", str(store), env=env
    )
    assert missing.returncode == 1
    assert missing.stderr.startswith("kami-agent: 错误：缺少密钥：platform.main.secret；")
    env["KAMI_SECRET_PLATFORM_MAIN_SECRET"] = "p-1"
    plan = agent_without_keyring(
        config,
        "install-service",
        "--dry-run",
        "--credstore",
        str(store),
        "--unit-dir",
        str(tmp_path / "units"),
        "--bin",
        "/opt/kami-agent/bin/kami-agent",
        env=env,
    )
    out = plan.stdout
    assert out.startswith("install-service 计划（演练：未做任何改动）\n")
    assert "封存 store.key：新生成的随机账本主密钥" in out
    assert "封存 platform.main.secret：从当前保存位置复制" in out
    assert "- 运行：systemctl daemon-reload" in out
    assert "p-1" not in out + plan.stderr


def test_the_progress_line_in_chinese() -> None:
    ticks = iter([0.0, 10.0, 10.0])
    stream = io.StringIO()
    zh = Translator(CHINESE)
    progress = Progress(
        3000,
        zh("lines"),
        stream,
        interactive=False,
        every=5,
        clock=lambda: next(ticks),
        translator=zh,
    )
    progress.update(1000)
    assert stream.getvalue() == "进度：1,000/3,000 行 (33%)  100/秒  预计剩余 20.0 秒\n"
    english = io.StringIO()
    ticks = iter([0.0, 10.0, 10.0])
    Progress(3000, "lines", english, interactive=False, every=5, clock=lambda: next(ticks)).update(
        1000
    )
    assert english.getvalue() == "progress: 1,000/3,000 lines (33%)  100/s  ETA 20.0 s\n"


def test_stock_file_rejections_in_chinese(tmp_path: Path) -> None:
    config = shop(tmp_path, "zh-CN")
    keys = tmp_path / "keys.csv"
    keys.write_text(
        "code,secret,expiry\nC1,S1,2999-01-01\nC2,,\nC3,S3,soon\nC4,S4,2000-01-01\nbad,line,x,y\n",
        encoding="utf-8",
    )
    result = cli(config, "stock", "import", "王者荣耀点券", str(keys))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "新增 1，重复 0，拒收 4" in out
    assert "跳过 第 1 行：表头行（code,secret,expiry）" in out
    assert "拒收 第 3 行：卡密为空（1 行）" in out
    assert "拒收 第 4 行：有效期不是日期（YYYY-MM-DD）（1 行）" in out
    assert "拒收 第 5 行：已过期（1 行）" in out
    assert "拒收 第 6 行：4 个字段（应为：卡密；卡号,卡密；或 卡号,卡密,有效期）（1 行）" in out
    assert "1 个卡密带有有效期" in out
    assert "S1" not in out + result.stderr
    gone = cli(config, "stock", "import", "王者荣耀点券", str(tmp_path / "nowhere.csv"))
    assert gone.returncode == 1
    assert gone.stderr == f"kami-agent: 错误：库存文件 {tmp_path / 'nowhere.csv'} 不存在\n"


def test_stock_file_rejections_in_english(tmp_path: Path) -> None:
    config = shop(tmp_path, "en")
    keys = tmp_path / "keys.csv"
    keys.write_text("code,secret\nC1,S1\nC2,\nC3,\n", encoding="utf-8")
    out = cli(config, "stock", "import", "GAME-100", str(keys)).stdout
    assert "rejected lines 3-4: empty secret (2)" in out
    assert "skipped line 1: header row (code,secret)" in out
