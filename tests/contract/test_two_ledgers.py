"""A misconfiguration: two agents with separate SQLite ledgers poll one platform account.

Both take every order in and each binds keys from its own stock. Whichever delivers second
must not record as delivered keys the buyer never got (the platform keeps the first
delivery): it learns so from the platform and parks the line with that reason.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from agent.domain import LineState, delivery_idempotency_key
from agent.sandbox.platform import SandboxPlatform
from agent.store.base import Store
from tests.conftest import make_config, open_test_store, stock
from tests.helpers import delivered_all, running_agent, wait_for


async def _taken_in(store: Store, count: int) -> bool:
    return sum((await store.count_by_state()).values()) == count


async def _settled(store: Store, count: int) -> bool:
    states = await store.count_by_state()
    return sum(states.values()) == count and set(states) <= {
        LineState.DELIVERED,
        LineState.NEEDS_ATTENTION,
    }


async def test_second_ledger_never_records_keys_the_buyer_did_not_get(
    tmp_path: Path, sandbox: SandboxPlatform, sqlite_store: Store
) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = open_test_store("sqlite", other_dir)
    await other.open()
    try:
        ids = [sandbox.add_order("GAME-100") for _ in range(30)]
        config_a = make_config(tmp_path, sandbox.base_url)
        config_b = make_config(other_dir, sandbox.base_url)
        async with (
            running_agent(config_a, sqlite_store, sandbox),
            running_agent(config_b, other, sandbox),
        ):
            # Both take every order in before either has stock: an order the first delivers
            # leaves the platform's paid listing, and a second agent slow to its first poll
            # (a loaded machine) would never see it.
            await wait_for(lambda: _taken_in(sqlite_store, 30), "first ledger takes all in")
            await wait_for(lambda: _taken_in(other, 30), "second ledger takes all in")
            await stock(sqlite_store, "GAME-100", 40)
            await stock(other, "GAME-100", 40, start=1000)  # other keys, as another box has
            await wait_for(delivered_all(sandbox, ids), "deliveries")
            await wait_for(lambda: _settled(sqlite_store, 30), "first ledger settles")
            await wait_for(lambda: _settled(other, 30), "second ledger settles")
        delivered = {oid: sorted(s) for oid, s in sandbox.delivered_secrets().items()}
        outcomes: Counter[str] = Counter()
        for ledger in (sqlite_store, other):
            for order_id in ids:
                (line,) = await ledger.find_lines(order_id)
                if line.state == LineState.DELIVERED:
                    ours = sorted(i.secret for i in await ledger.bound_items(line.id))
                    # recorded delivered only with the very keys the buyer has
                    assert ours == delivered[order_id], order_id
                    outcomes["delivered"] += 1
                else:
                    # answered 409 (other items), or, after an unclear attempt on a loaded
                    # machine, found so by asking the platform (a delivery with other keys)
                    assert line.reason and (
                        "other items" in line.reason or "other keys" in line.reason
                    )
                    outcomes["parked"] += 1
        assert outcomes["delivered"] == 30  # each order delivered once, by one ledger
        assert outcomes["parked"] == 30
    finally:
        await other.close()


def test_idempotency_key_names_what_is_sent() -> None:
    a, b, c = b"hash-a", b"hash-b", b"hash-c"
    key = delivery_idempotency_key("main", "A", 0, 0, [a, b])
    assert key == delivery_idempotency_key("main", "A", 0, 0, [b, a])  # a restart: the same
    assert key != delivery_idempotency_key("main", "A", 0, 0, [a, c])  # other keys: another
    assert key != delivery_idempotency_key("main", "A", 0, 1, [a, b])  # a resend: another
    assert key.startswith("kami-") and key.endswith("-0")
