"""The real daemon (`kami-agent run`) against a strict, scripted platform and supplier written
from docs/protocol/platform-http.md and supplier-http.md, not from our sandbox: every request's
signature is checked over the path and query exactly as sent; each order is scripted to take one
of the protocol's paths (409s, a 5xx after commit, hostile fields, duplicates, a stuck cursor).
The ledger is read at the end for what became of each order."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from tests.daemon import import_stock, start_daemon, wait_until
from tests.helpers import SAFETY_TIMEOUT
from tests.loopback import serve

PLATFORM_SECRET = "conformance-platform-secret"
SUPPLIER_SECRET = "conformance-supplier-secret"
SECRETS = {
    "KAMI_SECRET_PLATFORM_MAIN_SECRET": PLATFORM_SECRET,
    "KAMI_SECRET_SUPPLIER_UP_SECRET": SUPPLIER_SECRET,
}
SKU = "GAME-100"
BOUGHT = "GAME-BUY"


def authentic(request: web.Request, body: bytes, api_key: str, secret: str) -> str | None:
    """The protocol's auth, written out: unix seconds within 300 s, HMAC over
    ts\\nMETHOD\\npath_with_query\\nhex(sha256(body)), path and query as they came."""
    headers = request.headers
    ts = headers.get("X-Timestamp", "")
    if headers.get("X-Api-Key") != api_key or not ts.isdigit():
        return "api key or timestamp"
    if abs(time.time() - int(ts)) > 300:
        return "stale"
    digest = hashlib.sha256(body).hexdigest()
    message = f"{ts}\n{request.method}\n{request.raw_path}\n{digest}".encode()
    expected = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, headers.get("X-Signature", "")):
        return f"bad signature over {request.raw_path!r}"
    return None


@dataclass
class Call:
    at: float
    method: str
    path: str
    query: dict[str, list[str]]


@dataclass
class StrictPlatform:
    """platform-http v1 as written, with a script per order id (see `script`)."""

    orders: list[dict[str, Any]] = field(default_factory=list)
    page_size: int = 3
    # order id -> what its first delivery call gets: "same409", "other409", "order_cancelled",
    # "order_refunded", "lost" (committed, then a 503), "busy" (503 + Retry-After, nothing done)
    script: dict[str, str] = field(default_factory=dict)
    stuck_cursor: bool = False  # the last page says has_more with the cursor it was asked for
    listing_busy_for: float = 0.0  # from the first listing on: 429s for this long
    listing_busy_until: float | None = None  # 429 with an HTTP-date Retry-After until then
    first_busy_answer: float | None = None  # when the first of those 429s went out
    calls: list[Call] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    delivered: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    delivery_posts: dict[str, list[str]] = field(default_factory=dict)  # id -> keys used
    stock_puts: int = 0
    _replies: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)

    def cursor(self, position: int) -> str:
        # Opaque to the agent: characters that must be percent-encoded to come back intact.
        return f"p/{position} +&=%?#中"

    def position(self, cursor: str | None) -> int:
        if not cursor:
            return 0
        return int(cursor.split("/")[1].split(" ")[0])

    def status_of(self, order: dict[str, Any]) -> Any:
        if order.get("id") in self.delivered:
            return "delivered"
        return order.get("status")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        url = urlsplit(request.raw_path)
        self.calls.append(
            Call(time.time(), request.method, url.path, parse_qs(url.query, keep_blank_values=True))
        )
        why = authentic(request, body, "conformance", PLATFORM_SECRET)
        if why:
            self.refused.append(why)
            return self.error(401, "unauthorized", why)
        parts = request.path.split("/")  # decoded: ["", "api", "v1", "orders", id, action]
        if request.method == "GET" and request.path == "/api/v1/orders":
            return self.listing(request)
        if request.method == "GET" and len(parts) == 5 and parts[3] == "orders":
            return self.order(parts[4])
        if request.method == "POST" and len(parts) == 6 and parts[5] == "delivery":
            return self.deliver(parts[4], request.headers.get("Idempotency-Key", ""), body)
        if request.method == "PUT" and parts[3:4] == ["skus"]:
            self.stock_puts += 1
        return self.error(404, "not_found", "no such route")  # no long poll, no stock endpoint

    def error(self, status: int, code: str, message: str, **extra: Any) -> web.Response:
        body = {"error": {"code": code, "message": message}, **extra}
        return web.json_response(body, status=status)

    def listing(self, request: web.Request) -> web.Response:
        if self.listing_busy_for and self.listing_busy_until is None:
            # An HTTP-date has whole seconds: an instant the header can state exactly.
            self.listing_busy_until = float(int(time.time() + self.listing_busy_for))
        if self.listing_busy_until is not None and time.time() < self.listing_busy_until:
            when = formatdate(self.listing_busy_until, usegmt=True)
            if self.first_busy_answer is None:
                self.first_busy_answer = time.time()
            return web.json_response(
                {"error": {"code": "rate_limited", "message": "slow down"}},
                status=429,
                headers={"Retry-After": when},
            )
        query = request.query
        assert query.get("status") == "paid"
        start = self.position(query.get("cursor"))
        limit = int(query.get("limit", "100"))
        chunk = self.orders[start : start + min(limit, self.page_size)]
        end = start + len(chunk)
        has_more = end < len(self.orders)
        next_cursor: str | None = self.cursor(end) if chunk else None
        if self.stuck_cursor and not has_more:
            # A broken platform: more to come, but the same cursor again, forever.
            has_more, next_cursor = True, query.get("cursor") or None
        paid = [o for o in chunk if self.status_of(o) not in ("delivered",)]
        return web.json_response({"orders": paid, "next_cursor": next_cursor, "has_more": has_more})

    def order(self, order_id: str) -> web.Response:
        for order in self.orders:
            if order.get("id") == order_id:
                body = dict(order, status=self.status_of(order))
                if order_id in self.delivered:
                    body["delivery"] = {
                        "items": self.delivered[order_id],
                        "delivered_at": "2024-01-01T00:00:00Z",
                    }
                return web.json_response(body)
        return self.error(404, "not_found", "no such order")

    def deliver(self, order_id: str, key: str, body: bytes) -> web.Response:
        assert key, "delivery without Idempotency-Key"
        self.delivery_posts.setdefault(order_id, []).append(key)
        if key in self._replies:
            status, reply = self._replies[key]
            return web.json_response(reply, status=status)
        items = json.loads(body)["items"]
        first = len(self.delivery_posts[order_id]) == 1
        script = self.script.get(order_id, "") if first else ""
        if script in ("order_cancelled", "order_refunded"):
            return self.error(409, script, "no longer paid")
        if script == "other409":
            other = [{"code": "", "secret": f"someone-else-{order_id}"}] * len(items)
            self.delivered[order_id] = other
            return self.error(409, "already_delivered", "other items", delivery={"items": other})
        if script == "same409":
            # Delivered by an earlier attempt whose key the platform no longer knows.
            self.delivered[order_id] = items
            return self.error(409, "already_delivered", "delivered", delivery={"items": items})
        if script == "busy":
            return web.json_response(
                {"error": {"code": "unavailable", "message": "maintenance"}},
                status=503,
                headers={"Retry-After": "3"},
            )
        if order_id in self.delivered:
            if sorted(map(str, self.delivered[order_id])) == sorted(map(str, items)):
                return web.json_response({"status": "delivered", "delivered_at": "x"})
            return self.error(
                409, "already_delivered", "other", delivery={"items": self.delivered[order_id]}
            )
        self.delivered[order_id] = items
        reply = {"status": "delivered", "delivered_at": "2024-01-01T00:00:00Z"}
        self._replies[key] = (200, reply)
        if script == "lost":
            return self.error(503, "unavailable", "committed, then failed")
        return web.json_response(reply)


@asynccontextmanager
async def serving(handler: Any) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner, url = await serve(app)
    try:
        yield url
    finally:
        await runner.cleanup()


def write_config(tmp_path: Path, platform_url: str, supplier_url: str = "") -> Path:
    supplier = ""
    if supplier_url:
        supplier = f"""
