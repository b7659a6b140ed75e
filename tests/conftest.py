from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent import logs
from agent.config import (
    AgentSettings,
    Config,
    LogSettings,
    PlatformSettings,
    SkuSettings,
    StoreSettings,
)
from agent.domain import CardItem
from agent.keybox import parse_master_key
from agent.platforms.http import HttpPlatform
from agent.sandbox.platform import SandboxPlatform
from agent.store.sqlite import SQLiteStore

SKUS = ("GAME-100", "VIP-30D")
# The master key tests seal card keys with (base64 of 32 bytes), and its secret's env var.
TEST_STORE_KEY = "a2FtaS1hZ2VudCB0ZXN0IHN0b3JlIGtleSAzMiBieXQ="
STORE_KEY_ENV = "KAMI_SECRET_STORE_KEY"


def master_key_for_tests() -> bytes:
    return parse_master_key(TEST_STORE_KEY)


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> Iterator[None]:
    with open("/dev/null", "w") as sink:
        logs.configure("debug", sink)
        yield


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxPlatform]:
    platform = SandboxPlatform(api_key="test-key", secret="test-secret", seed=1)
    await platform.start()
    yield platform
    await platform.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
    await s.open()
    yield s
    await s.close()


def platform_settings(base_url: str, **overrides: object) -> PlatformSettings:
    values: dict[str, object] = {
        "name": "main",
        "kind": "http",
        "base_url": base_url,
        "api_key": "test-key",
        "secret_name": "platform.main.secret",
        "timeout": 2.0,
        "page_size": 50,
    }
    values.update(overrides)
    return PlatformSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def http_platform(sandbox: SandboxPlatform) -> AsyncIterator[HttpPlatform]:
    platform = HttpPlatform(platform_settings(sandbox.base_url), sandbox.secret)
    yield platform
    await platform.close()


def make_config(tmp_path: Path, base_url: str, **agent: object) -> Config:
    settings: dict[str, object] = {
        "poll_interval": 0.05,
        "sweep_interval": 0.05,
        "concurrency": 8,
        # fast backoff: fault-injection tests retry often, not slowly
        "retry_base": 0.05,
        "retry_cap": 0.5,
    }
    settings.update(agent)
    return Config(
        source=tmp_path / "config.toml",
        agent=AgentSettings(**settings),  # type: ignore[arg-type]
        store=StoreSettings(path=tmp_path / "kami.db"),
        log=LogSettings(),
        platforms=(platform_settings(base_url),),
        skus={sku: SkuSettings(sku=sku, max_quantity=10) for sku in SKUS},
    )


def keys(sku: str, count: int, start: int = 0) -> list[CardItem]:
    return [
        CardItem(code=f"{sku}-{i}", secret=f"S-{sku}-{i:06d}") for i in range(start, start + count)
    ]


async def stock(store: SQLiteStore, sku: str, count: int, start: int = 0) -> None:
    await store.import_keys(sku, keys(sku, count, start), "test", time.time())
