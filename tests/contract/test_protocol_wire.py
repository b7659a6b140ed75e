"""The platform and supplier HTTP adapters against a strict server of the protocols as written
(docs/protocol/platform-http.md, supplier-http.md), byte by byte: the signature over the path and
query exactly as sent, Retry-After in both of its forms, the 409s of a delivery, bodies that
cannot be read after a call that changes something.

The server here is written from the protocol, not from our sandbox: it checks what a real
platform checks (with hashlib and hmac, not agent.signing) and answers what a test scripts."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from email.utils import formatdate
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
from aiohttp import web

from agent.domain import (
    Ambiguous,
    BadResponse,
    CardItem,
    DeliveryConflict,
    OrderClosed,
    Transient,
)
from agent.platforms.http import HttpPlatform
from agent.signed_http import parse_retry_after
from agent.suppliers.http import HttpSupplier
from tests.conftest import platform_settings
from tests.contract.test_suppliers import supplier_settings
from tests.loopback import serve

SECRET = "wire-conformance-secret"
API_KEY = "test-key"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
ITEMS = (CardItem(code="C-1", secret="S-1"), CardItem(code="C-2", secret="S-2"))

Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    raw_path: str  # the path and query exactly as they came over the wire
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class StrictServer:
    """Verifies every request as the protocol says, then answers by the test's script."""

    url: str = ""
    routes: dict[tuple[str, str], Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # why a request failed authentication

    def on(self, method: str, path: str, handler: Handler) -> None:
        self.routes[method, path] = handler

    def count(self, method: str, path: str) -> int:
        return sum(1 for s in self.seen if s.method == method and _path(s.raw_path) == path)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            Seen(request.method, request.raw_path, dict(request.headers), body, time.time())
        )
        why = _authentic(request, body)
        if why:
            self.refused.append(why)
            return web.json_response(
                {"error": {"code": "unauthorized", "message": why}}, status=401
            )
        handler = self.routes.get((request.method, _path(request.raw_path)))
        if handler is None:
            return web.json_response({"error": {"code": "not_found", "message": "-"}}, status=404)
        return await handler(request, body)


def _path(raw_path: str) -> str:
    return urlsplit(raw_path).path


def _authentic(request: web.Request, body: bytes) -> str | None:
    headers = request.headers
    if headers.get("X-Api-Key") != API_KEY:
        return "api key"
    ts = headers.get("X-Timestamp", "")
    if not ts.isdigit():  # unix seconds: digits only, no fraction, no sign
        return f"timestamp {ts!r} is not unix seconds"
    if abs(time.time() - int(ts)) > 300:
        return "stale timestamp"
    message = f"{ts}\n{request.method}\n{request.raw_path}\n{hashlib.sha256(body).hexdigest()}"
    expected = hmac.new(SECRET.encode(), message.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, headers.get("X-Signature", "")):
        return f"bad signature over {request.raw_path!r}"
    return None


@pytest.fixture
async def server() -> AsyncIterator[StrictServer]:
    strict = StrictServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", strict.handle)
    runner, strict.url = await serve(app)
    yield strict
    await runner.cleanup()


@pytest.fixture
async def platform(server: StrictServer) -> AsyncIterator[HttpPlatform]:
    adapter = HttpPlatform(platform_settings(server.url, api_key=API_KEY), SECRET)
    yield adapter
    await adapter.close()


@pytest.fixture
async def supplier(server: StrictServer) -> AsyncIterator[HttpSupplier]:
    adapter = HttpSupplier(supplier_settings("up", server.url, api_key=API_KEY), SECRET)
    yield adapter
    await adapter.close()


def answer(status: int, body: object = None, **headers: str) -> Handler:
    async def handler(request: web.Request, _: bytes) -> web.StreamResponse:
        if body is None:
            return web.Response(status=status, headers=headers)
        return web.json_response(body, status=status, headers=headers)

    return handler


def error(status: int, code: str, **extra: object) -> Handler:
    return answer(status, {"error": {"code": code, "message": code}, **extra})