[skus."{BOUGHT}"]
max_quantity = 5
sources = ["up"]
max_price = "9.00"

[suppliers.up]
base_url = "{supplier_url}"
api_key = "conformance-up"
secret = "supplier.up.secret"
timeout = 1.0
query_grace = 2.0
processing_poll = 0.1
"""
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[agent]
poll_interval = 0.2
sweep_interval = 0.1
reconcile_interval = 1.0
concurrency = 4
retry_base = 0.05
retry_cap = 0.3

[store]
path = "kami.db"

[platforms.main]
base_url = "{platform_url}"
api_key = "conformance"
secret = "platform.main.secret"
timeout = 2.0
long_poll = true

[skus."{SKU}"]
max_quantity = 5
{supplier}
""",
        encoding="utf-8",
    )
    return path


def ledger_states(tmp_path: Path) -> dict[str, str]:
    with sqlite3.connect(tmp_path / "kami.db") as conn:
        return dict(conn.execute("SELECT order_id, state FROM orders").fetchall())


def order(order_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": order_id,
        "status": "paid",
        "sku": SKU,
        "quantity": 1,
        "paid_at": "2024-01-01T00:00:00Z",
        "amount": "9.90",
        "currency": "CNY",
        "buyer": {"contact": "b@example.test"},
        "deliver_by": None,
        **fields,
    }


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), SAFETY_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_the_daemon_speaks_platform_http_as_written(tmp_path: Path) -> None:
    """One run, every order scripted to one path of the protocol."""
    fake = StrictPlatform()
    hostile = {
        "Q-ZERO": order("Q-ZERO", quantity=0),
        "Q-NEG": order("Q-NEG", quantity=-1),
        "Q-HUGE": order("Q-HUGE", quantity=10**30),
        "Q-FLOAT": order("Q-FLOAT", quantity=1.5),
        "Q-STR": order("Q-STR", quantity="1"),
        "NO-SKU": {k: v for k, v in order("NO-SKU").items() if k != "sku"},
        "NO-QTY": {k: v for k, v in order("NO-QTY").items() if k != "quantity"},
    }
    fake.orders = [
        order("OK-1"),
        order("DUP", quantity=2),
        order("DUP", quantity=2),  # twice in one page
        order("SAME-409", quantity=2),
        *hostile.values(),
        order("DUP", quantity=2),  # and again on a later page
        order("OTHER-409"),
        order("CANCELLED"),
        order("REFUNDED"),
        order("LOST", quantity=3),
        order("WEIRD", status="on_hold"),  # not paid: not ours to deliver
        order("OK-2"),
    ]
    fake.script = {
        "SAME-409": "same409",
        "OTHER-409": "other409",
        "CANCELLED": "order_cancelled",
        "REFUNDED": "order_refunded",
        "LOST": "lost",
    }
    fake.stuck_cursor = True
    async with serving(fake.handle) as url:
        config = write_config(tmp_path, url)
        keys = [f"{SKU}-conf-{i:03d}" for i in range(30)]
        await import_stock(config, SECRETS, tmp_path, SKU, keys)
        log = tmp_path / "daemon.log"
        proc = await start_daemon(config, SECRETS, log)
        try:
            wanted = {"OK-1", "OK-2", "DUP", "SAME-409", "LOST"}
            await wait_until(lambda: wanted <= set(fake.delivered), "deliveries", proc)

            def relisted() -> bool:  # from the start again, after a listing with a cursor
                cursors = ["cursor" in c.query for c in fake.calls if c.path == "/api/v1/orders"]
                return True in cursors and False in cursors[cursors.index(True) :]

            await wait_until(relisted, "a re-list from the start", proc)
            await wait_until(
                lambda: (
                    {"OTHER-409", "CANCELLED", "REFUNDED", "Q-ZERO"} <= set(ledger_states(tmp_path))
                ),
                "the ledger",
                proc,
            )
            settled = ("delivered", "needs_attention", "cancelled", "refunded")
            await wait_until(
                lambda: all(s in settled for s in ledger_states(tmp_path).values()),
                "every line settled",
                proc,
            )
        finally:
            await stop(proc)
    assert fake.refused == []  # every request signed over exactly what was sent
    states = ledger_states(tmp_path)
    assert states == {
        "OK-1": "delivered",
        "OK-2": "delivered",
        "DUP": "delivered",
        "SAME-409": "delivered",  # 409 already_delivered holding our keys
        "LOST": "delivered",  # 503 after commit: reconciled, not sent twice
        "OTHER-409": "needs_attention",  # 409 with other keys: never a second set
        "CANCELLED": "cancelled",
        "REFUNDED": "refunded",
        **dict.fromkeys(hostile, "needs_attention"),
    }
    # One delivery call for DUP however often it was listed; none with a second set of keys.
    assert len(fake.delivery_posts["DUP"]) == 1 and len(fake.delivered["DUP"]) == 2
    assert len(fake.delivery_posts["OTHER-409"]) == 1
    # The 5xx after commit was followed by a read of the order before any re-send.
    lost = [c for c in fake.calls if c.path.startswith("/api/v1/orders/LOST")]
    assert [c.method for c in lost][:2] == ["POST", "GET"], [c.method for c in lost]
    assert len(fake.delivery_posts["LOST"]) == 1
    # Distinct keys, the ordered quantity each, no key to two orders.
    sent = [
        i["secret"]
        for oid in ("OK-1", "OK-2", "DUP", "SAME-409", "LOST")
        for i in fake.delivered[oid]
    ]
    assert len(sent) == len(set(sent)) == 1 + 1 + 2 + 2 + 3
    assert set(sent) <= set(keys)
    events = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert "cursor_did_not_advance" in {e["event"] for e in events}
    assert "long_poll_unsupported" in {e["event"] for e in events}  # 404: polling only
    assert fake.stock_puts == 1  # 404 to the stock endpoint: never published again
    assert not [e for e in events if "exception" in e or e.get("level") == "critical"]


