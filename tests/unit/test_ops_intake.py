"""Quieter, truer intake: a buyer notice sent once however often its answer is lost, a line
settled meanwhile is no error on the purchase path, and a parked order's unknown quantity is
shown as unknown."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from agent import logs
from agent.buyer import BuyerCare
from agent.domain import LineState, PlatformOrder, RejectedOrder
from agent.platforms.http import HttpPlatform
from agent.sandbox.platform import SandboxPlatform
from agent.sandbox.supplier import SandboxSupplier
from agent.sourcing import Sourcing
from agent.store.base import Store
from agent.store.sqlite import SQLiteStore
from tests.conftest import make_config, master_key_for_tests, platform_settings
from tests.contract.test_suppliers import adapter, supplier_settings, upstream, with_suppliers
from tests.unit.test_cli import cli, config_for

__all__ = ["upstream"]  # the fixture, used by name


@pytest.fixture
def captured(quiet_logs: TextIO) -> Iterator[io.StringIO]:
    sink = io.StringIO()
    logs.configure("info", sink)
    yield sink
    logs.configure("debug", quiet_logs)


def events(sink: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in sink.getvalue().splitlines() if line.startswith("{")]


async def test_a_notice_whose_answer_is_lost_reaches_the_buyer_once(
    tmp_path: Path, sandbox: SandboxPlatform, sqlite_store: SQLiteStore
) -> None:
    """The platform records each notice and loses the answer: the agent sends it again (it
    cannot know), with the same Idempotency-Key, so the buyer gets one message
    (platform-http v1.1), not one per attempt."""
    store = sqlite_store
    order_id = sandbox.add_order("GAME-100")
    (line_id,) = await store.ingest("main", [PlatformOrder(order_id, "paid", "GAME-100", 1)], 1.0)
    await store.allocate(line_id, 1.0)  # no stock: backordered, waiting
    config = make_config(tmp_path, sandbox.base_url)
    platform = HttpPlatform(platform_settings(sandbox.base_url, timeout=1.0), sandbox.secret)
    care = BuyerCare(config, store, {"main": platform}, lambda: time.time() + 3600)
    try:
        sandbox.faults.drop_after_commit_rate = 1.0
        for _ in range(3):
            await care.send_notices()
        sandbox.faults.drop_after_commit_rate = 0.0
        await care.send_notices()
    finally:
        await platform.close()
    assert len(sandbox.orders[order_id].notices) == 1
    assert await store.lines_needing_notice(time.time() + 3600, 10) == []


async def test_a_line_settled_meanwhile_is_no_error_on_the_purchase_path(
    tmp_path: Path,
    sandbox: SandboxPlatform,
    sqlite_store: SQLiteStore,
    upstream: SandboxSupplier,
    monkeypatch: pytest.MonkeyPatch,
    captured: io.StringIO,
) -> None:
    """A line taken up again after a freeze longer than its lease: meanwhile another agent
    sharing the ledger settled it. Nothing is bought, nothing parked, nothing raised."""
    store: Store = sqlite_store
    settings = supplier_settings("up", upstream.base_url)
    config = with_suppliers(make_config(tmp_path, sandbox.base_url), ("local", "up"), settings)
    (line_id,) = await store.ingest("main", [PlatformOrder("O-1", "paid", "GAME-100", 1)], 1.0)
    line = await store.get_line(line_id)
    assert line is not None
    real = store.begin_purchase

    async def settled_elsewhere_first(line_id: int, supplier: str, now: float) -> object:
        await store.close_line(line_id, LineState.CANCELLED, "cancelled by the buyer", now)
        return await real(line_id, supplier, now)

    monkeypatch.setattr(store, "begin_purchase", settled_elsewhere_first)
    client = adapter(upstream)
    sourcing = Sourcing(
        config.agent, config.skus, store, {"up": client}, {"up": settings}, time.time
    )
    try:
        result = await sourcing.fill(line)
    finally:
        await client.close()
    assert result.state == LineState.CANCELLED
    assert upstream.purchases == {}
    assert "parked" not in [e.kind for e in await store.events(line_id)]
    logged = events(captured)
    assert [e["event"] for e in logged if e["level"] == "error"] == []
    assert any(e["event"] == "line_settled_meanwhile" for e in logged)


def test_orders_list_shows_an_unknown_quantity_as_unknown(tmp_path: Path) -> None:
    config = config_for(tmp_path)

    async def seed() -> None:
        store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
        await store.open()
        await store.ingest("main", [RejectedOrder("O-9", "invalid quantity 'x'")], 1.0)
        await store.close()

    asyncio.run(seed())
    listing = cli(config, "orders", "list").stdout.splitlines()
    row = next(line for line in listing if "O-9" in line)
    assert row.split()[3] == "?", row  # not 0: nobody ordered zero keys (its SKU is empty)
    as_json = json.loads(cli(config, "orders", "list", "--json").stdout)
    assert as_json[0]["quantity"] is None and as_json[0]["order_id"] == "O-9"
