from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """
[store]
path = "kami.db"

[platforms.main]
base_url = "https://shop.example.com"
api_key = "id"
secret = "platform.main.secret"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_loads() -> None:
    config = load_config(ROOT / "config.example.toml")
    assert config.platforms[0].name == "main"
    assert config.skus["GAME-100"].max_quantity == 20
    assert config.agent.poll_interval == 2.0


def test_minimal_config_gets_defaults_and_relative_store(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.store.path == tmp_path / "kami.db"
    assert config.agent.concurrency == 16
    assert config.skus == {}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[agent]\npoll_interval = 0\n", "agent.poll_interval: must be between"),
        ("[agent]\nconcurrency = 2.5\n", "agent.concurrency: must be a whole number"),
        ("[agent]\npoll_intervall = 1\n", "agent.poll_intervall: is not a known setting"),
        ('[log]\nlevel = "loud"\n', "log.level: must be one of"),
        ('[skus."A"]\nmax_quantity = 0\n', "skus.A.max_quantity: must be between"),
        ('[skus."A"]\nmax_quantity = true\n', "skus.A.max_quantity: must be a whole number"),
        ('[agent]\nconcurrency = "8"\n', "agent.concurrency: must be a whole number"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, extra: str, expected: str) -> None:
    path = write(tmp_path, MINIMAL + extra)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


def test_bad_platform_url(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("https://shop.example.com", "ftp://x"))
    with pytest.raises(ConfigError, match=r"platforms\.main\.base_url: must be an http\(s\) URL"):
        load_config(path)


def test_missing_required_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"store: needs exactly one of path .* or url"):
        load_config(write(tmp_path, MINIMAL.replace('path = "kami.db"', "")))
    with pytest.raises(ConfigError, match="at least one"):
        load_config(write(tmp_path, '[store]\npath = "x.db"\n'))


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[store\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")


def test_postgres_store_settings(tmp_path: Path) -> None:
    url = "postgresql://kami@db.internal:5432/shop"
    text = MINIMAL.replace(
        'path = "kami.db"',
        f'url = "{url}"\npassword = "store.db-password"\ninstance = "box-a"\nlease_seconds = 30',
    )
    config = load_config(write(tmp_path, text))
    assert (config.store.url, config.store.instance, config.store.lease_seconds) == (
        url,
        "box-a",
        30.0,
    )
    assert config.store.path is None
    assert "store.db-password" in config.secret_names()
    both = MINIMAL.replace('path = "kami.db"', f'path = "kami.db"\nurl = "{url}"')
    with pytest.raises(ConfigError, match="exactly one of path"):
        load_config(write(tmp_path, both))
    with_password = MINIMAL.replace('path = "kami.db"', 'url = "postgresql://kami:hunter2@db/shop"')
    with pytest.raises(ConfigError, match=r"store\.url: must not contain a password"):
        load_config(write(tmp_path, with_password))
    wrong_scheme = MINIMAL.replace('path = "kami.db"', 'url = "mysql://kami@db/shop"')
    with pytest.raises(ConfigError, match=r"store\.url: must be a postgresql://"):
        load_config(write(tmp_path, wrong_scheme))


@pytest.mark.parametrize("name", ["mytoken", "Main_Secret", "tg.bot-token", "store.key"])
def test_plain_secret_names_are_accepted(tmp_path: Path, name: str) -> None:
    config = load_config(write(tmp_path, MINIMAL.replace("platform.main.secret", name)))
    assert config.platforms[0].secret_name == name


@pytest.mark.parametrize(
    "pasted",
    [
        "cs_8f9a7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f",  # a WooCommerce consumer secret
        "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw",  # a Telegram bot token
        "c2VjcmV0LXZhbHVlLXBhc3RlZA==",  # base64
    ],
)
def test_a_pasted_secret_is_refused_without_echo(tmp_path: Path, pasted: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, MINIMAL.replace("platform.main.secret", pasted)))
    assert "NAME of a secret" in str(refused.value)
    assert pasted not in str(refused.value)
