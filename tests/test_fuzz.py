"""Hostile input, generated: every parser either returns a value or raises its one clear error
class — never crashes with anything else — and what it returns is safe to act on."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import ConfigError, parse_config
from agent.domain import BadResponse, LineState, PlatformOrder, RejectedOrder
from agent.engine import Engine, screen_order
from agent.platforms.parsing import (
    MAX_ID_LENGTH,
    ParseError,
    parse_order,
    parse_order_page,
    parse_remote_order,
)
from agent.stockfile import MAX_FIELD_LENGTH, StockFileReader
from agent.store.sqlite import SQLiteStore
from agent.suppliers.http import parse_purchase
from tests.conftest import make_config, master_key_for_tests
from agent.store.identity import Opening

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)
order_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=140) | st.integers() | json_values,
        "status": st.sampled_from(["paid", "delivered", "refunded"]) | json_values,
        "sku": st.sampled_from(["GAME-100", "VIP-30D", ""]) | st.text(max_size=200) | json_values,
        "quantity": st.integers(-5, 2_000_000) | json_values,
        "buyer": json_values,
        "paid_at": json_values,
    },
)


@given(order_like | json_values)
def test_parse_order_never_crashes(raw: Any) -> None:
    parsed = parse_order(raw)
    if isinstance(parsed, PlatformOrder):
        assert 1 <= parsed.quantity <= 1_000_000
        assert 0 < len(parsed.sku) <= MAX_ID_LENGTH and 0 < len(parsed.order_id) <= MAX_ID_LENGTH
    elif isinstance(parsed, RejectedOrder):
        assert parsed.reason and len(parsed.order_id) <= MAX_ID_LENGTH


@given(
    st.fixed_dictionaries(
        {"orders": st.lists(order_like | json_values, max_size=5)},
        optional={"next_cursor": json_values, "has_more": json_values},
    )
    | json_values
)
def test_parse_order_page_raises_only_parse_error(body: Any) -> None:
    with contextlib.suppress(ParseError):
        parse_order_page(body)


@given(
    json_values | st.fixed_dictionaries({"status": st.text()}, optional={"delivery": json_values})
)
def test_parse_remote_order_raises_only_parse_error(body: Any) -> None:
    with contextlib.suppress(ParseError):
        parse_remote_order(body)


@given(
    json_values
    | st.fixed_dictionaries(
        {
            "status": st.sampled_from(["completed", "processing", "failed"]) | json_values,
            "purchase_id": st.text() | json_values,
            "merchant_ref": st.text() | json_values,
        },
        optional={"items": json_values, "failure": json_values},
    )
)
def test_parse_purchase_raises_only_bad_response(body: Any) -> None:
    try:
        result = parse_purchase(body)
    except BadResponse:
        return
    assert all(isinstance(i.secret, str) for i in result.items)


toml_values = st.recursive(
    st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=10,
)
config_like = st.fixed_dictionaries(
    {},
    optional={
        "agent": st.dictionaries(
            st.sampled_from(["poll_interval", "concurrency", "oops"]), toml_values, max_size=3
        )
        | toml_values,
        "store": st.fixed_dictionaries({}, optional={"path": toml_values, "key": toml_values}),
        "platforms": st.dictionaries(st.text(max_size=10), toml_values, max_size=2),
        "skus": st.dictionaries(st.text(max_size=10), toml_values, max_size=2),
        "suppliers": st.dictionaries(st.text(max_size=10), toml_values, max_size=2),
        "notify": st.dictionaries(st.text(max_size=10), toml_values, max_size=2),
        "alerts": toml_values,
    },
)


@given(config_like)
def test_config_gives_config_or_one_clear_error(data: dict[str, Any]) -> None:
    try:
        parse_config(data, Path("fuzz.toml"))
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: ")


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=60)
@given(st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode))
def test_stock_files_yield_only_clean_keys(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "keys.txt"
        path.write_bytes(content)
        reader = StockFileReader(path)
        items = list(reader)
    for item in items:
        assert item.secret and len(item.secret) <= MAX_FIELD_LENGTH
        assert not any(ch < " " for ch in item.code + item.secret)
    assert reader.rejected >= 0


@settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    max_examples=25,
    deadline=None,
)
@given(st.lists(order_like, min_size=1, max_size=8))
def test_hostile_orders_are_parked_or_taken_never_lost(raw_orders: list[dict[str, Any]]) -> None:
    """Orders straight from a fuzzed listing through the engine's intake into the ledger."""

    async def run() -> None:
        with tempfile.TemporaryDirectory() as folder:
            store = SQLiteStore(
                Path(folder) / "kami.db", master_key_for_tests(), opening=Opening.CREATE
            )
            await store.open()
            try:
                config = make_config(Path(folder), "http://127.0.0.1:9")
                engine = Engine(config.agent, config.skus, store, {})
                parsed = [p for raw in raw_orders if (p := parse_order(raw)) is not None]
                screened = [s for p in parsed if (s := screen_order(p, config.skus)) is not None]
                await store.ingest("main", screened, time.time())
                lines = await store.list_lines(None, 100)
                ids = {p.order_id for p in screened}
                assert {line.order_id for line in lines} == ids  # nothing lost
                for line in lines:
                    assert line.state in (LineState.NEW, LineState.NEEDS_ATTENTION)
                    if line.state == LineState.NEEDS_ATTENTION:
                        assert line.reason
                assert engine.backlog == 0
            finally:
                await store.close()

    asyncio.run(run())
