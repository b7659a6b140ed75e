"""The adapters' own option errors (platforms, suppliers, alert channels) in the config's
language (issue 18, item 3): one line from the real `kami-agent check`, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_cli import cli

PLATFORM = """
[platforms.main]
base_url = "http://127.0.0.1:9"
api_key = "k"
secret = "platform.main.secret"
"""

CASES = {
    "kinguin": (
        """
[platforms.k]
kind = "kinguin"
base_url = "http://shop.example.com"
api_key = "id"
secret = "platform.k.secret"
[platforms.k.offers]
"o1" = "GAME-100"
""",
        "platforms.k.base_url: 必须是 https:// 地址（凭据要经由它传送），收到的是"
        " 'http://shop.example.com'",
        "platforms.k.base_url: must be an https:// URL (credentials travel in it), got"
        " 'http://shop.example.com'",
    ),
    "agiso template": (
        """
[platforms.a]
kind = "agiso"
base_url = "https://gw.api.agiso.com"
channel = "xianyu"
access_token = "platform.a.token"
api_key = "id"
secret = "platform.a.secret"
[platforms.a.products]
"123" = "GAME-100"
[platforms.a.templates]
"GAME-100" = "卡密：{卡密} {价格}"
""",
        "platforms.a.templates.GAME-100: 未知变量 {价格}（可用：{订单号}、{商品}、",
        "platforms.a.templates.GAME-100: unknown variable {价格} (known: {订单号}、{商品}、",
    ),
    "woocommerce": (
        """
[platforms.w]
kind = "woocommerce"
base_url = "https://shop.example.com"
api_key = "ck"
secret = "platform.w.secret"
long_poll = true
""",
        "platforms.w.long_poll: WooCommerce 不支持长轮询；请删除此项",
        "platforms.w.long_poll: WooCommerce has no long poll; remove it",
    ),
    "supplier": (
        PLATFORM
        + """
[suppliers.up]
kind = "fulu"
base_url = "https://openapi.fulu.com"
api_key = "k"
secret = "supplier.up.secret"
timeot = 3
""",
        "suppliers.up.timeot: 不是已知的设置项（是不是想写 timeout？）",
        "suppliers.up.timeot: is not a known setting (did you mean timeout?)",
    ),
    "email": (
        PLATFORM
        + """
[notify.mail]
kind = "email"
host = "smtp.example.test"
sender = "kami@example.test"
to = ["owner@example.test"]
tls = "ssl"
""",
        "notify.mail.tls: 必须是 starttls, implicit, none 之一，收到的是 'ssl'",
        "notify.mail.tls: must be one of starttls, implicit, none, got 'ssl'",
    ),
    "telegram": (
        PLATFORM
        + """
[notify.tg]
kind = "telegram"
token = "notify.tg.token"
chat_id = "me"
""",
        "notify.tg.chat_id: 必须是聊天的 ID：Telegram 给该聊天的数字，如 123456789",
        "notify.tg.chat_id: must be the chat's id: the number Telegram gives the chat,",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("language", ["zh-CN", "en"])
def test_an_adapters_option_error_is_one_line_in_the_configs_language(
    tmp_path: Path, case: str, language: str
) -> None:
    tables, chinese, english = CASES[case]
    config = tmp_path / "config.toml"
    config.write_text(
        f'[agent]\nlanguage = "{language}"\n[store]\npath = "kami.db"\n{tables}\n'
        '[skus."GAME-100"]\n',
        encoding="utf-8",
    )
    # The locale says the other language: the config's wins.
    locale = "en_US.UTF-8" if language == "zh-CN" else "zh_CN.UTF-8"
    result = cli(config, "check", extra_env={"LANG": locale})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    if language == "zh-CN":
        assert result.stderr.startswith(f"kami-agent: 配置错误：{config}: {chinese}")
    else:
        assert result.stderr.startswith(f"kami-agent: config error: {config}: {english}")