EMPTY_PAGE = {"orders": [], "next_cursor": None, "has_more": False}


# --- auth: the signature is over what goes over the wire ------------------------------------
CURSORS = ["plain", "a b/c+d=e&f%g?h#i", "中文-游标", "%2F%41", "=", "x" * 300]


@pytest.mark.parametrize("cursor", CURSORS)
async def test_listing_is_signed_over_the_path_and_query_as_sent(
    server: StrictServer, platform: HttpPlatform, cursor: str
) -> None:
    """The cursor is the platform's opaque string: whatever it holds is sent back intact
    and the signature covers the query exactly as it went over the wire."""
    server.on("GET", "/api/v1/orders", answer(200, EMPTY_PAGE))
    await platform.list_paid(cursor)
    assert server.refused == []
    (seen,) = server.seen
    query = parse_qs(urlsplit(seen.raw_path).query, keep_blank_values=True)
    assert query == {"status": ["paid"], "cursor": [cursor], "limit": ["50"]}
    assert seen.body == b""  # a GET signs the hash of the empty body
    ts, method = seen.headers["X-Timestamp"], seen.method
    empty = f"{ts}\n{method}\n{seen.raw_path}\n{EMPTY_SHA256}".encode()
    assert hmac.compare_digest(
        seen.headers["X-Signature"], hmac.new(SECRET.encode(), empty, hashlib.sha256).hexdigest()
    )


async def test_first_listing_has_no_cursor(server: StrictServer, platform: HttpPlatform) -> None:
    server.on("GET", "/api/v1/orders", answer(200, EMPTY_PAGE))
    await platform.list_paid(None)
    (seen,) = server.seen
    assert parse_qs(urlsplit(seen.raw_path).query) == {"status": ["paid"], "limit": ["50"]}
    assert server.refused == []


@pytest.mark.parametrize("order_id", ["A/B", "a b?c#d", "%41", "订单-1", "..", "x+y=z&w"])
async def test_order_ids_travel_as_one_signed_path_segment(
    server: StrictServer, platform: HttpPlatform, order_id: str
) -> None:
    async def delivery(request: web.Request, body: bytes) -> web.StreamResponse:
        assert json.loads(body) == {
            "items": [{"code": i.code, "secret": i.secret} for i in ITEMS],
            "message": "m",
        }
        assert request.headers["Idempotency-Key"] == "key-1"
        assert request.content_type == "application/json"
        return web.json_response({"status": "delivered", "delivered_at": "2024-01-01T00:00:00Z"})

    # Routes match the raw path: the id must arrive as one percent-encoded segment.
    server.on("POST", f"/api/v1/orders/{quote(order_id, safe='')}/delivery", delivery)
    await platform.deliver(order_id, "key-1", ITEMS, "m")
    assert server.refused == [] and server.count("POST", "/api/v1/orders/x/delivery") == 0
    assert len(server.seen) == 1 and unquote(_path(server.seen[0].raw_path)).endswith(
        f"/{order_id}/delivery"
    )


# --- Retry-After, as seconds and as an HTTP-date --------------------------------------------
def test_retry_after_reads_both_forms() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == 30.0
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0.0  # already past
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now) == 0.0
    assert parse_retry_after(formatdate(now + 86_400, usegmt=True), now) == 3600.0  # capped
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("nan", now) is None
    assert parse_retry_after(None, now) is None


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_retry_after_is_carried_by_every_call(
    server: StrictServer, platform: HttpPlatform, status: int, form: str
) -> None:
    value = "40" if form == "seconds" else formatdate(time.time() + 40, usegmt=True)
    busy = error(status, "busy")

    async def busy_with_header(request: web.Request, body: bytes) -> web.StreamResponse:
        response = await busy(request, body)
        response.headers["Retry-After"] = value
        return response

    server.on("GET", "/api/v1/orders", busy_with_header)
    server.on("POST", "/api/v1/orders/1/delivery", busy_with_header)
    with pytest.raises(Transient) as listed:
        await platform.list_paid(None)
    assert listed.value.retry_after is not None and 30 <= listed.value.retry_after <= 40
    # A platform asking for 40 s is not asked again within this call (no in-call retries).
    assert server.count("GET", "/api/v1/orders") == 1
    # 429 on a delivery: nothing done. 503: maybe done (ambiguous), but wait all the same.
    expected = Transient if status == 429 else Ambiguous
    with pytest.raises(expected) as delivered:
        await platform.deliver("1", "key-1", ITEMS, "")
    assert delivered.value.retry_after is not None and 30 <= delivered.value.retry_after <= 40


