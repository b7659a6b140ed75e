from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

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
from agent.store.base import Store
from agent.store.identity import Opening
from agent.store.sqlite import SQLiteStore
from tests.pg_server import REQUIRE_ENV, PgServer
from tests.pg_server import start as start_pg_server

# The tests read English (the msgids), whatever the developer's locale: the daemon's and the
# CLI's language default from it. A test that wants Chinese says so (config or environment).
for _variable in ("LANGUAGE", "LC_ALL", "LC_MESSAGES"):
    os.environ.pop(_variable, None)
os.environ["LANG"] = "C.UTF-8"

SKUS = ("GAME-100", "VIP-30D")
# The master key tests seal card keys with (base64 of 32 bytes), and its secret's env var.
TEST_STORE_KEY = "a2FtaS1hZ2VudCB0ZXN0IHN0b3JlIGtleSAzMiBieXQ="
STORE_KEY_ENV = "KAMI_SECRET_STORE_KEY"


def master_key_for_tests() -> bytes:
    return parse_master_key(TEST_STORE_KEY)


@pytest.fixture(autouse=True, scope="session")
def quiet_logs() -> Iterator[TextIO]:
    """Every log line goes through the whole pipeline, into /dev/null. A test that logs
    elsewhere puts this sink back when done (it stays open for the whole session)."""
    with open("/dev/null", "w") as sink:
        logs.configure("debug", sink)
        yield sink


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxPlatform]:
    platform = SandboxPlatform(api_key="test-key", secret="test-secret", seed=1)
    await platform.start()
    yield platform
    await platform.stop()


def pg_server_or_skip(*, own: bool = False) -> PgServer:
    """A PostgreSQL server, or a skip saying why not (a failure in CI, see .ci/run)."""
    try:
        import asyncpg  # noqa: F401

        return start_pg_server(own=own)
    except (ImportError, RuntimeError) as exc:
        message = f"PostgreSQL tests cannot run: {exc}"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the session (see tests/pg_server.py)."""
    server = pg_server_or_skip()
    yield server
    server.stop()


def _admin(url: str, sql: str) -> None:
    """One statement on the server, from sync code (fixtures may sit inside a running loop)."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database for one test."""
    name = f"kami_test_{uuid.uuid4().hex[:12]}"
    _admin(pg_server.url, f"CREATE DATABASE {name}")
    yield pg_server.url.rsplit("/", 1)[0] + f"/{name}"
    _admin(pg_server.url, f"DROP DATABASE {name} WITH (FORCE)")


def open_test_store(backend: str, tmp_path: Path, url: str | None = None, **pg: Any) -> Store:
    """A new ledger, made (on its first open) the way `kami-agent init` makes one."""
    if backend == "sqlite":
        return SQLiteStore(tmp_path / "kami.db", master_key_for_tests(), opening=Opening.CREATE)
    from agent.store.postgres import PostgresStore

    assert url is not None
    return PostgresStore(url, master_key_for_tests(), opening=Opening.CREATE, **pg)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """The Store contract holds for both backends: every test using this runs on each."""
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    s = open_test_store(request.param, tmp_path, url, instance="test")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "kami.db", master_key_for_tests(), opening=Opening.CREATE)
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


async def stock(store: Store, sku: str, count: int, start: int = 0) -> None:
    await store.import_keys(sku, keys(sku, count, start), "test", time.time())
