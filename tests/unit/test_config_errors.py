"""Config errors a merchant can act on (issue 19, "Clear errors, never a traceback"): the file's
encoding, typos, units, the Telegram chat id, secret names that collide in the environment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.config import ConfigError, load_config
from agent.domain import AlertMessage
from agent.notify.factory import build_notifier

API_BASE = "https://api.telegram.org"

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """
[store]
path = "kami.db"

[platforms.main]
base_url = "https://shop.example.com"
api_key = "id"
secret = "platform.main.secret"
"""

TELEGRAM = """
[notify.tg]
kind = "telegram"
token = "notify.tg.token"
"""


def write(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "config.toml"
    path.write_bytes(text.encode(encoding))
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    return str(refused.value)


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xef\xbb\xbf" + (MINIMAL + '[agent]\ndelivery_message = "谢谢"\n').encode())
    assert load_config(path).agent.delivery_message == "谢谢"


def test_a_gbk_file_is_refused_with_the_cause_and_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[agent]\ndelivery_message = "感谢您的购买"\n', "gbk")
    message = refusal(path)
    assert str(path) in message
    assert "GBK" in message and "save it again as UTF-8" in message and "iconv" in message


def test_a_utf16_file_is_refused_with_the_cause(tmp_path: Path) -> None:
    message = refusal(write(tmp_path, MINIMAL, "utf-16"))
    assert "UTF-16" in message and "UTF-8" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[agent]\npoll_intervall = 1\n", "poll_intervall: is not a known setting (did you mean"),
        ("[alerts]\noutbox_intervals = 1\n", "did you mean outbox_interval?"),
        ("[notfy.x]\nkind = 'console'\n", "notfy: is not a known setting (did you mean notify?)"),
        ("[notify.x]\nkind = 'telegarm'\n", "unknown channel kind 'telegarm' (did you mean"),
    ],
)
def test_unknown_keys_get_a_suggestion(tmp_path: Path, extra: str, expected: str) -> None:
    assert expected in refusal(write(tmp_path, MINIMAL + extra))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[agent]\npoll_interval = 0\n", "must be between 0.05 and 3600 seconds, got 0"),
        ("[agent]\nconcurrency = 0\n", "agent.concurrency: must be between 1 and 512 lines"),
        ("[alerts]\nhalf_life = 0.5\n", "between 1 and 2592000 seconds (30 days), got 0.5"),
        ('[skus."A"]\nmax_quantity = 0\n', "must be between 1 and 1000 keys, got 0"),
    ],
)
def test_range_errors_name_the_unit(tmp_path: Path, extra: str, expected: str) -> None:
    assert expected in refusal(write(tmp_path, MINIMAL + extra))


def test_a_telegram_channel_as_documented_loads_with_the_default_api_base(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + TELEGRAM + 'chat_id = "123456"\n'))
    [channel] = config.notify
    assert (channel.options.chat_id, channel.options.api_base) == ("123456", API_BASE)
    assert "notify.tg.token" in config.secret_names()


@pytest.mark.parametrize("chat_id", ["123456789", "-1001234567890", '"@my_shop_alerts"'])
def test_a_chat_id_may_be_a_number(tmp_path: Path, chat_id: str) -> None:
    [channel] = load_config(write(tmp_path, MINIMAL + TELEGRAM + f"chat_id = {chat_id}\n")).notify
    assert channel.options.chat_id == chat_id.strip('"')


@pytest.mark.parametrize("chat_id", ['"my shop"', "1.5", "true", '""'])
def test_a_wrong_chat_id_is_explained(tmp_path: Path, chat_id: str) -> None:
    message = refusal(write(tmp_path, MINIMAL + TELEGRAM + f"chat_id = {chat_id}\n"))
    assert "notify.tg.chat_id: must be the chat's id: the number Telegram gives the chat" in message
    assert "getUpdates" in message and "@username" in message


def test_a_missing_chat_id_is_explained(tmp_path: Path) -> None:
    message = refusal(write(tmp_path, MINIMAL + TELEGRAM))
    assert "notify.tg.chat_id: is required: the chat's id" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (TELEGRAM + "chat_idd = 1\n", "notify.tg.chat_id: is required: the chat's id"),
        ("[platforms.two]\nbase_ur = 'https://x.test'\n", "platforms.two.base_url: is required"),
    ],
)
def test_a_misspelt_required_key_is_named(tmp_path: Path, extra: str, expected: str) -> None:
    message = refusal(write(tmp_path, MINIMAL + extra))
    assert expected in message
    assert f"({extra.splitlines()[-1].split(' =')[0]} is set: a typo?)" in message


async def test_a_numeric_chat_id_reaches_the_bot_api(tmp_path: Path) -> None:
    sent: list[Any] = []

    async def send_message(request: web.Request) -> web.Response:
        sent.append((request.match_info["token"], json.loads(await request.read())))
        return web.json_response({"ok": True, "result": {}})

    app = web.Application()
    app.router.add_post("/bot{token}/sendMessage", send_message)
    async with TestServer(app, host="127.0.0.1") as server:
        base = str(server.make_url("")).rstrip("/")
        text = MINIMAL + TELEGRAM + f'chat_id = 123456789\napi_base = "{base}"\n'
        [channel] = load_config(write(tmp_path, text)).notify
        notifier = build_notifier(channel, {"notify.tg.token": "42:bot-token"}.__getitem__)
        try:
            await notifier.send(
                AlertMessage("k", "low_stock", "opened", "warning", "stock is low", 0.0)
            )
        finally:
            await notifier.close()
    [(token, body)] = sent
    assert (token, body["chat_id"]) == ("42:bot-token", "123456789")


def uncommented(block: str) -> str:
    """config.example.toml with its commented `[notify.<block>]` table uncommented."""
    lines = (ROOT / "config.example.toml").read_text(encoding="utf-8").splitlines()
    start = lines.index(f"# [notify.{block}]")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("#"))
    lines[start:end] = [line.removeprefix("# ") for line in lines[start:end]]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("block", "kind"),
    [("tg", "telegram"), ("ding", "dingtalk"), ("wecom", "wecom"), ("feishu", "feishu")],
)
def test_the_examples_channels_are_valid_once_uncommented(
    tmp_path: Path, block: str, kind: str
) -> None:
    config = load_config(write(tmp_path, uncommented(block)))
    [channel] = [c for c in config.notify if c.name == block]
    assert channel.kind == kind
    secrets = {name: f"https://127.0.0.1/{name}" for name in config.secret_names()}
    build_notifier(channel, secrets.__getitem__)  # all it needs is there


def test_secret_names_sharing_an_environment_variable_are_refused(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + '[notify.hook]\nkind = "webhook"\nurl = "https://x.test/h"\nsecret = "store-key"\n'
    )
    message = refusal(write(tmp_path, text))
    assert "'store.key' and 'store-key'" in message
    assert "KAMI_SECRET_STORE_KEY" in message


def test_one_secret_named_twice_is_fine(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + '[notify.hook]\nkind = "webhook"\nurl = "https://x.test/h"\nsecret = "store.key"\n'
    )
    assert load_config(write(tmp_path, text)).notify[0].options.secret == "store.key"
