"""The real `take_in` of each ledger, fed orders holding arbitrary unicode (lone surrogates and
NUL included), bypassing the parsers that normally keep such values out: it never raises,
every order it can store is recorded as it was, one with a value it cannot store is parked
under its id, and one whose very id it cannot store is left out, without holding up the
others."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.domain import DeliveryIntent, LineState, OrderLine, PlatformOrder, RejectedOrder
from tests.conftest import open_test_store, stock

NOW = 1_700_000_000.0
LOCAL = frozenset({"GAME-100"})

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=8)
some_text = any_text | st.sampled_from(["ok", "\ud800", "a\x00b", "\udfff\x00"])
skus = st.sampled_from(["GAME-100", "VIP-30D", "NONE"]) | some_text.filter(bool)
platform_orders = st.builds(
    PlatformOrder,
    order_id=some_text.filter(bool),
    status=st.just("paid"),
    sku=skus,
    quantity=st.integers(1, 3),
    paid_at=st.none() | some_text,
    amount=st.none() | some_text,
    buyer_contact=st.none() | some_text,
)
rejected_orders = st.builds(
    RejectedOrder, order_id=some_text.filter(bool), reason=some_text.filter(bool), sku=some_text
)
pages = st.lists(
    platform_orders | rejected_orders, min_size=1, max_size=8, unique_by=lambda o: o.order_id
)


def _storable(text: str | None, backend: str) -> bool:
    if text is None:
        return True
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        return False  # no UTF-8 for it: neither ledger
    return backend == "sqlite" or "\x00" not in text  # PostgreSQL refuses NUL in text


def _texts(order: PlatformOrder | RejectedOrder) -> list[str | None]:
    if isinstance(order, RejectedOrder):
        return [order.order_id, order.sku, order.reason]
    return [order.order_id, order.sku, order.paid_at, order.amount, order.buyer_contact]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_take_in_sets_aside_only_what_it_cannot_store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_url") if backend == "postgres" else None
    platforms = (f"p{n}" for n in itertools.count())  # each example on a platform of its own
    with asyncio.Runner() as runner:
        store = open_test_store(backend, tmp_path, url, instance="test")
        runner.run(store.open())
        runner.run(stock(store, "GAME-100", 2_000))

        @settings(
            max_examples=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(pages)
        def check(orders: list[PlatformOrder | RejectedOrder]) -> None:
            platform = next(platforms)
            claims = runner.run(store.take_in(platform, orders, NOW, LOCAL))
            lines = {
                line.order_id: line
                for line in runner.run(store.list_lines(None, 100_000))
                if line.platform == platform
            }
            for order in orders:
                if not _storable(order.order_id, backend):
                    assert order.order_id not in lines
                    continue
                line = lines[order.order_id]
                if isinstance(order, RejectedOrder) and all(
                    _storable(t, backend) for t in _texts(order)
                ):
                    assert line.state == LineState.NEEDS_ATTENTION
                    assert line.reason == order.reason
                elif isinstance(order, RejectedOrder):
                    assert line.state == LineState.NEEDS_ATTENTION
                elif all(_storable(t, backend) for t in _texts(order)):
                    assert (line.sku, line.quantity) == (order.sku, order.quantity)
                    assert line.buyer_contact == order.buyer_contact
                    assert line.state != LineState.NEEDS_ATTENTION
                else:
                    assert line.state == LineState.NEEDS_ATTENTION
                    assert "cannot store" in (line.reason or "")
            handed = {
                (c.line if isinstance(c, DeliveryIntent) else c).order_id
                for c in claims
                if isinstance(c, DeliveryIntent | OrderLine)
            }
            assert handed == {
                o.order_id
                for o in orders
                if isinstance(o, PlatformOrder) and all(_storable(t, backend) for t in _texts(o))
            }

        try:
            check()
        finally:
            runner.run(store.close())