async def test_a_short_retry_after_is_waited_within_the_call(
    server: StrictServer, platform: HttpPlatform
) -> None:
    calls = 0

    async def once_busy(request: web.Request, body: bytes) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            return await error(503, "busy")(request, body)
        return web.json_response(EMPTY_PAGE)

    server.on("GET", "/api/v1/orders", once_busy)
    page = await platform.list_paid(None)
    assert page.orders == [] and calls == 2


# --- the 409s of a delivery -----------------------------------------------------------------
def delivery_of(items: tuple[CardItem, ...]) -> dict[str, object]:
    return {
        "items": [{"code": i.code, "secret": i.secret} for i in items],
        "message": "",
        "delivered_at": "2024-01-01T00:00:00Z",
    }


async def test_already_delivered_with_the_same_items_is_delivered(
    server: StrictServer, platform: HttpPlatform
) -> None:
    """An earlier attempt of ours landed (under another key, or its answer was lost and the
    platform forgot the key): the order holds exactly our keys, so it is delivered."""
    same = tuple(reversed(ITEMS))  # the platform may list them in another order
    server.on(
        "POST",
        "/api/v1/orders/1/delivery",
        error(409, "already_delivered", delivery=delivery_of(same)),
    )
    await platform.deliver("1", "key-2", ITEMS, "")  # no error: delivered


async def test_already_delivered_with_other_items_is_a_conflict(
    server: StrictServer, platform: HttpPlatform
) -> None:
    other = (CardItem(code="C-1", secret="S-1"), CardItem(code="C-9", secret="S-9"))
    server.on(
        "POST",
        "/api/v1/orders/1/delivery",
        error(409, "already_delivered", delivery=delivery_of(other)),
    )
    with pytest.raises(DeliveryConflict):
        await platform.deliver("1", "key-2", ITEMS, "")
    fewer = ITEMS[:1]  # a subset is another delivery too
    server.on(
        "POST",
        "/api/v1/orders/1/delivery",
        error(409, "already_delivered", delivery=delivery_of(fewer)),
    )
    with pytest.raises(DeliveryConflict):
        await platform.deliver("1", "key-2", ITEMS, "")


@pytest.mark.parametrize("holds", ["same", "other"])
async def test_a_409_without_the_delivery_is_settled_by_reading_the_order(
    server: StrictServer, platform: HttpPlatform, holds: str
) -> None:
    items = ITEMS if holds == "same" else (CardItem(code="X", secret="Y"),)
    server.on("POST", "/api/v1/orders/1/delivery", error(409, "already_delivered"))
    server.on(
        "GET",
        "/api/v1/orders/1",
        answer(
            200,
            {
                "id": "1",
                "status": "delivered",
                "sku": "S",
                "quantity": 2,
                "delivery": delivery_of(items),
            },
        ),
    )
    if holds == "same":
        await platform.deliver("1", "key-2", ITEMS, "")
    else:
        with pytest.raises(DeliveryConflict):
            await platform.deliver("1", "key-2", ITEMS, "")
    assert server.count("GET", "/api/v1/orders/1") == 1


@pytest.mark.parametrize("status", ["cancelled", "refunded"])
async def test_a_closed_order_closes_the_line(
    server: StrictServer, platform: HttpPlatform, status: str
) -> None:
    server.on("POST", "/api/v1/orders/1/delivery", error(409, f"order_{status}"))
    with pytest.raises(OrderClosed) as closed:
        await platform.deliver("1", "key-1", ITEMS, "")
    assert closed.value.status == status
    assert server.count("GET", "/api/v1/orders/1") == 0


