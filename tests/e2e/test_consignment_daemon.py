"""Consignment with the real daemon: a 淘宝 shop whose GAME-100 Agiso sells from a pool the
daemon keeps topped up, while the daemon delivers VIP-30D itself, behind the fake gateway
under faults (lost answers on /CardPwd/Add too), SIGKILLed right after an add's call (before
its answer is committed), right after an add's intent (before the call), and at a random
moment. Then: no key lost (each imported key free, bound, consigned or void), none handed out
twice (no pool card delivered by the daemon, no card sold twice by the pool, every card sold
bound to the line of the order it went to), the consigned keys exactly the pool's unsold ones,
no add left unsettled.

Agiso's auto-delivery (the test's seller task) sends an order from the pool two seconds after
it is paid, and pauses while no daemon runs: without the inbound listener's pushes, 淘宝's
polling backstop lists only orders still waiting to ship."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.domain import ACTIVE_STATES, KeyState, LineState
from agent.pool_domain import OPEN_POOL_ADD
from agent.store.sqlite import SQLiteStore
from tests.conftest import master_key_for_tests
from tests.daemon import import_stock, kill_after, start_daemon
from tests.fakes.agiso import FakeAgiso, ShiftedClock
from tests.unit.test_consignment import agent_sent, as_item

APP_ID = "2024010112345678"
APP_SECRET = "agiso-app-secret-for-pool-daemon"
TOKEN = "TbAldsPOOLDAEMONtaobao000000001"
POOLED, OWN, CPC = "3894069941929", "3894069941930", "551426"
SECRETS = {
    "KAMI_SECRET_AGISO_APP_SECRET": APP_SECRET,
    "KAMI_SECRET_AGISO_TAOBAO_TOKEN": TOKEN,
}
SALE_DELAY = 2.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeAgiso]:
    server = FakeAgiso(APP_ID, APP_SECRET, seed=29, clock=ShiftedClock())
    server.add_shop("taobao", TOKEN)
    server.link_pool(POOLED, CPC)
    await server.start()
    yield server
    await server.stop()


def write_config(tmp_path: Path, fake: FakeAgiso) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[agent]
poll_interval = 0.5
sweep_interval = 0.2
reconcile_interval = 5.0
concurrency = 8
retry_base = 0.1
retry_cap = 1.0

[store]
path = "kami.db"

[platforms.tb]
kind = "agiso"
base_url = "{fake.base_url}"
api_key = "{APP_ID}"
secret = "agiso.app.secret"
access_token = "agiso.taobao.token"
channel = "taobao"
timeout = 2.0
probe_interval = 1.0
pool_interval = 1.0

[platforms.tb.products]
"{POOLED}" = "GAME-100"
"{OWN}" = "VIP-30D"

[platforms.tb.pools]
"GAME-100" = {{ cpc_id = "{CPC}", low = 10, high = 30 }}

[skus."GAME-100"]
[skus."VIP-30D"]
""",
        encoding="utf-8",
    )
    return path


