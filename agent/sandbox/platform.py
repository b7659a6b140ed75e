"""An embedded selling platform implementing docs/protocol/platform-http.md.

Runs on loopback inside the demo and the tests. It keeps a full log of delivery calls so the
tests can check the invariants from the platform's side (exactly the ordered quantity of
distinct keys per order, no key to two orders, re-sends only with the same key).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agent.sandbox.server import SignedSandbox


@dataclass
class Faults:
    """Probabilities (0..1) and delays that make the sandbox misbehave like a real platform."""

    error_rate: float = 0.0  # 503 before anything is committed
    drop_after_commit_rate: float = 0.0  # commit the delivery, then lose the response
    rate_limit_rate: float = 0.0  # 429 with Retry-After
    malformed_rate: float = 0.0  # order list answered with broken JSON
    duplicate_rate: float = 0.0  # an order listed twice in one page
    latency: float = 0.0  # up to this many seconds added to every request


@dataclass
class DeliveryCall:
    order_id: str
    idempotency_key: str
    secrets: tuple[str, ...]
    outcome: str


@dataclass
class PublishedStock:
    """A stock count the agent published (platform-http v1.1): it accounts for every order
    before position `as_of` in the order sequence; the sales from there on are subtracted."""

    available: int
    as_of: int


@dataclass
class SandboxOrder:
    data: dict[str, Any]
    visible_at: float
    delivery: dict[str, Any] | None = None
    delivered_at: float | None = None
    notices: list[str] = field(default_factory=list)
    raw_json: str | None = None  # listed verbatim instead of `data` (see add_raw_json_order)

    @property
    def status(self) -> str:
        return str(self.data.get("status", "paid"))


class SandboxPlatform(SignedSandbox):
    def __init__(self, api_key: str = "sandbox", secret: str | None = None, seed: int = 0) -> None:
        super().__init__(api_key, secret, seed)
        self.faults = Faults()
        self.orders: dict[str, SandboxOrder] = {}
        self._sequence: list[str] = []
        self._idempotent: dict[str, tuple[int, dict[str, Any]]] = {}
        self.delivery_calls: list[DeliveryCall] = []
        self.refunds: list[str] = []
        # order id -> the Idempotency-Key of the delivery (or resend) standing now: what a
        # v1.1 replacement names in `replaces`
        self._delivered_with: dict[str, str] = {}
        self._arrivals = asyncio.Event()
        self._next_id = 1
        self.polls = 0  # plain listings
        self.long_polls = 0
        self.long_poll_offered = True  # the protocol makes the long poll optional
        self.stock_offered = True  # the stock endpoint is optional too (v1.1)
        self.replacement_offered = True  # False: a 1.0 platform, `replaces` ignored
        self.stock: dict[str, PublishedStock] = {}
        self.stock_puts: list[tuple[str, int, str | None]] = []  # (sku, available, as_of)
        self.refused = 0  # purchases try_buy refused for want of stock
        self.stock_refused = 0  # stock publications answered 404 (stock_offered off)
        # Per SKU: positions in the sequence of its orders, and the units sold up to each.
        self._sales: dict[str, tuple[list[int], list[int]]] = {}

    # --- test/demo API ------------------------------------------------------------------------
    def add_order(
        self, sku: str, quantity: int = 1, order_id: str | None = None, **extra: Any
    ) -> str:
        if order_id is None:
            order_id = f"SB{self._next_id:07d}"
            self._next_id += 1
        data = {
            "id": order_id,
            "status": "paid",
            "sku": sku,
            "quantity": quantity,
            "paid_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "amount": "9.90",
            "currency": "CNY",
            "buyer": {"contact": f"buyer-{order_id}@example.test"},
            "deliver_by": None,
            **extra,
        }
        self.add_raw_order(order_id, data)
        return order_id

    def add_raw_order(self, order_id: str, data: Any) -> None:
        """Lists `data` verbatim (tests use it to feed hostile input)."""
        self.orders[order_id] = SandboxOrder(
            data=data if isinstance(data, dict) else {"raw": data}, visible_at=time.time()
        )
        self._sequence.append(order_id)
        self._count_sale(len(self._sequence) - 1, data)
        self._arrivals.set()  # wake long polls
        self._arrivals = asyncio.Event()

    def add_raw_json_order(self, order_id: str, text: str) -> None:
        """Lists `text` verbatim as one entry of the order list: hostile JSON that json.dumps
        cannot write (a 5,000-digit number, nesting 100,000 deep)."""
        self.add_raw_order(order_id, {"id": order_id, "status": "paid"})
        self.orders[order_id].raw_json = text

    def try_buy(self, sku: str, quantity: int = 1, **extra: Any) -> str | None:
        """A buyer's purchase as the platform allows it: a paid order, or None when the SKU
        has published stock and fewer than `quantity` keys of it are left to sell."""
        left = self.shown_stock(sku)
        if left is not None and quantity > left:
            self.refused += 1
            return None
        return self.add_order(sku, quantity, **extra)

    def shown_stock(self, sku: str) -> int | None:
        """What the platform still sells of `sku`: the published count less the sales after
        its watermark; None when the agent never published stock for it (no limit)."""
        published = self.stock.get(sku)
        if published is None:
            return None
        positions, units = self._sales.get(sku, ([], []))
        before = bisect.bisect_left(positions, published.as_of)
        sold_after = (units[-1] if units else 0) - (units[before - 1] if before else 0)
        return max(0, published.available - sold_after)

    def _count_sale(self, position: int, data: Any) -> None:
        if not isinstance(data, dict):
            return
        sku, quantity = data.get("sku"), data.get("quantity")
        if not isinstance(sku, str) or not isinstance(quantity, int) or isinstance(quantity, bool):
            return
        positions, units = self._sales.setdefault(sku, ([], []))
        positions.append(position)
        units.append((units[-1] if units else 0) + max(0, quantity))

    def set_status(self, order_id: str, status: str) -> None:
        self.orders[order_id].data["status"] = status

    def delivered_secrets(self) -> dict[str, list[str]]:
        return {
            oid: [item["secret"] for item in o.delivery["items"]]
            for oid, o in self.orders.items()
            if o.delivery is not None
        }

    def latencies(self) -> list[float]:
        return [
            o.delivered_at - o.visible_at
            for o in self.orders.values()
            if o.delivered_at is not None
        ]

    # --- server -------------------------------------------------------------------------------
    def fault_rates(self) -> tuple[float, float, float]:
        return self.faults.error_rate, self.faults.rate_limit_rate, self.faults.latency

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/orders", self._poll)
        app.router.add_get("/api/v1/orders/wait", self._wait)
        app.router.add_get("/api/v1/orders/{id}", self._get)
        app.router.add_post("/api/v1/orders/{id}/delivery", self._deliver)
        app.router.add_post("/api/v1/orders/{id}/notice", self._notice)
        app.router.add_post("/api/v1/orders/{id}/refund", self._refund)
        app.router.add_put("/api/v1/skus/{sku}/stock", self._put_stock)

    async def _list(self, request: web.Request) -> web.Response:
        if request.query.get("status", "paid") != "paid":
            return self.error(400, "bad_status", "only status=paid is supported")
        try:
            position = int(request.query.get("cursor") or 0)
            limit = max(1, min(int(request.query.get("limit", "100")), 1000))
        except ValueError:
            return self.error(400, "bad_cursor", "cursor and limit must be integers")
        if self.random.random() < self.faults.malformed_rate:
            return web.Response(text='{"orders": [{"id": "trunc', content_type="application/json")
        page: list[Any] = []
        raw = False
        while position < len(self._sequence) and len(page) < limit:
            order = self.orders[self._sequence[position]]
            position += 1
            if order.status == "paid":
                raw = raw or order.raw_json is not None
                page.append(order.raw_json or order.data.get("raw", order.data))
        if page and self.random.random() < self.faults.duplicate_rate:
            page.append(self.random.choice(page))
        body = {"next_cursor": str(position), "has_more": position < len(self._sequence)}
        if raw:  # spliced in as text: json.dumps cannot write what a hostile platform sends
            entries = ",".join(e if isinstance(e, str) else json.dumps(e) for e in page)
            text = json.dumps(body)[:-1] + f', "orders": [{entries}]}}'
            return web.Response(text=text, content_type="application/json")
        return web.json_response({"orders": page, **body})

    async def _poll(self, request: web.Request) -> web.Response:
        self.polls += 1
        return await self._list(request)

    async def _wait(self, request: web.Request) -> web.Response:
        """Long poll: answers as soon as a paid order exists after the cursor."""
        if not self.long_poll_offered:
            return self.error(404, "not_found", "no such route")
        self.long_polls += 1
        try:
            position = int(request.query.get("cursor") or 0)
            wait = min(float(request.query.get("timeout", "25")), 30.0)
        except ValueError:
            return self.error(400, "bad_cursor", "cursor and timeout must be numbers")
        deadline = time.monotonic() + wait
        while not any(self.orders[oid].status == "paid" for oid in self._sequence[position:]):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrivals.wait(), remaining)
        return await self._list(request)

    async def _get(self, request: web.Request) -> web.Response:
        order = self.orders.get(request.match_info["id"])
        if order is None:
            return self.error(404, "not_found", "no such order")
        body = dict(order.data)
        if order.delivery is not None:
            body["delivery"] = order.delivery
        return web.json_response(body)

    async def _deliver(self, request: web.Request) -> web.StreamResponse:
        order_id = request.match_info["id"]
        key = request.headers.get("Idempotency-Key")
        if not key:
            return self.error(400, "missing_idempotency_key", "Idempotency-Key is required")
        try:
            payload = json.loads(await request.read())
            items = payload["items"]
            item_secrets = tuple(str(item["secret"]) for item in items)
        except (ValueError, KeyError, TypeError):
            return self.error(400, "bad_body", "body must be {items:[{code,secret}],message}")
        if key in self._idempotent:
            status, cached = self._idempotent[key]
            self.delivery_calls.append(DeliveryCall(order_id, key, item_secrets, "replayed"))
            return web.json_response(cached, status=status)
        order = self.orders.get(order_id)
        if order is None:
            return self.error(404, "not_found", "no such order")
        replaces = payload.get("replaces") if isinstance(payload, dict) else None
        if replaces is not None and self.replacement_offered:
            return self._replace(request, order, key, str(replaces), items, item_secrets, payload)
        if order.delivery is not None:
            if sorted(item_secrets) == sorted(i["secret"] for i in order.delivery["items"]):
                self.delivery_calls.append(DeliveryCall(order_id, key, item_secrets, "resent"))
                self._delivered_with[order_id] = key
                return web.json_response(
                    {"status": "delivered", "delivered_at": order.delivery["delivered_at"]}
                )
            self.delivery_calls.append(DeliveryCall(order_id, key, item_secrets, "conflict"))
            return web.json_response(
                {
                    "error": {"code": "already_delivered", "message": "other items"},
                    "delivery": order.delivery,
                },
                status=409,
            )
        if order.status in ("cancelled", "refunded"):
            # platform-http v1: a delivery to an order no longer paid is 409 with the reason
            return self.error(409, f"order_{order.status}", f"order is {order.status}")
        if order.status != "paid":
            return self.error(422, "not_payable", f"order is {order.status}")
        if len(items) != order.data.get("quantity"):
            return self.error(422, "wrong_quantity", "item count differs from quantity")
        now = time.time()
        order.delivery = {
            "items": [{"code": i.get("code", ""), "secret": i["secret"]} for i in items],
            "message": payload.get("message", ""),
            "delivered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }
        order.delivered_at = now
        order.data["status"] = "delivered"
        response = {"status": "delivered", "delivered_at": order.delivery["delivered_at"]}
        self._idempotent[key] = (200, response)
        self._delivered_with[order_id] = key
        if self.random.random() < self.faults.drop_after_commit_rate:
            self.delivery_calls.append(DeliveryCall(order_id, key, item_secrets, "dropped"))
            return self.lose_response(request)
        self.delivery_calls.append(DeliveryCall(order_id, key, item_secrets, "delivered"))
        return web.json_response(response)

    def _replace(
        self,
        request: web.Request,
        order: SandboxOrder,
        key: str,
        replaces: str,
        items: list[dict[str, Any]],
        item_secrets: tuple[str, ...],
        payload: dict[str, Any],
    ) -> web.StreamResponse:
        """platform-http v1.1: a delivered order's keys replaced; `replaces` must name the
        delivery standing now (else 409 replaces_stale, with it)."""
        order_id = str(order.data["id"])
        if order.status in ("cancelled", "refunded"):
            return self.error(409, f"order_{order.status}", f"order is {order.status}")
        if order.delivery is None:
            return self.error(422, "not_delivered", "only a delivered order can be replaced")
        if self._delivered_with.get(order_id) != replaces:
            self.delivery_calls.append(DeliveryCall(order_id, key, item_secrets, "conflict"))
            return web.json_response(
                {
                    "error": {"code": "replaces_stale", "message": "not the standing delivery"},
                    "delivery": order.delivery,
                },
                status=409,
            )
        if len(items) != order.data.get("quantity"):
            return self.error(422, "wrong_quantity", "item count differs from quantity")
        now = time.time()
        order.delivery = {
            "items": [{"code": i.get("code", ""), "secret": i["secret"]} for i in items],
            "message": payload.get("message", ""),
            "delivered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }
        order.delivered_at = now
        self._delivered_with[order_id] = key
        response = {"status": "delivered", "delivered_at": order.delivery["delivered_at"]}
        self._idempotent[key] = (200, response)
        if self.random.random() < self.faults.drop_after_commit_rate:
            self.delivery_calls.append(DeliveryCall(order_id, key, item_secrets, "dropped"))
            return self.lose_response(request)
        self.delivery_calls.append(DeliveryCall(order_id, key, item_secrets, "replaced"))
        return web.json_response(response)

    async def _notice(self, request: web.Request) -> web.Response:
        order = self.orders.get(request.match_info["id"])
        if order is None:
            return self.error(404, "not_found", "no such order")
        try:
            message = json.loads(await request.read())["message"]
        except (ValueError, KeyError, TypeError):
            return self.error(400, "bad_body", "body must be {message}")
        # v1.1: the same Idempotency-Key again -> 204 and no second message
        key = request.headers.get("Idempotency-Key")
        if key and f"notice:{key}" in self._idempotent:
            return web.Response(status=204)
        order.notices.append(str(message))
        if key:
            self._idempotent[f"notice:{key}"] = (204, {})
        if self.random.random() < self.faults.drop_after_commit_rate:
            return self.lose_response(request)
        return web.Response(status=204)

    async def _refund(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        if not key:
            return self.error(400, "missing_idempotency_key", "Idempotency-Key is required")
        if key in self._idempotent:
            status, cached = self._idempotent[key]
            return web.json_response(cached, status=status)
        order = self.orders.get(request.match_info["id"])
        if order is None:
            return self.error(404, "not_found", "no such order")
        # platform-http: a paid or a delivered order may be refunded (after-sales: the keys
        # the buyer got stay theirs); a cancelled one has no money left to return.
        if order.status == "cancelled":
            return self.error(409, "order_cancelled", "a cancelled order cannot be refunded")
        if order.status == "refunded":  # refunded once already: nothing more to return
            return web.json_response({"status": "refunded"})
        order.data["status"] = "refunded"
        self.refunds.append(order.data["id"])
        self._idempotent[key] = (200, {"status": "refunded"})
        return web.json_response({"status": "refunded"})

    async def _put_stock(self, request: web.Request) -> web.Response:
        """platform-http v1.1: the stock the platform may sell, as of a listing cursor."""
        if not self.stock_offered:
            self.stock_refused += 1
            return self.error(404, "not_found", "no such route")
        try:
            body = json.loads(await request.read())
            available = body["available"]
            as_of = body.get("as_of")
        except (ValueError, KeyError, TypeError, AttributeError):
            return self.error(400, "bad_body", "body must be {available, as_of?}")
        if not isinstance(available, int) or isinstance(available, bool) or available < 0:
            return self.error(422, "bad_available", "available must be an integer >= 0")
        if as_of is None:
            position = len(self._sequence)  # v1 clients: the count is as of now
        else:
            try:
                position = int(as_of) if isinstance(as_of, str) else -1
            except ValueError:
                position = -1
            if not 0 <= position <= len(self._sequence):
                return self.error(422, "bad_as_of", "as_of must be a cursor this platform gave")
        sku = request.match_info["sku"]
        self.stock[sku] = PublishedStock(available, position)
        self.stock_puts.append((sku, available, as_of))
        return web.Response(status=204)
