"""A local fake of a WooCommerce shop's REST API (wc/v3), built from WooCommerce's own
documentation and written without looking at the adapter (nothing here imports
agent.platforms.woocommerce), so the adapter is checked against the shop, not against itself.

Sources (woocommerce/woocommerce-rest-api-docs, source/includes/wp-api-v3/):
- _authentication.md: over HTTPS, consumer key and secret as HTTP Basic user and password, or as
  `consumer_key`/`consumer_secret` in the query; over HTTP, OAuth 1.0a "one-legged" parameters
  in the query, HMAC-SHA1/256 keyed with `secret&`, 15-minute timestamps, single-use nonces
  (checked as includes/class-wc-rest-authentication.php does; the fake runs plain HTTP, so
  Basic is read only when `ssl` is set, as WordPress's is_ssl() decides).
- _introduction.md: errors are `{"code", "message", "data": {"status"}}`; collections are paged
  with `page` (1-based) and `per_page`; `X-WP-Total` and `X-WP-TotalPages` always sent.
- _orders.md: the order properties (`id`, `status`, `date_modified_gmt`, `date_paid_gmt`,
  `billing.email`, `line_items[]` with `id`, `sku`, `quantity`, `product_id`, `meta_data`);
  list parameters `status`, `modified_after`, `dates_are_gmt`, `orderby` (date, id, include,
  title, slug), `order`, `page`, `per_page`; `PUT /orders/<id>` with `{"status": ...}`.
- _order-notes.md: `POST /orders/<id>/notes {"note", "customer_note"}` (a customer note "will be
  shown to customers and they will be notified"), `GET /orders/<id>/notes` (every note, newest
  first, `type` = any | customer | internal).
Where the docs are silent, the plugin's REST controllers (woocommerce/woocommerce,
includes/rest-api/Controllers/Version3/class-wc-rest-crud-controller.php and
class-wc-rest-order-notes-controller.php): `per_page` at most 100, `modified_after` is strictly
after (WordPress date_query), a created note answers 201, the notes list is not paged, a page
past the end is an empty list with the headers.

Nothing a shop does is idempotent: every note POSTed is a new note and, if it is a customer note,
a new e-mail to the buyer. The fake counts them (`customer_notes`, `notes_naming`), so a test
can assert what the buyer saw. Faults: 503s, host 429s, responses lost after the change was
made, orders listed twice, and the shop closing orders on its own (`shop_set_status`,
`schedule_refund`). The clock is injectable; dates are written in the site's time zone
(UTC-5 unless told otherwise) and in GMT, as WooCommerce does, so a client that forgets
`dates_are_gmt` asks for orders modified five hours later than it means, and misses them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.utils import formatdate
from typing import Any
from urllib.parse import quote

from aiohttp import web

from tests.loopback import serve

API = "/wp-json/wc/v3"
STATUSES = ("pending", "processing", "on-hold", "completed", "cancelled", "refunded", "failed")
ORDERBY = ("date", "id", "include", "title", "slug")
MAX_PER_PAGE = 100


@dataclass
class WooFaults:
    """Probabilities (0..1) of the ways a real shop (or the host in front of it) misbehaves."""

    error_rate: float = 0.0  # 503 before anything is done
    rate_limit_rate: float = 0.0  # 429 with Retry-After (a host's or a security plugin's limiter)
    drop_after_commit_rate: float = 0.0  # a note created / a status set, then the answer lost
    duplicate_rate: float = 0.0  # an order listed twice in one page
    latency: float = 0.0  # up to this many seconds added to every request


@dataclass
class FakeNote:
    id: int
    note: str
    customer_note: bool
    created: float
    author: str = "system"


@dataclass
class FakeLine:
    id: int
    name: str
    product_id: int
    sku: str
    quantity: int
    price: str = "9.90"


@dataclass
class FakeOrder:
    id: int
    status: str
    created: float
    modified: float
    email: str
    lines: list[FakeLine]
    paid: float | None = None
    completed: float | None = None
    notes: list[FakeNote] = field(default_factory=list)
    meta_data: list[dict[str, Any]] = field(default_factory=list)
    refund_after_touches: int | None = None
    touches: int = 0  # requests about this order (read, note, update)


def _local(ts: float | None, zone: timezone) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(int(ts), zone).strftime("%Y-%m-%dT%H:%M:%S")


def _gmt(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _parse_date(value: str, gmt: bool, zone: timezone) -> float:
    """An ISO 8601 date-time as WordPress reads a date_query bound: with its own offset if it
    has one, else in GMT (dates_are_gmt) or in the site's time zone."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace(" ", "T"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC if gmt else zone)
    return parsed.timestamp()


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"code": code, "message": message, "data": {"status": status}},
        status=status,
        headers=headers,
    )


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


