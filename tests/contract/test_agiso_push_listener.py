"""Agiso pushes through the inbound listener (agent/platforms/agiso_listener.py): the real engine
in-process with its listener on 127.0.0.1 and the doc-built fake gateway (tests/fakes/agiso.py)
signing the pushes. A paid push is committed to the ledger before it is answered, repeats are
answered alike and deliver nothing more, a bad signature or a stale timestamp is refused before
the json is parsed."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import safejson
from agent.config import AlertSettings, ConfigError, PlatformSettings, SkuSettings, parse_config
from agent.domain import CardItem, LineState
from agent.listener import listener_mounts
from agent.listener_routes import ListenerContext
from agent.listener_settings import ListenerSettings
from agent.platforms import agiso_client as client_module
from agent.platforms.agiso import AgisoOptions, AgisoPlatform
from agent.runtime import run_engine
from agent.store.base import Store
from tests.conftest import make_config
from tests.daemon import import_stock, start_daemon
from tests.fakes.agiso import FakeAgiso, ShiftedClock

APP_ID = "2024010112345678"
APP_SECRET = "agiso-app-secret-for-tests-0001"
TOKEN = "AldsIdleTESTTOKENxianyu00000001"
ITEM = "669513624774"
SKU = "GAME-100"


@pytest.fixture(autouse=True)
def fresh_app_state() -> Iterator[None]:
    """Holds and limiters are process-wide by AppId: each test starts without any."""
    client_module._APP_HOLDS.clear()
    client_module._LIMITERS.clear()
    yield
    client_module._APP_HOLDS.clear()
    client_module._LIMITERS.clear()


@pytest.fixture
async def fake() -> AsyncIterator[FakeAgiso]:
    server = FakeAgiso(APP_ID, APP_SECRET, seed=17, clock=ShiftedClock())
    server.add_shop("xianyu", TOKEN)
    await server.start()
    yield server
    await server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def shop(fake: FakeAgiso) -> PlatformSettings:
    return PlatformSettings(
        name="xianyu",
        kind="agiso",
        base_url=fake.base_url,
        api_key=APP_ID,
        secret_name="agiso.app.secret",
        timeout=2.0,
        page_size=50,
        options=AgisoOptions(
            channel="xianyu",
            access_token_secret="agiso.xianyu.token",
            products={ITEM: SKU},
        ),
    )


@dataclasses.dataclass
class Rig:
    fake: FakeAgiso
    store: Store
    url: str
    http: aiohttp.ClientSession

    async def push(self, query: dict[str, str], form: dict[str, str]) -> tuple[int, bytes]:
        async with self.http.post(self.url, params=query, data=form) as response:
            return response.status, await response.read()

    async def lines(self, tid: str) -> list[Any]:
        return [line for line in await self.store.find_lines(tid) if line.order_id == tid]


@asynccontextmanager
async def running(tmp_path: Path, fake: FakeAgiso, store: Store) -> AsyncIterator[Rig]:
    """The engine with its listener; the poll interval long, so only the push takes orders in
    (闲鱼 has no list call anyway)."""
    port = free_port()
    config = make_config(tmp_path, fake.base_url, reconcile_interval=2.0, poll_interval=3600.0)
    config = dataclasses.replace(
        config,
        platforms=(shop(fake),),
        skus={SKU: SkuSettings(sku=SKU, max_quantity=10)},
        alerts=AlertSettings(forecast_interval=0.1),
        listener=ListenerSettings(port=port),
    )
    platform = AgisoPlatform(config.platforms[0], APP_SECRET, TOKEN, 8, clock=fake.clock)
    stop = asyncio.Event()
    task = asyncio.create_task(run_engine(config, store, {"xianyu": platform}, stop))
    url = f"http://127.0.0.1:{port}/agiso/xianyu"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:  # until the listener answers (an unsigned push: 403)
                assert not task.done(), "the engine stopped"
                try:
                    async with http.post(url, data={"json": "{}"}) as response:
                        if response.status == 403:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "the listener never came up"
                await asyncio.sleep(0.05)
            yield Rig(fake, store, url, http)
    finally:
        stop.set()
        await task
        await platform.close()


async def stock(store: Store, count: int) -> set[str]:
    items = [CardItem(f"PUSH{i:05d}", f"PUSH-PWD-{i:05d}-qq") for i in range(count)]
    await store.import_keys(SKU, items, "test", time.time())
    return {i.secret for i in items}


def shown(fake: FakeAgiso, tid: str, secrets: set[str]) -> int:
    """How many times the buyer can read one of our keys on this order."""
    order = fake.orders[tid]
    texts = order.im + order.ww + [f"{c}\t{p}" for c, p in order.cards]
    return sum(text.count(secret) for text in texts for secret in secrets)


async def delivered(rig: Rig, tid: str) -> None:
    deadline = time.monotonic() + 60
    while not (lines := await rig.lines(tid)) or lines[0].state is not LineState.DELIVERED:
        assert time.monotonic() < deadline, f"{tid} not delivered: {lines}"
        await asyncio.sleep(0.05)


async def test_a_xianyu_push_is_in_the_ledger_when_answered_and_delivered_once(
    tmp_path: Path, fake: FakeAgiso, sqlite_store: Store
) -> None:
    secrets = await stock(sqlite_store, 5)
    tid = fake.add_order("xianyu", ITEM)
    async with running(tmp_path, fake, sqlite_store) as rig:
        status, body = await rig.push(*fake.push(tid))
        assert (status, body) == (200, b"")
        # The answer comes only once the order is committed.
        assert len(await rig.lines(tid)) == 1
        await delivered(rig, tid)
        assert fake.shipped(tid)
        assert shown(fake, tid, secrets) == 1


async def test_the_same_push_three_times_delivers_once_with_the_same_answer(
    tmp_path: Path, fake: FakeAgiso, sqlite_store: Store
) -> None:
    secrets = await stock(sqlite_store, 5)
    tid = fake.add_order("xianyu", ITEM)
    async with running(tmp_path, fake, sqlite_store) as rig:
        push = fake.push(tid)
        answers = [await rig.push(*push) for _ in range(3)]
        assert answers == [(200, b"")] * 3
        await delivered(rig, tid)
        # and once more after the delivery, as Agiso may
        assert await rig.push(*push) == (200, b"")
        await asyncio.sleep(0.3)
        assert len(await rig.lines(tid)) == 1
        assert shown(fake, tid, secrets) == 1


async def test_a_bad_signature_or_a_stale_timestamp_is_refused_without_parsing(
    tmp_path: Path, fake: FakeAgiso, sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await stock(sqlite_store, 5)
    tid = fake.add_order("xianyu", ITEM)
    parsed: list[str] = []
    real_loads = safejson.loads

    def spying_loads(text: Any, *args: Any, **kwargs: Any) -> Any:
        parsed.append("json")
        return real_loads(text, *args, **kwargs)

    async with running(tmp_path, fake, sqlite_store) as rig:
        monkeypatch.setattr(safejson, "loads", spying_loads)
        query, form = fake.push(tid)
        forged = dict(query, sign="0" * 32)
        assert (await rig.push(forged, form))[0] == 403
        tampered = {"json": form["json"].replace(ITEM, "1")}
        assert (await rig.push(query, tampered))[0] == 403
        stale = fake.push(tid, timestamp=fake.clock() - 3600)
        assert (await rig.push(*stale))[0] == 403
        assert parsed == []
        assert await rig.lines(tid) == []
        # the genuine push still goes through
        assert await rig.push(query, form) == (200, b"")
        assert parsed
        assert len(await rig.lines(tid)) == 1


# --- the real daemon, killed between a push and its repeat ---------------------------------
DAEMON_SECRETS = {
    "KAMI_SECRET_AGISO_APP_SECRET": APP_SECRET,
    "KAMI_SECRET_AGISO_XIANYU_TOKEN": TOKEN,
}


def daemon_config(tmp_path: Path, fake: FakeAgiso, port: int) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[agent]
poll_interval = 0.5
sweep_interval = 0.2
reconcile_interval = 2.0
concurrency = 4
retry_base = 0.1
retry_cap = 1.0

[store]
path = "kami.db"

[listener]
port = {port}
header_timeout = 5.0
body_timeout = 5.0

[platforms.xianyu]
kind = "agiso"
base_url = "{fake.base_url}"
api_key = "{APP_ID}"
secret = "agiso.app.secret"
access_token = "agiso.xianyu.token"
channel = "xianyu"
timeout = 2.0
probe_interval = 1.0

[platforms.xianyu.products]
"{ITEM}" = "{SKU}"

[skus."{SKU}"]
""",
        encoding="utf-8",
    )
    return path


