"""A poison order never blocks the shop: one order the ledger cannot store, or whose JSON is
hostile (a 5,000-digit number, nesting 100,000 deep), is parked with its reason (or, when even
its id cannot be stored, left out and logged), and every other order on its page is delivered.
Through the real intake path: the sandbox platform on loopback, the HTTP adapter, the engine,
each ledger."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import pytest

from agent import logs
from agent.domain import LineState
from agent.engine import Engine
from agent.platforms.http import HttpPlatform
from agent.sandbox.platform import SandboxPlatform
from agent.store.base import Store
from tests.conftest import make_config, platform_settings, stock
from tests.helpers import delivered_all, running_agent, wait_for

DEEP = 100_000


def _raw(order_id: str, field: str, text: str) -> Callable[[SandboxPlatform], None]:
    """An order whose `field` is the JSON `text`, spliced in as it is."""
    fields = {"id": json.dumps(order_id), "status": '"paid"', "sku": '"GAME-100"', "quantity": "1"}
    fields[field] = text
    body = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    return lambda sandbox: sandbox.add_raw_json_order(order_id, body)


def _order(order_id: str, sku: str = "GAME-100", **extra: object) -> Callable[..., None]:
    """An order as the sandbox writes it (json.dumps escapes surrogates and controls)."""

    def add(sandbox: SandboxPlatform) -> None:
        sandbox.add_order(sku, order_id=order_id, **extra)

    return add


# kind -> (how the sandbox lists it, the id it is parked under or None when it cannot be,
# a word its reason holds)
POISON: dict[str, tuple[Callable[[SandboxPlatform], None], str | None, str]] = {
    "surrogate in id": (_order("P-\ud800"), None, ""),
    "NUL in id": (_order("P-\x00"), None, ""),
    "surrogate in sku": (_order("P-1", sku="GAME-100\udfff"), "P-1", "store"),
    "NUL in sku": (_order("P-1", sku="GAME\x00100"), "P-1", "store"),
    "escape in sku": (_order("P-1", sku="GAME\x1b[2J"), "P-1", "control"),
    "surrogate in contact": (
        _order("P-1", buyer={"contact": "x\ud83d@example.test"}),
        "P-1",
        "contact",
    ),
    "NUL in contact": (_order("P-1", buyer={"contact": "x\x00@example.test"}), "P-1", "contact"),
    "surrogate in paid_at": (_order("P-1", paid_at="2024\udc00"), "P-1", "paid_at"),
    "5000-digit quantity": (_raw("P-1", "quantity", "9" * 5000), "P-1", "5000 digits"),
    "deep nesting in sku": (_raw("P-1", "sku", "[" * DEEP + "]" * DEEP), "P-1", "invalid sku"),
}


@pytest.mark.parametrize("kind", list(POISON))
async def test_a_poison_order_is_set_aside_and_its_page_delivered(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, kind: str
) -> None:
    add_poison, parked_id, word = POISON[kind]
    await stock(store, "GAME-100", 10)
    good = [sandbox.add_order("GAME-100") for _ in range(3)]
    add_poison(sandbox)
    good += [sandbox.add_order("GAME-100") for _ in range(3)]  # listed after it, same page
    async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
        await wait_for(delivered_all(sandbox, good), "every good order on the page")

        async def settled() -> bool:
            counts = await store.count_by_state()
            return counts.get(LineState.DELIVERED) == len(good)

        await wait_for(settled, "the ledger records the deliveries")
    lines = {line.order_id: line for line in await store.list_lines(None, 100)}
    assert set(lines) == set(good) | ({parked_id} if parked_id else set())
    if parked_id is not None:
        parked = lines[parked_id]
        assert parked.state == LineState.NEEDS_ATTENTION
        assert parked.reason and word in parked.reason


@pytest.fixture
def captured(quiet_logs: TextIO) -> Iterator[io.StringIO]:
    sink = io.StringIO()
    logs.configure("info", sink)
    yield sink
    logs.configure("debug", quiet_logs)  # back to the session's sink, which is still open


async def test_a_poison_order_is_logged_once_not_at_every_poll(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, captured: io.StringIO
) -> None:
    sandbox.add_order("GAME-100\x00", order_id="P-1")
    sandbox.add_order("GAME-100", order_id="P-\ud800")
    config = make_config(tmp_path, sandbox.base_url)
    platform = HttpPlatform(platform_settings(sandbox.base_url), sandbox.secret)
    try:
        engine = Engine(config.agent, config.skus, store, {"main": platform}, clock=time.time)
        for _ in range(3):
            await engine.poll("main", from_start=True, follow=False)
    finally:
        await platform.close()
    events = [json.loads(line) for line in captured.getvalue().splitlines()]
    rejected = [e for e in events if e["event"] == "order_rejected"]
    assert [e["order_id"] for e in rejected] == ["P-1"]
    ignored = [e for e in events if e["event"] == "orders_without_id"]
    assert len(ignored) == 1 and "\\ud800" in str(ignored[0])
    assert "\ud800" not in captured.getvalue() and "\x00" not in captured.getvalue()