# --- bodies: non-JSON, oversized, gzip ------------------------------------------------------
async def huge(request: web.Request, _: bytes) -> web.StreamResponse:
    return web.Response(body=b"{" + b" " * (5 * 1024 * 1024) + b"}", status=200)


async def test_an_unreadable_answer_to_a_delivery_is_ambiguous(
    server: StrictServer, platform: HttpPlatform
) -> None:
    """The platform answered: the keys may be delivered. Unread, the outcome is unknown and
    the line is reconciled before anything is sent again (a Transient would re-send)."""
    server.on("POST", "/api/v1/orders/1/delivery", huge)
    with pytest.raises(Ambiguous):
        await platform.deliver("1", "key-1", ITEMS, "")
    server.on("POST", "/api/v1/orders/1/delivery", answer(200, "not json at all"))
    with pytest.raises(Ambiguous):
        await platform.deliver("1", "key-1", ITEMS, "")

    async def html(request: web.Request, _: bytes) -> web.StreamResponse:
        return web.Response(text="<html>ok</html>", content_type="text/html")

    server.on("POST", "/api/v1/orders/1/delivery", html)
    with pytest.raises(Ambiguous):
        await platform.deliver("1", "key-1", ITEMS, "")
    server.on("POST", "/api/v1/orders/1/refund", html)
    with pytest.raises(Ambiguous):
        await platform.refund("1", "refund-key", "bad key")


async def test_an_oversized_listing_is_a_bad_response(
    server: StrictServer, platform: HttpPlatform
) -> None:
    server.on("GET", "/api/v1/orders", huge)
    with pytest.raises(BadResponse):
        await platform.list_paid(None)


