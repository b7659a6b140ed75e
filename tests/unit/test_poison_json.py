"""The bounded JSON decoder every response body goes through (agent/safejson.py): what
Python's decoder refuses a whole document for (a number past int's digit limit, nesting past
the recursion limit) is one bad value instead, and anything else decodes exactly as json.loads
does."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import safejson
from agent.domain import BadResponse, Transient
from agent.platforms.http import read_order_page
from agent.signed_http import HttpResponse, raise_for_status

DEEP = 100_000


def test_a_bomb_of_a_listing_is_one_bad_response() -> None:
    """A body that is nothing but nesting is a BadResponse naming the problem (not a
    RecursionError); a 5,000-digit number is one value the parsers reject, not a page."""
    bomb = ("[" * DEEP + "]" * DEEP).encode()
    with pytest.raises(BadResponse):
        read_order_page(HttpResponse(200, bomb, None), "order list")
    within = b'{"orders": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    page = read_order_page(HttpResponse(200, within, None), "order list")
    assert page.orders == [] and page.unidentifiable == 1
    huge = b'{"orders": [{"id": "H", "status": "paid", "sku": "S", "quantity": ' + b"9" * 5000
    page = read_order_page(HttpResponse(200, huge + b"}]}", None), "order list")
    (rejected,) = page.orders
    assert rejected.order_id == "H" and "quantity" in rejected.reason  # type: ignore[union-attr]
    assert len(rejected.reason) < 200  # type: ignore[union-attr]


def test_a_deep_value_is_one_marker_and_the_rest_is_read() -> None:
    body = '{"a": ' + "[" * DEEP + "]" * DEEP + ', "b": ' + "9" * 5000 + ', "c": "ok"}'
    value = safejson.loads(body.encode())
    assert value["c"] == "ok"
    assert isinstance(value["b"], safejson.HugeInteger) and value["b"].digits == 5000
    depth, inner = 1, value["a"]  # containers built around the marker
    while isinstance(inner, list):
        (inner,) = inner
        depth += 1
    assert isinstance(inner, safejson.TooDeep) and depth == safejson.MAX_DEPTH
    assert repr(inner) and repr(value["b"]) == "<integer of 5000 digits>"


@pytest.mark.parametrize(
    "body", [b"", b"[", b"[1,]", b'{"a"}', b'{"a":1,}', b"[1 2]", b"\xff\xfe\x00", b'"\x01"']
)
def test_what_is_not_json_is_a_json_error(body: bytes) -> None:
    for text in (body, body + b" " + b"[" * DEEP):  # the bounded reading says so too
        with pytest.raises(safejson.JsonError):
            safejson.loads(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from([None, 2]))
def test_the_bounded_reading_agrees_with_json_loads(value: Any, indent: int | None) -> None:
    """Forced onto the bounded path by a deep value beside it, a document reads the same."""
    text = json.dumps(value, indent=indent)
    forced = safejson.loads("[" + text + ", " + "[" * 2000 + "]" * 2000 + "]")
    assert forced[0] == json.loads(text) == safejson.loads(text)


def test_an_error_body_is_read_as_boundedly_and_shown_storable() -> None:
    """A 5xx whose body is a bomb is still the error its status says (not RecursionError), and
    an error message becomes a line's reason: nothing in it a ledger cannot store."""
    bomb = HttpResponse(503, b'{"error": ' + b"[" * DEEP + b"]" * DEEP + b"}", None)
    with pytest.raises(Transient):
        raise_for_status(bomb, "platform", unknown_outcome=False)
    body = json.dumps({"error": {"code": "bad\ud800", "message": "a\x00b"}}).encode()
    text = HttpResponse(422, body, None).error_text()
    assert "\ud800" not in text and "\x00" not in text
    assert "bad\\ud800" in text and "a\\x00b" in text
