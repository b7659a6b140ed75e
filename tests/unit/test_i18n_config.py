"""One language for the whole daemon (issue 18, item 3): `[agent] language` from the config or
the locale, used by the console and the bot unless their table says otherwise; the buyers'
language apart, for notices and the default delivery message."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.settings import AgentSettings, default_delivery_messages

MINIMAL = """
[store]
path = "kami.db"

[platforms.main]
base_url = "https://shop.example.com"
api_key = "id"
secret = "platform.main.secret"
"""
CONSOLE = '[console]\ntoken = "console.token"\n'
BOT = '[telegram_bot]\ntoken = "bot.token"\nallowed_chats = [42]\n'


@pytest.fixture
def locale(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for name in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        monkeypatch.delenv(name, raising=False)

    def use(value: str) -> None:
        monkeypatch.setenv("LANG", value)

    return use


def load(tmp_path: Path, extra: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL + extra, encoding="utf-8")
    return load_config(path)


def test_language_defaults_from_the_locale(tmp_path: Path, locale) -> None:  # type: ignore[no-untyped-def]
    locale("zh_CN.UTF-8")
    config = load(tmp_path, CONSOLE + BOT)
    assert config.agent.language == "zh-CN" and config.agent.buyers_language == "zh-CN"
    assert config.interfaces.console.language == "zh-CN"  # type: ignore[union-attr]
    locale("en_US.UTF-8")
    assert load(tmp_path, "").agent.language == "en"


def test_one_setting_for_the_whole_daemon(tmp_path: Path, locale) -> None:  # type: ignore[no-untyped-def]
    locale("en_US.UTF-8")
    config = load(tmp_path, '[agent]\nlanguage = "zh_CN"\n' + CONSOLE + BOT)
    assert config.agent.language == "zh-CN"
    interfaces = config.interfaces
    assert interfaces is not None and interfaces.console and interfaces.telegram_bot
    assert interfaces.console.language == interfaces.telegram_bot.language == "zh-CN"
    # An interface may still speak another language than the rest, when its table says so.
    config = load(tmp_path, '[agent]\nlanguage = "zh-CN"\n' + CONSOLE + 'language = "en"\n')
    assert config.interfaces.console.language == "en"  # type: ignore[union-attr]


def test_buyers_may_read_another_language(tmp_path: Path, locale) -> None:  # type: ignore[no-untyped-def]
    locale("C.UTF-8")
    config = load(tmp_path, '[agent]\nlanguage = "zh-CN"\nbuyer_language = "en"\n')
    assert (config.agent.language, config.agent.buyers_language) == ("zh-CN", "en")
    assert config.agent.message_with_keys() == "Thank you for your order."


@pytest.mark.parametrize("key", ["language", "buyer_language"])
def test_an_unknown_language_is_one_clear_line(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, f'[agent]\n{key} = "fr"\n')
    assert f"agent.{key}" in str(refused.value) and "zh-CN, en" in str(refused.value)


def test_default_delivery_message_in_the_buyers_language() -> None:
    assert AgentSettings(language="zh-CN").message_with_keys() == "感谢您的购买。"
    assert AgentSettings(language="en").message_with_keys() == "Thank you for your order."
    assert (
        AgentSettings(language="en", buyer_language="zh-CN").message_with_keys() == "感谢您的购买。"
    )
    # The merchant's own message goes out as written, whatever the language.
    own = AgentSettings(language="zh-CN", delivery_message="Enjoy the game!")
    assert own.message_with_keys() == "Enjoy the game!"
    assert default_delivery_messages() == {"Thank you for your order.", "感谢您的购买。"}