async def test_a_gzipped_listing_is_read(server: StrictServer, platform: HttpPlatform) -> None:
    page = {
        "orders": [{"id": "G1", "status": "paid", "sku": "S", "quantity": 1}],
        "next_cursor": "c1",
        "has_more": False,
    }

    async def gzipped(request: web.Request, _: bytes) -> web.StreamResponse:
        return web.Response(
            body=gzip.compress(json.dumps(page).encode()),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    server.on("GET", "/api/v1/orders", gzipped)
    listed = await platform.list_paid(None)
    assert [o.order_id for o in listed.orders] == ["G1"] and listed.next_cursor == "c1"


# --- the supplier ---------------------------------------------------------------------------
def purchase(ref: str, status: str = "completed", **extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "purchase_id": "P-1",
        "merchant_ref": ref,
        "status": status,
        "items": [{"code": "K", "secret": "V"}] if status == "completed" else [],
        "failure": None,
    }
    body.update(extra)
    return body


async def test_purchase_body_and_signature(server: StrictServer, supplier: HttpSupplier) -> None:
    server.on("POST", "/api/v1/purchases", answer(201, purchase("ref/1 ?")))
    result = await supplier.purchase("ref/1 ?", "SKU 1", 2, Decimal("9.00"))
    assert result.status == "completed" and server.refused == []
    (seen,) = server.seen
    assert json.loads(seen.body) == {
        "merchant_ref": "ref/1 ?",
        "sku": "SKU 1",
        "quantity": 2,
        "max_price": "9.00",  # money as a decimal string
    }
    server.on("GET", "/api/v1/purchases", answer(200, purchase("ref/1 ?")))
    assert await supplier.find_purchase("ref/1 ?") is not None
    query = parse_qs(urlsplit(server.seen[-1].raw_path).query)
    assert query == {"merchant_ref": ["ref/1 ?"]} and server.refused == []


async def test_an_unreadable_purchase_answer_is_ambiguous(
    server: StrictServer, supplier: HttpSupplier
) -> None:
    """Anything but a readable answer leaves the purchase unknown: asked about by its
    merchant_ref, never bought again under a new one (an oversized body was a refusal)."""
    server.on("POST", "/api/v1/purchases", huge)
    with pytest.raises(Ambiguous):
        await supplier.purchase("ref-1", "SKU", 1, None)
    server.on("POST", "/api/v1/purchases", answer(201, "garbage"))
    with pytest.raises(Ambiguous):
        await supplier.purchase("ref-1", "SKU", 1, None)
    server.on("POST", "/api/v1/purchases", error(502, "bad_gateway"))
    with pytest.raises(Ambiguous):
        await supplier.purchase("ref-1", "SKU", 1, None)


async def test_a_purchase_under_another_reference_is_not_ours(
    server: StrictServer, supplier: HttpSupplier
) -> None:
    server.on("POST", "/api/v1/purchases", answer(201, purchase("someone-else")))
    with pytest.raises(Ambiguous):
        await supplier.purchase("ref-1", "SKU", 1, None)
    server.on("GET", "/api/v1/purchases", answer(200, purchase("someone-else")))
    with pytest.raises(BadResponse):
        await supplier.find_purchase("ref-1")
    server.on("GET", "/api/v1/purchases/P-1", answer(200, purchase("someone-else")))
    with pytest.raises(BadResponse):
        await supplier.get_purchase("P-1", "ref-1")


async def test_no_purchase_under_the_reference_is_none(
    server: StrictServer, supplier: HttpSupplier
) -> None:
    server.on("GET", "/api/v1/purchases", error(404, "not_found"))
    assert await supplier.find_purchase("ref-1") is None


@pytest.mark.parametrize(
    "code", ["out_of_stock", "insufficient_balance", "price_changed", "something_new"]
)
async def test_each_failure_code_is_a_definite_failure(
    server: StrictServer, supplier: HttpSupplier, code: str
) -> None:
    failed = purchase("ref-1", "failed", failure={"code": code, "message": "no"})
    server.on("POST", "/api/v1/purchases", answer(201, failed))
    result = await supplier.purchase("ref-1", "SKU", 1, Decimal("1.00"))
    assert result.status == "failed" and result.failure_code == code and result.items == ()


@pytest.mark.parametrize("available", [None, 0, 7])
async def test_product_available_may_be_null(
    server: StrictServer, supplier: HttpSupplier, available: int | None
) -> None:
    body = {"sku": "S", "price": "8.50", "currency": "CNY", "available": available}
    server.on("GET", "/api/v1/products/S", answer(200, body))
    product = await supplier.product("S")
    assert product.available == available and product.price == Decimal("8.50")


# --- stock: a platform that knows only the plain count ---------------------------------------
def plain_stock_only(taken: list[object]) -> Handler:
    """PUT stock as the shared v1.1 text has it: `{"available": int >= 0}` and nothing else."""

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        payload = json.loads(body)
        if set(payload) != {"available"}:
            return web.json_response(
                {"error": {"code": "bad_body", "message": "unknown field"}}, status=400
            )
        taken.append(payload["available"])
        return web.Response(status=204)

    return handler


async def test_a_platform_refusing_the_watermark_gets_the_plain_count(
    server: StrictServer, platform: HttpPlatform
) -> None:
    taken: list[object] = []
    server.on("PUT", "/api/v1/skus/G/stock", plain_stock_only(taken))
    await platform.publish_stock_as_of("G", 5, "c-1")
    await platform.publish_stock_as_of("G", 3, "c-2")  # plain at once: no refusal again
    assert taken == [5, 3]
    assert server.count("PUT", "/api/v1/skus/G/stock") == 3


async def test_a_cursor_refused_once_is_sent_plain_that_once(
    server: StrictServer, platform: HttpPlatform
) -> None:
    bodies: list[dict[str, object]] = []

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        payload = json.loads(body)
        bodies.append(payload)
        if payload.get("as_of") == "gone":
            return web.json_response({"error": {"code": "bad_as_of", "message": "-"}}, status=422)
        return web.Response(status=204)

    server.on("PUT", "/api/v1/skus/G/stock", handler)
    await platform.publish_stock_as_of("G", 5, "gone")
    await platform.publish_stock_as_of("G", 4, "c-9")
    assert bodies == [
        {"available": 5, "as_of": "gone"},
        {"available": 5},
        {"available": 4, "as_of": "c-9"},
    ]