def ledger_states(db: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT state, COUNT(*) FROM orders GROUP BY state"))


def open_adds(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        marks = ", ".join(f"'{s.value}'" for s in OPEN_POOL_ADD)
        row = conn.execute(f"SELECT COUNT(*) FROM pool_adds WHERE state IN ({marks})").fetchone()
        return int(row[0])


@pytest.mark.slow
async def test_daemon_killed_keeps_the_pool_without_losing_or_doubling_a_key(
    tmp_path: Path, fake: FakeAgiso
) -> None:
    rng = random.Random(41)
    fake.faults.allow_retry_rate = 0.05
    fake.faults.error_before_rate = 0.03
    fake.faults.lose_after_change_rate = 0.1
    config = write_config(tmp_path, fake)
    log = tmp_path / "daemon.log"
    db = tmp_path / "kami.db"
    game = await import_stock(
        config,
        SECRETS,
        tmp_path,
        "GAME-100",
        [f"GK-{i:04d}-{rng.getrandbits(32):08x}" for i in range(220)],
    )
    vip = await import_stock(
        config,
        SECRETS,
        tmp_path,
        "VIP-30D",
        [f"VK-{i:04d}-{rng.getrandbits(32):08x}" for i in range(120)],
    )
    selling = asyncio.Event()
    paid_at: dict[str, float] = {}

    async def agiso_sells() -> None:
        while True:
            await selling.wait()
            due = {t for t, at in paid_at.items() if time.monotonic() - at >= SALE_DELAY}
            fake.sell_from_pools(due)
            await asyncio.sleep(0.2)

    pooled: list[str] = []
    own: list[str] = []
    kills = Counter[str]()
    seller = asyncio.create_task(agiso_sells())
    try:
        for crash_at, count in (
            ("after_pool_add_call:1", 20),
            ("after_pool_intent:1", 25),
            (None, 25),
        ):
            proc = await start_daemon(config, SECRETS, log, crash_at)
            selling.set()
            for n in range(count):
                tid = fake.add_order("taobao", POOLED, 1 + n % 2)
                paid_at[tid] = time.monotonic()
                pooled.append(tid)
                if n % 2:
                    own.append(fake.add_order("taobao", OWN, 1 + n % 3))
            code, by_itself = await kill_after(proc, 12.0 if crash_at else rng.uniform(3.0, 5.0))
            selling.clear()
            assert code == -signal.SIGKILL, f"daemon exited with {code}, see {log}"
            kills[crash_at.split(":")[0] if crash_at and by_itself else "random"] += 1
        proc = await start_daemon(config, SECRETS, log)
        selling.set()
        deadline = time.monotonic() + 240  # a hang guard only
        everything = len(pooled) + len(own)
        while True:
            states = ledger_states(db)
            done = sum(states.values()) == everything
            done = done and not set(states) & {s.value for s in ACTIVE_STATES}
            if done and not open_adds(db) and all(fake.orders[t].pool_cards for t in pooled):
                break
            assert proc.returncode is None, f"daemon died, see {log}"
            assert time.monotonic() < deadline, f"not settled: {states}, open adds {open_adds(db)}"
            await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "graceful stop failed"
    finally:
        seller.cancel()
        await asyncio.gather(seller, return_exceptions=True)

    store = SQLiteStore(db, master_key_for_tests())
    await store.open()
    figures = Counter[str]()
    try:
        by_state = {s: {i.secret for i in await store.export_keys("GAME-100", s)} for s in KeyState}
        seen: set[str] = set()
        for state, found in by_state.items():
            assert not found & seen
            seen |= found
            figures[f"GAME-100 {state.value}"] = len(found)
        assert seen == game, "a GAME-100 key lost"
        unsold = {as_item(c).secret for c in fake.pools[CPC]}
        assert by_state[KeyState.CONSIGNED] == unsold & game
        sent_by_daemon = agent_sent(fake)
        for tid in pooled:
            [line] = await store.find_lines(tid)
            assert line.state is LineState.DELIVERED, (tid, line.state, line.reason)
            cards = {as_item(c).secret for c in fake.orders[tid].pool_cards}
            assert {i.secret for i in await store.bound_items(line.id)} == cards
            assert not cards & sent_by_daemon, f"{tid}: a pool card delivered by the daemon too"
            assert not fake.orders[tid].results
        for tid in own:
            [line] = await store.find_lines(tid)
            if line.state is LineState.DELIVERED:
                bound = {i.secret for i in await store.bound_items(line.id)}
                result = {card["p"] or card["c"] for card in fake.orders[tid].results[-1]}
                assert bound <= vip and len(bound) == fake.orders[tid].quantity
                assert result == bound, tid
                figures["VIP-30D delivered"] += 1
            else:
                assert line.state is LineState.NEEDS_ATTENTION and line.reason, tid
                figures["VIP-30D parked (shipped by a killed process)"] += 1
        vip_states = {s: len(await store.export_keys("VIP-30D", s)) for s in KeyState}
        assert sum(vip_states.values()) == len(vip) and vip_states[KeyState.CONSIGNED] == 0
        adds = Counter(a.state.value for a in await store.pool_adds("tb"))
    finally:
        await store.close()
    text = log.read_text(encoding="utf-8", errors="replace")
    assert APP_SECRET not in text and TOKEN not in text
    assert not [k for k in game | vip if k in text]
    faults = Counter(c.outcome for c in fake.calls if c.outcome.startswith("fault"))
    add_faults = Counter(c.outcome for c in fake.calls if c.path == "/CardPwd/Add")
    assert sum(kills.values()) == 3
    print(
        f"consignment daemon (淘宝): {len(pooled)} pool sales recorded, {dict(figures)},"
        f" pool adds {dict(adds)}, /CardPwd/Add outcomes {dict(add_faults)}, kills"
        f" {dict(kills)}, faults {dict(faults)}; keys lost 0, handed out twice 0"
    )
