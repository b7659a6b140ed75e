"""The [console], [metrics] and [telegram_bot] tables: off by default, one clear line for a
bad value, the secrets they name listed for `kami-agent check`."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.console.passwords import hash_password, verify_password

MINIMAL = """
[store]
path = "kami.db"

[platforms.main]
base_url = "https://shop.example.com"
api_key = "id"
secret = "platform.main.secret"
"""


def load(tmp_path: Path, extra: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL + extra, encoding="utf-8")
    return load_config(path)


def test_all_off_by_default(tmp_path: Path):
    config = load(tmp_path, "")
    interfaces = config.interfaces
    assert interfaces is not None
    assert (interfaces.console, interfaces.metrics, interfaces.telegram_bot) == (None, None, None)


def test_console_table(tmp_path: Path):
    config = load(
        tmp_path,
        '[console]\ntoken = "console.token"\nlanguage = "zh-CN"\nport = 8800\n'
        "secure_cookie = true\n",
    )
    console = config.interfaces.console  # type: ignore[union-attr]
    assert console is not None
    assert (console.host, console.port, console.language) == ("127.0.0.1", 8800, "zh-CN")
    assert console.secure_cookie and console.token_secret == "console.token"
    assert "console.token" in config.secret_names()
    off = load(tmp_path, '[console]\nenabled = false\ntoken = "console.token"\n')
    assert off.interfaces.console is None  # type: ignore[union-attr]


def test_console_language_defaults_from_the_locale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("LANGUAGE", "LC_ALL", "LC_MESSAGES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    config = load(tmp_path, '[console]\ntoken = "console.token"\n')
    assert config.interfaces.console.language == "zh-CN"  # type: ignore[union-attr]
    monkeypatch.setenv("LANG", "en_US.UTF-8")
    config = load(tmp_path, '[console]\ntoken = "console.token"\n')
    assert config.interfaces.console.language == "en"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[console]\n", "console: needs a way to log in"),
        ('[console]\ntoken = "console.token"\nlanguage = "fr"\n', "console.language: must be"),
        ('[console]\ntoken = "console.token"\nhost = "localhost"\n', "console.host: must be an IP"),
        ('[console]\ntoken = "console.token"\nport = 0\n', "console.port: must be between"),
        ('[console]\ntoken = "console.token"\ncolour = 1\n', "console.colour: is not a known"),
        ('[console]\ntoken = "aZ3kP9qW2xR7tY5uI8oP"\n', "console.token: must be the NAME"),
        ('[console]\npassword_hash = "hunter2"\n', "console.password_hash: must be scrypt"),
        (
            '[console]\npassword_hash = "scrypt$1048577$8$1$c2FsdHNhbHQ='
            '$aGFzaGhhc2hoYXNoaGFzaA=="\n',
            "console.password_hash: scrypt parameters out of range",
        ),
        ("[metrics]\nport = 70000\n", "metrics.port: must be between"),
        ('[telegram_bot]\ntoken = "bot.token"\n', "telegram_bot.allowed_chats: must be"),
        (
            '[telegram_bot]\ntoken = "bot.token"\nallowed_chats = ["me"]\n',
            "telegram_bot.allowed_chats: must be",
        ),
        (
            '[telegram_bot]\ntoken = "bot.token"\nallowed_chats = [1]\n'
            'api_base = "http://api.example.org"\n',
            "telegram_bot.api_base: must be https",
        ),
    ],
)
def test_bad_values_are_one_clear_line(tmp_path: Path, extra: str, expected: str):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, extra)
    assert expected in str(caught.value)
    assert "aZ3kP9qW2xR7tY5uI8oP" not in str(caught.value)


def test_metrics_and_bot_tables(tmp_path: Path):
    config = load(
        tmp_path,
        "[metrics]\nport = 9500\n"
        '[telegram_bot]\ntoken = "bot.token"\nallowed_chats = [42, -100123]\nlanguage = "en"\n',
    )
    interfaces = config.interfaces
    assert interfaces is not None and interfaces.metrics is not None
    assert interfaces.metrics.port == 9500
    bot = interfaces.telegram_bot
    assert bot is not None and bot.allowed_chats == (42, -100123)
    assert "bot.token" in config.secret_names()


def test_password_hashes():
    line = hash_password("correct horse battery")
    assert line.startswith("scrypt$")
    assert verify_password("correct horse battery", line)
    assert not verify_password("correct horse batterY", line)
    import base64
    import hashlib

    salt = b"0123456789abcdef"
    digest = hashlib.pbkdf2_hmac("sha256", b"pw-pw-pw-pw", salt, 200_000)
    pbkdf2 = (
        f"pbkdf2_sha256$200000${base64.b64encode(salt).decode()}$"
        f"{base64.b64encode(digest).decode()}"
    )
    assert verify_password("pw-pw-pw-pw", pbkdf2)
    assert not verify_password("pw-pw-pw-px", pbkdf2)