async def daemon_push(
    http: aiohttp.ClientSession, url: str, push: tuple[dict[str, str], dict[str, str]]
) -> tuple[int, bytes]:
    """The push, sent until the daemon's listener answers it (it may still be starting)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            async with http.post(url, params=push[0], data=push[1]) as response:
                return response.status, await response.read()
        except aiohttp.ClientConnectionError:
            assert time.monotonic() < deadline, "the daemon's listener never came up"
            await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_daemon_killed_after_a_push_delivers_the_repeated_push_once(
    tmp_path: Path, fake: FakeAgiso
) -> None:
    port = free_port()
    config = daemon_config(tmp_path, fake, port)
    log = tmp_path / "daemon.log"
    values = [f"XY-{i:05d}-secret" for i in range(5)]
    keys = await import_stock(config, DAEMON_SECRETS, tmp_path, SKU, values)
    tid = fake.add_order("xianyu", ITEM)
    push = fake.push(tid)
    url = f"http://127.0.0.1:{port}/agiso/xianyu"
    async with aiohttp.ClientSession() as http:
        proc = await start_daemon(config, DAEMON_SECRETS, log)
        try:
            assert await daemon_push(http, url, push) == (200, b"")
        finally:
            proc.send_signal(signal.SIGKILL)  # at once: the delivery may be under way
            await proc.wait()
        # answered, so committed: the killed daemon's ledger holds the order
        assert sum(ledger_states(tmp_path / "kami.db").values()) == 1
        proc = await start_daemon(config, DAEMON_SECRETS, log)
        try:
            assert await daemon_push(http, url, push) == (200, b""), f"see {log}"
            deadline = time.monotonic() + 60
            while ledger_states(tmp_path / "kami.db") != {"delivered": 1}:
                assert proc.returncode is None, f"daemon died, see {log}"
                assert time.monotonic() < deadline, f"not delivered, see {log}"
                await asyncio.sleep(0.2)
            assert await daemon_push(http, url, push) == (200, b"")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0, "graceful stop failed"
    assert fake.shipped(tid)
    assert shown(fake, tid, keys) == 1
    assert ledger_states(tmp_path / "kami.db") == {"delivered": 1}


def ledger_states(db: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT state, COUNT(*) FROM orders GROUP BY state"))


# --- configuration -------------------------------------------------------------------------
def shop_toml(**extra: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "kind": "agiso",
        "base_url": "https://gw-api.agiso.com",
        "api_key": APP_ID,
        "secret": "agiso.app.secret",
        "access_token": "agiso.xianyu.token",
        "channel": "xianyu",
        "products": {ITEM: SKU},
    }
    section.update(extra)
    return {"store": {"path": "kami.db"}, "platforms": {"xy": section}}


def test_push_path_is_configurable_and_mounted_there(tmp_path: Path) -> None:
    config = parse_config(shop_toml(push_path="/hooks/agiso-xy/"), tmp_path / "c.toml")
    settings = config.platforms[0]
    assert isinstance(settings.options, AgisoOptions)
    platform = AgisoPlatform(settings, APP_SECRET, TOKEN, 1)
    default = dataclasses.replace(
        settings, options=dataclasses.replace(settings.options, push_path="")
    )
    context = ListenerContext(None, time.time)
    kinds = {"xy": "agiso"}
    [mount] = listener_mounts({"xy": platform}, kinds, context)
    assert [(r.method, r.path) for r in mount.routes] == [("POST", "/hooks/agiso-xy")]
    plain = AgisoPlatform(default, APP_SECRET, TOKEN, 1)
    [mount] = listener_mounts({"xy": plain}, kinds, context)
    assert [r.path for r in mount.routes] == ["/agiso/xy"]


@pytest.mark.parametrize("path", ["hooks", "/a?b=1", "/a/{id}"])
def test_a_push_path_that_is_not_a_path_is_refused(tmp_path: Path, path: str) -> None:
    with pytest.raises(ConfigError, match="push_path: must be a path"):
        parse_config(shop_toml(push_path=path), tmp_path / "c.toml")
