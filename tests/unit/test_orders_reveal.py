"""`kami-agent orders show --reveal` (issue 19, after-sales): an order's keys, shown only on
request, the showing written in the order's audit trail (the OS user, when) before any key
is printed; without --reveal neither a key nor an event."""

from __future__ import annotations

import asyncio
import getpass
import json
from pathlib import Path

from agent.cli.orders import reveal_keys
from agent.domain import PlatformOrder
from agent.store.base import Store
from agent.store.sqlite import SQLiteStore
from tests.conftest import master_key_for_tests, stock
from tests.unit.test_cli import cli, config_for

SKU = "GAME-100"


async def delivered(store: Store, order_id: str, quantity: int) -> int:
    (line_id,) = await store.ingest("main", [PlatformOrder(order_id, "paid", SKU, quantity)], 1.0)
    await store.allocate(line_id, 1.0)
    await store.begin_delivery(line_id, 1.0)
    await store.mark_delivered(line_id, 2.0, "ok")
    return line_id


async def test_revealing_records_the_os_user_in_the_audit_trail(store: Store) -> None:
    await stock(store, SKU, 3)
    line_id = await delivered(store, "O-1", 2)
    line = await store.get_line(line_id)
    assert line is not None
    items = await reveal_keys(store, line)
    assert [k.secret for k in items] == [k.secret for k in await store.bound_items(line_id)]
    assert len(items) == 2
    (event,) = [e for e in await store.events(line_id) if e.kind == "keys_revealed"]
    assert getpass.getuser() in event.detail and "2 key(s)" in event.detail
    assert not any(k.secret in event.detail for k in items)  # the trail names no key


def test_orders_show_reveal(tmp_path: Path) -> None:
    config = config_for(tmp_path)

    async def seed() -> list[str]:
        store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
        await store.open()
        try:
            await stock(store, SKU, 3)
            line_id = await delivered(store, "O-1", 2)
            return [k.secret for k in await store.bound_items(line_id)]
        finally:
            await store.close()

    secrets = asyncio.run(seed())
    plain = cli(config, "orders", "show", "O-1")
    assert plain.returncode == 0, plain.stderr
    assert not any(s in plain.stdout for s in secrets) and "keys_revealed" not in plain.stdout
    shown = cli(config, "orders", "show", "O-1", "--reveal")
    assert shown.returncode == 0, shown.stderr
    assert all(s in shown.stdout for s in secrets)
    assert "keys_revealed" in shown.stdout and getpass.getuser() in shown.stdout
    (as_json,) = json.loads(cli(config, "orders", "show", "O-1", "--reveal", "--json").stdout)
    assert sorted(k["secret"] for k in as_json["keys"]) == sorted(secrets)
    assert [e["kind"] for e in as_json["events"]].count("keys_revealed") == 2
    (again,) = json.loads(cli(config, "orders", "show", "O-1", "--json").stdout)
    assert "keys" not in again
    assert [e["kind"] for e in again["events"]].count("keys_revealed") == 2
