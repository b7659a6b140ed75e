"""Hostile input, generated: every parser either returns a value or raises its one clear error
class — never crashes with anything else — and what it returns is safe to act on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import ConfigError, parse_config
from agent.domain import BadResponse, LineState, PlatformOrder, RejectedOrder
from agent.engine import Engine, screen_order
from agent.platforms.http import read_order_page
from agent.platforms.parsing import (
    MAX_ID_LENGTH,
    ParseError,
    parse_order,
    parse_order_page,
    parse_remote_order,
)
from agent.signed_http import HttpResponse
from agent.stockfile import MAX_FIELD_LENGTH, StockFileError, StockFileReader
from agent.store.identity import Opening
from agent.store.sqlite import SQLiteStore
from agent.suppliers.http import parse_purchase
from tests.conftest import make_config, master_key_for_tests

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
        try:
            items = list(reader)
        except StockFileError as exc:  # a file that is no stock at all, refused in one line
            assert str(path) in str(exc) and "\n" not in str(exc)
            return
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


# --- raw bytes, as a hostile platform sends them ---------------------------------------------
# Strings JSON can carry but a ledger cannot store: lone surrogates (escaped, or encoded as
# bytes), NUL and other control characters.
any_char = st.characters(codec=None, exclude_categories=())
hostile_text = st.text(any_char, max_size=12) | st.sampled_from(
    ["\ud800", "GAME-100\udfff", "\x00", "A\x00B", "\x1b[31m", "\u202e", "ok"]
)


def _json_string(text: str) -> str:
    return json.dumps(text)  # escapes surrogates and controls as \\uXXXX


json_text = st.recursive(
    st.sampled_from(["null", "true", "false", "0", "-1", "1.5e308", "1e999", "NaN", '""'])
    | st.integers().map(str)
    | st.integers(4000, 6000).map(lambda digits: "9" * digits)  # past int's digit limit
    | st.integers(900, 3000).map(lambda depth: "[" * depth + "]" * depth)  # past recursion
    | hostile_text.map(_json_string),
    lambda children: (
        st.lists(children, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
        | st.lists(st.tuples(hostile_text.map(_json_string), children), max_size=4).map(
            lambda kvs: "{" + ",".join(f"{k}:{v}" for k, v in kvs) + "}"
        )
    ),
    max_leaves=8,
)
order_text = st.fixed_dictionaries(
    {},
    optional={
        '"id"': hostile_text.map(_json_string) | json_text,
        '"status"': st.just('"paid"') | json_text,
        '"sku"': st.just('"GAME-100"') | hostile_text.map(_json_string) | json_text,
        '"quantity"': st.just("1") | json_text,
        '"buyer"': hostile_text.map(lambda t: '{"contact": ' + _json_string(t) + "}") | json_text,
        '"paid_at"': hostile_text.map(_json_string) | json_text,
    },
).map(lambda fields: "{" + ",".join(f"{k}:{v}" for k, v in fields.items()) + "}")
page_text = st.tuples(
    st.lists(order_text | json_text, max_size=5), st.sampled_from(['"7"', "null", "1", "[]"])
).map(lambda p: '{"orders": [' + ",".join(p[0]) + '], "next_cursor": ' + p[1] + "}")


@st.composite
def page_bytes(draw: st.DrawFn) -> bytes:
    """A page as JSON text, often mangled on the way: cut short, stray bytes spliced in,
    encoded in another UTF, or bytes that are no UTF at all."""
    data = draw(page_text | json_text).encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["as is", "as is", "cut", "splice", "utf-16", "binary"]))
    if how == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=8)) + data[at:]
    elif how == "utf-16":
        data = data.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
    elif how == "binary":
        data = draw(st.binary(max_size=200))
    return data


def _storable(text: str) -> bool:
    """What both ledgers can store: no lone surrogate, no NUL."""
    return not any(ch == "\x00" or "\ud800" <= ch <= "\udfff" for ch in text)


def _clean_identifier(text: str) -> bool:
    return _storable(text) and not any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in text)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300, deadline=None)
@given(page_bytes())
def test_order_page_from_raw_bytes_is_a_page_or_bad_response(data: bytes) -> None:
    """Any bytes a platform sends as a listing give a page or BadResponse, never another
    exception; and every order in the page holds only what the ledgers can store."""
    try:
        page = read_order_page(HttpResponse(200, data, None), "order list")
    except BadResponse as exc:
        assert _storable(str(exc))
        return
    for order in page.orders:
        assert order.order_id and _storable(order.order_id)
        assert _clean_identifier(order.sku)
        if isinstance(order, RejectedOrder):
            # parked under its id, which the ledger can store (control characters and all)
            assert _storable(order.reason) and order.reason
            continue
        assert _clean_identifier(order.order_id)
        assert order.sku and 1 <= order.quantity <= 1_000_000
        for text in (order.buyer_contact, order.paid_at, order.amount, order.currency):
            assert text is None or _storable(text)


item_text = st.fixed_dictionaries(
    {'"secret"': hostile_text.map(_json_string) | json_text},
    optional={'"code"': hostile_text.map(_json_string) | json_text},
).map(lambda fields: "{" + ",".join(f"{k}:{v}" for k, v in fields.items()) + "}")
purchase_text = st.fixed_dictionaries(
    {
        '"status"': st.sampled_from(['"completed"', '"processing"', '"failed"']) | json_text,
        '"purchase_id"': hostile_text.map(_json_string) | json_text,
        '"merchant_ref"': st.just('"kami-1"') | json_text,
    },
    optional={
        '"items"': st.lists(item_text, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]")
        | json_text,
        '"failure"': st.tuples(hostile_text, json_text).map(
            lambda p: '{"code": ' + _json_string(p[0]) + ', "message": ' + p[1] + "}"
        ),
    },
).map(lambda fields: "{" + ",".join(f"{k}:{v}" for k, v in fields.items()) + "}")


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200, deadline=None)
@given(purchase_text.map(lambda text: text.encode("utf-8", "surrogatepass")))
def test_purchase_from_raw_bytes_is_a_result_or_bad_response(data: bytes) -> None:
    """A supplier's purchase answer, as bytes: a result holding only what the ledger can
    store (its keys are stored as they come), or BadResponse."""
    try:
        result = parse_purchase(HttpResponse(200, data, None).json())
    except BadResponse:
        return
    assert _storable(result.purchase_id)
    assert all(_storable(item.code) and _storable(item.secret) for item in result.items)
    for text in (result.failure_code, result.failure_message):
        assert text is None or _storable(text)