async def test_retry_after_is_honoured_as_a_date_and_as_seconds(tmp_path: Path) -> None:
    """429 with Retry-After as an HTTP-date on the listing: no listing before that date.
    503 with Retry-After: 3 on a delivery (nothing done): no call about that order sooner."""
    fake = StrictPlatform()
    fake.orders = [order("BUSY"), order("OK")]
    fake.script = {"BUSY": "busy"}
    # Longer than the adapter waits within one call (2 s): the engine must hold off.
    fake.listing_busy_for = 5.0
    async with serving(fake.handle) as url:
        config = write_config(tmp_path, url)
        await import_stock(config, SECRETS, tmp_path, SKU, [f"{SKU}-ra-{i}" for i in range(4)])
        proc = await start_daemon(config, SECRETS, tmp_path / "daemon.log")
        try:
            await wait_until(lambda: {"BUSY", "OK"} <= set(fake.delivered), "deliveries", proc)
        finally:
            await stop(proc)
    assert fake.refused == []
    busy_until = fake.listing_busy_until
    assert busy_until is not None
    listings = [c.at for c in fake.calls if c.path == "/api/v1/orders"]
    # Once the platform said when, no listing (poll, busy poll, re-list) came before then;
    # only those already on their way with the first (startup's poll and re-list, sent
    # together) were refused. (0.1 s: those arrive within a moment of each other.)
    assert fake.first_busy_answer is not None
    early = [at for at in listings if fake.first_busy_answer + 0.1 < at < busy_until]
    assert early == [], [round(at - busy_until, 2) for at in listings[:6]]
    busy = [c.at for c in fake.calls if c.path.startswith("/api/v1/orders/BUSY")]
    assert len(busy) >= 2 and busy[1] - busy[0] >= 3.0 - 0.05, busy