class FakeWooCommerce:
    def __init__(
        self,
        consumer_key: str = "ck_fake0000000000000000000000000000000000",
        consumer_secret: str = "cs_fake0000000000000000000000000000000000",
        *,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
        site_offset_hours: int = -5,
    ) -> None:
        self.consumer_key = consumer_key
        self.consumer_secret = consumer_secret
        self.clock = clock
        self.site_zone = timezone(timedelta(hours=site_offset_hours))
        self.random = random.Random(seed)
        self.faults = WooFaults()
        self.read_only = False  # a key created with Read access only
        self.orders: dict[int, FakeOrder] = {}
        self._next_order = 700
        self._next_item = 300
        self._next_note = 2000
        # What happened, for the tests.
        self.requests = 0
        self.listings = 0
        self.auth_failures = 0
        self.note_posts = 0
        self.status_puts = 0
        self.dropped = 0
        self.errors = 0
        self.rate_limited = 0
        self.duplicated = 0
        self.seen_auth: set[str] = set()  # how clients authenticated: basic / query / oauth
        # WordPress's is_ssl(): False, as for a shop served over plain HTTP (the fake is); True
        # models TLS ended in front of a WordPress told so. Basic auth is only read when True.
        self.ssl = False
        self.used_nonces: set[str] = set()
        self.seen_queries: list[str] = []  # every request's query string, as received
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    # --- the shop's side (what its admin and its buyers do) -----------------------------------
    def add_order(
        self,
        items: Sequence[tuple[str, int]],
        *,
        status: str = "processing",
        email: str | None = None,
    ) -> int:
        """A new order with one line item per (sku, quantity); sku "" is a product without one
        (a physical good, say). Status processing = paid (WooCommerce's "payment received")."""
        now = self.clock()
        order_id = self._next_order
        self._next_order += 1
        lines = []
        for index, (sku, quantity) in enumerate(items):
            lines.append(
                FakeLine(
                    self._next_item,
                    f"Product {sku or 'without SKU'}",
                    90 + index,
                    sku,
                    quantity,
                )
            )
            self._next_item += 1
        self.orders[order_id] = FakeOrder(
            id=order_id,
            status=status,
            created=now,
            modified=now,
            email=email or f"buyer{order_id}@example.test",
            lines=lines,
            paid=now if status == "processing" else None,
        )
        return order_id

    def shop_set_status(self, order_id: int, status: str) -> None:
        """The shop changes an order's status itself (admin screen, payment gateway, refund)."""
        self._set_status(self.orders[order_id], status)

    def schedule_refund(self, order_id: int, after_touches: int) -> None:
        """The shop refunds the order just before the (after_touches + 1)-th request about it:
        a refund that lands somewhere in the middle of a delivery."""
        self.orders[order_id].refund_after_touches = after_touches

    def customer_notes(self, order_id: int) -> list[FakeNote]:
        """The notes the buyer was e-mailed, oldest first."""
        return [n for n in self.orders[order_id].notes if n.customer_note]

    def notes_naming(self, order_id: int, sku: str) -> int:
        """Customer notes the buyer reads as being about the line of `sku` (they name it)."""
        return sum(1 for n in self.customer_notes(order_id) if sku in n.note)

    def buyer_messages(self) -> int:
        return sum(len(self.customer_notes(oid)) for oid in self.orders)

    # --- server ---------------------------------------------------------------------------------
    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get(f"{API}/orders", self._list_orders)
        app.router.add_get(API + r"/orders/{id:\d+}", self._get_order)
        app.router.add_put(API + r"/orders/{id:\d+}", self._update_order)
        app.router.add_get(API + r"/orders/{id:\d+}/notes", self._list_notes)
        app.router.add_post(API + r"/orders/{id:\d+}/notes", self._create_note)
        app.router.add_get(API + r"/orders/{id:\d+}/notes/{note:\d+}", self._get_note)
        self._runner, self.base_url = await serve(app, access_log=None, shutdown_timeout=0.5)
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _authenticated(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        key = secret = None
        # WC_REST_Authentication::authenticate: Basic (header, or consumer_key/consumer_secret
        # in the query) only when WordPress believes the request is on TLS (is_ssl()); else,
        # and when Basic found no key, an OAuth 1.0a signature in the query.
        if self.ssl and request.query.get("consumer_key") and request.query.get("consumer_secret"):
            key = request.query["consumer_key"]
            secret = request.query["consumer_secret"]
            self.seen_auth.add("query")
        elif self.ssl and header.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            key, _, secret = decoded.partition(":")
            self.seen_auth.add("basic")
        elif any(name.startswith("oauth_") for name in request.query):
            return self._oauth_refusal(request)
        if key is None:
            self.auth_failures += 1
            return _error(401, "woocommerce_rest_cannot_view", "Sorry, you cannot list resources.")
        if key != self.consumer_key:
            self.auth_failures += 1
            return _error(401, "woocommerce_rest_authentication_error", "Consumer key is invalid.")
        if secret != self.consumer_secret:
            self.auth_failures += 1
            return _error(
                401, "woocommerce_rest_authentication_error", "Consumer secret is invalid."
            )
        if self.read_only and request.method != "GET":
            return _error(
                401,
                "woocommerce_rest_cannot_create",
                "Sorry, you are not allowed to create resources.",
            )
        return None

    def _oauth_refusal(self, request: web.Request) -> web.Response | None:
        """WC_REST_Authentication::perform_oauth_authentication, as its source reads."""
        self.seen_auth.add("oauth")
        params = dict(request.query)
        required = (
            "oauth_consumer_key",
            "oauth_timestamp",
            "oauth_nonce",
            "oauth_signature",
            "oauth_signature_method",
        )
        missing = [name for name in required if not params.get(name)]
        if missing:
            self.auth_failures += 1
            return _error(
                401,
                "woocommerce_rest_authentication_missing_parameter",
                f"Missing OAuth parameter(s) {', '.join(missing)}",
            )
        if params["oauth_consumer_key"] != self.consumer_key:
            self.auth_failures += 1
            return _error(401, "woocommerce_rest_authentication_error", "Consumer key is invalid.")
        given = params.pop("oauth_signature")
        method = params["oauth_signature_method"]
        if method not in ("HMAC-SHA1", "HMAC-SHA256"):
            self.auth_failures += 1
            return _error(
                401,
                "woocommerce_rest_authentication_error",
                "Invalid signature - signature method is invalid.",
            )

        def encode(text: str) -> str:  # PHP rawurlencode
            return quote(text, safe="~")

        # The store URL WordPress knows (scheme by is_ssl()) and the request path; every query
        # parameter but the signature, encoded, sorted, joined; key = consumer secret + "&".
        url = f"{'https' if self.ssl else 'http'}://{request.host}{request.path}"
        joined = "&".join(f"{encode(k)}={encode(v)}" for k, v in sorted(params.items()))
        base = f"{request.method.upper()}&{encode(url)}&{encode(joined)}"
        algorithm = hashlib.sha1 if method == "HMAC-SHA1" else hashlib.sha256
        digest = hmac.new(f"{self.consumer_secret}&".encode(), base.encode(), algorithm).digest()
        if not hmac.compare_digest(base64.b64encode(digest).decode(), given):
            self.auth_failures += 1
            return _error(
                401,
                "woocommerce_rest_authentication_error",
                "Invalid signature - provided signature does not match.",
            )
        try:
            stamp = int(params["oauth_timestamp"])
        except ValueError:
            stamp = 0
        if abs(stamp - self.clock()) > 15 * 60:
            self.auth_failures += 1
            return _error(401, "woocommerce_rest_authentication_error", "Invalid timestamp.")
        nonce = params["oauth_nonce"]
        if nonce in self.used_nonces:
            self.auth_failures += 1
            return _error(
                401,
                "woocommerce_rest_authentication_error",
                "Invalid nonce - nonce has already been used.",
            )
        self.used_nonces.add(nonce)
        if self.read_only and request.method != "GET":
            return _error(
                401,
                "woocommerce_rest_authentication_error",
                "The API key provided does not have write permissions.",
            )
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        self.seen_queries.append(request.query_string)
        if self.faults.latency:
            await asyncio.sleep(self.random.uniform(0, self.faults.latency))
        refused = self._authenticated(request)
        if refused is None and self.random.random() < self.faults.rate_limit_rate:
            self.rate_limited += 1
            refused = _error(429, "too_many_requests", "Too Many Requests", **{"Retry-After": "1"})
        if refused is None and self.random.random() < self.faults.error_rate:
            self.errors += 1
            refused = _error(503, "service_unavailable", "Service Unavailable")
        response: web.StreamResponse = refused or await handler(request)
        # The server's clock, as every HTTP server sends it (RFC 9110 Date).
        response.headers["Date"] = formatdate(self.clock(), usegmt=True)
        return response

    def _order_or_404(self, request: web.Request) -> FakeOrder | web.Response:
        order = self.orders.get(int(request.match_info["id"]))
        if order is None:
            return _error(404, "woocommerce_rest_shop_order_invalid_id", "Invalid ID.")
        order.touches += 1
        if order.refund_after_touches is not None and order.touches > order.refund_after_touches:
            order.refund_after_touches = None
            self._set_status(order, "refunded")
        return order

    def _lose_response(self, request: web.Request) -> web.Response:
        """The change is made, but the client never hears about it."""
        self.dropped += 1
        if request.transport is not None:
            request.transport.close()
        return _error(502, "bad_gateway", "response lost")

    def _set_status(self, order: FakeOrder, status: str) -> None:
        if status == order.status:
            return
        old = order.status
        now = self.clock()
        order.status = status
        order.modified = now
        if status == "processing" and order.paid is None:
            order.paid = now
        if status == "completed":
            order.completed = now
        # WooCommerce writes a private note on every status change.
        self._add_note(
            order,
            f"Order status changed from {old.title()} to {status.title()}.",
            customer=False,
        )

    def _add_note(self, order: FakeOrder, text: str, *, customer: bool) -> FakeNote:
        note = FakeNote(self._next_note, text, customer, self.clock())
        self._next_note += 1
        order.notes.append(note)
        return note

    # --- representations ------------------------------------------------------------------------
    def order_json(self, order: FakeOrder) -> dict[str, Any]:
        return {
            "id": order.id,
            "parent_id": 0,
            "number": str(order.id),
            "order_key": f"wc_order_{order.id:08x}",
            "created_via": "checkout",
            "version": "8.9.0",
            "status": order.status,
            "currency": "CNY",
            "date_created": _local(order.created, self.site_zone),
            "date_created_gmt": _gmt(order.created),
            "date_modified": _local(order.modified, self.site_zone),
            "date_modified_gmt": _gmt(order.modified),
            "total": f"{sum(float(i.price) * i.quantity for i in order.lines):.2f}",
            "customer_id": 0,
            "customer_note": "",
            "billing": {"first_name": "Buyer", "last_name": str(order.id), "email": order.email},
            "payment_method": "alipay",
            "date_paid": _local(order.paid, self.site_zone),
            "date_paid_gmt": _gmt(order.paid),
            "date_completed": _local(order.completed, self.site_zone),
            "date_completed_gmt": _gmt(order.completed),
            "meta_data": order.meta_data,
            "line_items": [
                {
                    "id": line.id,
                    "name": line.name,
                    "product_id": line.product_id,
                    "variation_id": 0,
                    "quantity": line.quantity,
                    "tax_class": "",
                    "subtotal": f"{float(line.price) * line.quantity:.2f}",
                    "total": f"{float(line.price) * line.quantity:.2f}",
                    "taxes": [],
                    "meta_data": [],
                    "sku": line.sku,
                    "price": float(line.price),
                }
                for line in order.lines
            ],
            "shipping_lines": [],
            "fee_lines": [],
            "coupon_lines": [],
            "refunds": [],
        }

    def note_json(self, order: FakeOrder, note: FakeNote) -> dict[str, Any]:
        return {
            "id": note.id,
            "author": note.author,
            "date_created": _local(note.created, self.site_zone),
            "date_created_gmt": _gmt(note.created),
            "note": note.note,
            "customer_note": note.customer_note,
            "_links": {"up": [{"href": f"{API}/orders/{order.id}"}]},
        }

    # --- routes ---------------------------------------------------------------------------------
    async def _list_orders(self, request: web.Request) -> web.Response:
        self.listings += 1
        query = request.query
        try:
            page = int(query.get("page", "1"))
            per_page = int(query.get("per_page", "10"))
        except ValueError:
            return _error(400, "rest_invalid_param", "Invalid parameter(s): page, per_page")
        if page < 1 or not 1 <= per_page <= MAX_PER_PAGE:
            return _error(400, "rest_invalid_param", "Invalid parameter(s): page, per_page")
        orderby = query.get("orderby", "date")
        order = query.get("order", "desc")
        if orderby not in ORDERBY or order not in ("asc", "desc"):
            return _error(400, "rest_invalid_param", "Invalid parameter(s): orderby, order")
        statuses = [s for s in query.get("status", "any").split(",") if s]
        if any(s not in (*STATUSES, "any", "trash") for s in statuses):
            return _error(400, "rest_invalid_param", "Invalid parameter(s): status")
        gmt = _truthy(query.get("dates_are_gmt"))
        after: float | None = None
        if "modified_after" in query:
            try:
                after = _parse_date(query["modified_after"], gmt, self.site_zone)
            except ValueError:
                return _error(400, "rest_invalid_param", "Invalid parameter(s): modified_after")
        found = [
            o
            for o in self.orders.values()
            if ("any" in statuses and o.status != "trash") or o.status in statuses
        ]
        if after is not None:
            # WordPress date_query "after" is exclusive, and dates are whole seconds.
            found = [o for o in found if int(o.modified) > after]
        if orderby == "date":
            found.sort(key=lambda o: (int(o.created), o.id), reverse=order == "desc")
        else:
            found.sort(key=lambda o: o.id, reverse=order == "desc")
        total = len(found)
        pages = -(-total // per_page)
        chunk = found[(page - 1) * per_page : page * per_page]
        body = [self.order_json(o) for o in chunk]
        if body and self.random.random() < self.faults.duplicate_rate:
            self.duplicated += 1
            body.insert(self.random.randrange(len(body) + 1), self.random.choice(body))
        return web.json_response(
            body, headers={"X-WP-Total": str(total), "X-WP-TotalPages": str(pages)}
        )

    async def _get_order(self, request: web.Request) -> web.Response:
        order = self._order_or_404(request)
        if isinstance(order, web.Response):
            return order
        return web.json_response(self.order_json(order))

    async def _update_order(self, request: web.Request) -> web.Response:
        order = self._order_or_404(request)
        if isinstance(order, web.Response):
            return order
        try:
            payload = json.loads(await request.read())
        except ValueError:
            return _error(400, "rest_invalid_json", "Invalid JSON body passed.")
        status = payload.get("status") if isinstance(payload, dict) else None
        if status is not None:
            if status not in STATUSES:
                return _error(400, "rest_invalid_param", "Invalid parameter(s): status")
            self.status_puts += 1
            # WooCommerce sets what it is told: a refunded order can be made completed again.
            self._set_status(order, status)
        for entry in payload.get("meta_data", []) if isinstance(payload, dict) else []:
            order.meta_data.append({"id": len(order.meta_data) + 1, **entry})
        if self.random.random() < self.faults.drop_after_commit_rate:
            return self._lose_response(request)
        return web.json_response(self.order_json(order))

    async def _list_notes(self, request: web.Request) -> web.Response:
        order = self._order_or_404(request)
        if isinstance(order, web.Response):
            return order
        kind = request.query.get("type", "any")
        notes = [n for n in order.notes if kind == "any" or (kind == "customer") == n.customer_note]
        # Every note, newest first: the notes list has no paging.
        return web.json_response([self.note_json(order, n) for n in reversed(notes)])

    async def _get_note(self, request: web.Request) -> web.Response:
        order = self._order_or_404(request)
        if isinstance(order, web.Response):
            return order
        wanted = int(request.match_info["note"])
        for note in order.notes:
            if note.id == wanted:
                return web.json_response(self.note_json(order, note))
        return _error(404, "woocommerce_rest_invalid_id", "Invalid resource ID.")

    async def _create_note(self, request: web.Request) -> web.Response:
        order = self._order_or_404(request)
        if isinstance(order, web.Response):
            return order
        try:
            payload = json.loads(await request.read())
        except ValueError:
            return _error(400, "rest_invalid_json", "Invalid JSON body passed.")
        if not isinstance(payload, dict) or not isinstance(payload.get("note"), str):
            return _error(400, "rest_missing_callback_param", "Missing parameter(s): note")
        self.note_posts += 1
        # Appended every time, whatever the order's status: notes are never deduplicated.
        note = self._add_note(order, payload["note"], customer=bool(payload.get("customer_note")))
        if self.random.random() < self.faults.drop_after_commit_rate:
            return self._lose_response(request)
        return web.json_response(self.note_json(order, note), status=201)