@dataclass
class StrictSupplier:
    """supplier-http v1: the first purchase is charged but its answer never comes (the
    agent times out); the same merchant_ref again returns the existing purchase."""

    purchases: dict[str, dict[str, Any]] = field(default_factory=dict)  # by merchant_ref
    posts: list[str] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    charged: int = 0
    hang: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        why = authentic(request, body, "conformance-up", SUPPLIER_SECRET)
        if why:
            self.refused.append(why)
            return web.json_response({"error": {"code": "unauthorized", "message": why}}, 401)
        if request.method == "GET" and request.path.startswith("/api/v1/products/"):
            sku = request.path.rsplit("/", 1)[1]
            return web.json_response(
                {"sku": sku, "price": "8.50", "currency": "CNY", "available": None}
            )
        if request.method == "GET" and request.path == "/api/v1/balance":
            return web.json_response({"balance": "100.00", "currency": "CNY"})
        if request.method == "GET" and request.path == "/api/v1/purchases":
            ref = request.query.get("merchant_ref", "")
            self.lookups.append(ref)
            if ref in self.purchases:
                return web.json_response(self.purchases[ref])
            return web.json_response({"error": {"code": "not_found", "message": "-"}}, 404)
        if request.method == "POST" and request.path == "/api/v1/purchases":
            payload = json.loads(body)
            ref = payload["merchant_ref"]
            self.posts.append(ref)
            assert payload["max_price"] == "9.00" and payload["quantity"] == 2
            if ref not in self.purchases:
                self.charged += 1
                self.purchases[ref] = {
                    "purchase_id": f"P-{self.charged}",
                    "merchant_ref": ref,
                    "status": "completed",
                    "items": [
                        {"code": "", "secret": f"bought-{self.charged}-{i}"} for i in range(2)
                    ],
                    "failure": None,
                }
                if self.charged == 1:
                    await asyncio.sleep(3.0)  # longer than the agent's timeout: answer lost
            return web.json_response(self.purchases[ref], status=201)
        return web.json_response({"error": {"code": "not_found", "message": "-"}}, 404)


async def test_a_lost_purchase_answer_is_asked_about_never_bought_again(tmp_path: Path) -> None:
    fake = StrictPlatform()
    fake.orders = [order("BUY", sku=BOUGHT, quantity=2)]
    supplier = StrictSupplier()
    async with serving(fake.handle) as url, serving(supplier.handle) as supplier_url:
        config = write_config(tmp_path, url, supplier_url)
        proc = await start_daemon(config, SECRETS, tmp_path / "daemon.log")
        try:
            await wait_until(lambda: "BUY" in fake.delivered, "the bought keys delivered", proc)
        finally:
            await stop(proc)
    assert fake.refused == [] and supplier.refused == []
    assert supplier.charged == 1  # one charge: the lost answer was asked about by reference
    assert len(set(supplier.posts)) == 1 and supplier.lookups
    assert set(supplier.lookups) == set(supplier.posts)
    assert sorted(i["secret"] for i in fake.delivered["BUY"]) == ["bought-1-0", "bought-1-1"]
    assert ledger_states(tmp_path) == {"BUY": "delivered"}
