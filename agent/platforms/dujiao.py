"""kami-agent as a dujiao-next shop's upstream supplier (docs/platforms/dujiao-next.md): a
responder.

The shop (dujiao-next, "site A") buys from us ("site B") through the site-integration API:
it calls `/api/v1/upstream/{ping, products, products/:id, orders, orders/:id,
orders/:id/cancel}` on the listener with `Dujiao-Next-Api-Key/-Timestamp/-Signature`
(hex HMAC-SHA256 of METHOD, PATH, timestamp and the body's MD5; +-60 s), which is checked
before the body is parsed (the key and the timestamp before it is even read).

- products: the configured products, each with one SKU, the stock the agent can fill (what
  the stock sync last published for this shop, else the free keys);
- POST orders: idempotent on `downstream_order_no` (a repeat gets the stored reply, byte for
  byte); the keys are bound in the transaction that takes the order, the line handed over
  at once (`provided`), and the callback owed stored with it;
- the callback goes to `callback_url` from the outbox with retries (signed the same way,
  only to the shop's own origin `base_url`, never following a redirect), and the line is
  `delivered` once the shop acknowledges it, or once the shop read the order's keys
  (GET orders/:id, the shop's polling);
- cancel: refused (409 cancel_not_allowed) once keys are handed over, which is at once.

There is nothing to poll: `list_paid` returns empty pages.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlparse

import aiohttp

from agent.config import PlatformSettings, Section
from agent.domain import (
    CardItem,
    LineState,
    OrderPage,
    Permanent,
    RemoteDelivery,
    StockNotOffered,
    retry_delay,
)
from agent.listener_routes import (
    Inbound,
    Job,
    ListenerContext,
    Mount,
    Outbound,
    Route,
    SignedHeadersAuth,
    hmac_sha256_hex,
)
from agent.logs import get_logger
from agent.platforms import dujiao_wire as wire
from agent.redact import register, safe_url
from agent.signed_http import read_capped
from agent.store.ledger.responder import CallbackItem, Handed, Want

log = get_logger("kami.dujiao")

UPSTREAM = "/api/v1/upstream"
CALLBACK_BATCH = 20
CALLBACK_TIMEOUT = 10.0
CALLBACK_MAX_ATTEMPTS = 12  # backoff 5 s doubling to 30 min: the last try about 3 h after
CALLBACK_REPLY_CAP = 64 * 1024
DEFAULT_CALLBACK_INTERVAL = 2.0
DEFAULT_CALLBACK_RETRY = 5.0


@dataclass(frozen=True, slots=True)
class DujiaoOptions:
    """`[platforms.<name>]` keys only dujiao-next has. `base_url` is the shop's own site
    (callbacks go there only), `api_key` the key the shop sends, `secret` names the secret
    both sides sign with (agent.config reads those)."""

    products: Mapping[int, wire.Product]
    currency: str = "CNY"
    site_name: str = "kami-agent"
    balance: str = "0.00"
    path_prefix: str = ""  # this shop's routes on the listener: <prefix>/api/v1/upstream/...
    callback_interval: float = DEFAULT_CALLBACK_INTERVAL
    callback_retry: float = DEFAULT_CALLBACK_RETRY  # the first wait after a failed callback
    by_sku: Mapping[str, wire.Product] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_sku", {p.sku: p for p in self.products.values()})


def parse_options(section: Section) -> DujiaoOptions:
    """products = { "<id>" = { sku = "<SKU>", price = "9.90", title = "..." } }, currency,
    site_name, balance, path_prefix, callback_interval, callback_retry."""
    _ = section._
    products: dict[int, wire.Product] = {}
    for key, entry in section.table("products").items():
        where = f"products.{key}"
        if not key.isdigit() or not 0 < int(key) < 2**31:
            raise section.error(where, _("a product id must be a whole number (the shop's sku_id)"))
        if not isinstance(entry, dict) or set(entry) - {"sku", "price", "title"}:
            raise section.error(
                where, _('must be { sku = "<SKU>", price = "9.90", title = "..." }')
            )
        sku, price, title = (
            entry.get("sku"),
            entry.get("price"),
            entry.get("title", entry.get("sku")),
        )
        if not isinstance(sku, str) or not sku.strip() or len(sku) > 128:
            raise section.error(
                f"{where}.sku", _("must name a SKU, got %(value)r") % {"value": sku}
            )
        try:
            amount = Decimal(str(price))
        except InvalidOperation:
            amount = Decimal(-1)
        if isinstance(price, bool) or not amount.is_finite() or amount < 0:
            raise section.error(
                f"{where}.price",
                _('must be an amount like "9.90", got %(value)r') % {"value": price},
            )
        if not isinstance(title, str) or not title.strip():
            raise section.error(f"{where}.title", _("must be a text"))
        if any(p.sku == sku for p in products.values()):
            raise section.error(
                f"{where}.sku", _("SKU %(sku)r is already another product") % {"sku": sku}
            )
        products[int(key)] = wire.Product(int(key), sku, amount, title)
    if not products:
        raise section.error(
            "products",
            _('is required: { "1" = { sku = "<SKU>", price = "9.90", title = "..." } }'),
        )
    prefix = section.string("path_prefix", "/").rstrip("/")
    if prefix and (not prefix.startswith("/") or "?" in prefix or "{" in prefix):
        raise section.error(
            "path_prefix", _("must be a path starting with /, got %(value)r") % {"value": prefix}
        )
    balance = section.string("balance", "0.00")
    return DujiaoOptions(
        products=products,
        currency=section.string("currency", "CNY"),
        site_name=section.string("site_name", "kami-agent"),
        balance=balance,
        path_prefix=prefix,
        callback_interval=section.number(
            "callback_interval",
            DEFAULT_CALLBACK_INTERVAL,
            minimum=0.05,
            maximum=3600,
            unit="seconds",
        ),
        callback_retry=section.number(
            "callback_retry", DEFAULT_CALLBACK_RETRY, minimum=0.05, maximum=3600, unit="seconds"
        ),
    )


def build(settings: PlatformSettings, secret: str, max_connections: int) -> DujiaoPlatform:
    options = settings.options
    assert isinstance(options, DujiaoOptions)
    return DujiaoPlatform(settings, options, secret)


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = urlparse(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    return parsed.scheme, (parsed.hostname or "").lower(), port


class DujiaoPlatform:
    def __init__(self, settings: PlatformSettings, options: DujiaoOptions, secret: str) -> None:
        self.name = settings.name
        self.options = options
        self.api_key = settings.api_key
        self.shop_url = settings.base_url
        register(secret)
        self.secret = secret
        self.timeout = settings.timeout
        self.published: dict[str, int] = {}  # SKU -> what the stock sync last published here
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the secret
        return f"DujiaoPlatform({self.name})"

    # --- the Platform port: the shop calls us ----------------------------------------------
    async def list_paid(self, cursor: str | None) -> OrderPage:
        """Always empty: the shop's orders arrive at the listener (POST orders)."""
        return OrderPage(orders=[], next_cursor=cursor, has_more=False)

    async def wait_for_orders(self, cursor: str | None, wait_seconds: float) -> OrderPage:
        """The shop offers no long poll: it calls us."""
        raise Permanent("a dujiao-next shop calls the listener; there is nothing to poll")

    async def get_order(self, order_id: str) -> RemoteDelivery:
        """The shop keeps no order of ours to read back."""
        raise Permanent("a dujiao-next shop has no API for its supplier to read")

    async def deliver(
        self, order_id: str, idempotency_key: str, items: Sequence[CardItem], message: str
    ) -> None:
        """Never called: keys go out in the callback and the shop's polling."""
        raise Permanent("dujiao-next orders are handed over by the listener")

    async def notice(self, order_id: str, message: str, idempotency_key: str | None = None) -> None:
        """No buyer messages through a supplier."""
        raise Permanent("a dujiao-next shop takes no buyer messages from its supplier")

    async def refund(self, order_id: str, idempotency_key: str, reason: str) -> None:
        """The shop refunds its buyer itself."""
        raise Permanent("a dujiao-next shop refunds its buyers itself")

    async def ping(self) -> None:
        """Nothing to call: the shop calls us."""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- StockPublisher: what the products endpoint shows -----------------------------------
    async def publish_stock(self, sku: str, available: int) -> None:
        """Kept for the products endpoint (the shop reads it there, there is no push)."""
        if sku not in self.options.by_sku:
            raise StockNotOffered(f"no product of {self.name} sells {sku}", sku=sku)
        self.published[sku] = max(0, available)

    # --- callbacks -------------------------------------------------------------------------
    def callback_allowed(self, url: str) -> bool:
        """Only to the shop's own site (scheme, host and port of base_url): nothing else is
        ever called on a caller's word."""
        if not url:
            return False
        return _origin(url) == _origin(self.shop_url) and urlparse(url).username is None

    async def send_callback(self, url: str, body: bytes) -> str | None:
        """POSTs a signed callback; None when the shop acknowledged it, else why not."""
        if not self.callback_allowed(url):
            return "callback_url is not on the shop's site"
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        stamp = str(int(time.time()))
        # Signed over the fixed callback path, not the URL's: the shop's receiver verifies
        # that path (HandleCallback), as dujiao-next's own sender signs it (SendCallback), so a
        # shop under a sub-path or behind a proxy's prefix still accepts it.
        signed = wire.CALLBACK_PATH
        headers = {
            wire.HEADERS[0]: self.api_key,
            wire.HEADERS[1]: stamp,
            wire.HEADERS[2]: hmac_sha256_hex(self.secret, "POST", signed, stamp, body),
            "Content-Type": "application/json",
        }
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                answer = await read_capped(resp, CALLBACK_REPLY_CAP)
                if resp.status == 200 and wire.acknowledged(answer):
                    return None
                return f"the shop answered HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"no answer from {safe_url(url)}: {type(exc).__name__}"
        except Exception as exc:  # a broken answer (too big): try again later
            return f"unusable answer: {type(exc).__name__}"


def _refused(reason: str) -> Outbound:
    status = 401
    return Outbound(status, wire.error(reason, "authentication failed"), outcome="refused")


def _fail(status: int, code: str, message: str, order_id: str | None = None) -> Outbound:
    return Outbound(status, wire.error(code, message), order_id=order_id, outcome="refused")


class DujiaoResponder:
    def __init__(self, platform: DujiaoPlatform, context: ListenerContext) -> None:
        self.platform = platform
        self.options = platform.options
        self.name = platform.name
        self.store = context.store
        self.clock = context.clock
        self.started = self.clock()

    # --- routes -----------------------------------------------------------------------------
    async def ping(self, inbound: Inbound) -> Outbound:
        o = self.options
        body = wire.encode(
            {
                "ok": True,
                "site_name": o.site_name,
                "protocol_version": wire.PROTOCOL_VERSION,
                "user_id": 1,
                "balance": o.balance,
                "currency": o.currency,
                "member_level": None,
            }
        )
        return Outbound(200, body, action="ping")

    async def _available(self) -> dict[str, int]:
        free: dict[str, int] = await self.store.free_counts()
        return {
            sku: self.platform.published.get(sku, free.get(sku, 0)) for sku in self.options.by_sku
        }

    async def products(self, inbound: Inbound) -> Outbound:
        page = _whole(inbound.query.get("page"), 1, 1, 1_000_000)
        size = _whole(inbound.query.get("page_size"), 20, 1, 100)
        available = await self._available()
        ordered = sorted(self.options.products.values(), key=lambda p: p.id)
        chosen = ordered[(page - 1) * size : page * size]
        items = [
            wire.product(p, available[p.sku], self.options.currency, self.started) for p in chosen
        ]
        body = wire.encode(
            {"ok": True, "items": items, "total": len(ordered), "page": page, "page_size": size}
        )
        return Outbound(200, body, action="products")

    async def product(self, inbound: Inbound) -> Outbound:
        p = self._product(inbound.params["id"])
        if p is None:
            return _fail(404, "product_not_found", "product not found")
        available = await self._available()
        item = wire.product(p, available[p.sku], self.options.currency, self.started)
        return Outbound(200, wire.encode({"ok": True, "product": item}), action="product")

    def _product(self, raw: str) -> wire.Product | None:
        return self.options.products.get(int(raw)) if raw.isdigit() and len(raw) < 12 else None

    async def order(self, inbound: Inbound) -> Outbound:
        try:
            req = wire.parse_order(inbound.body)
        except wire.WireError as exc:
            return _fail(400, "bad_request", str(exc))
        number = req.downstream_order_no
        stored = self.store.cached_reply(self.name, number, "ORDER")
        if stored is not None:
            return Outbound(
                stored.status, stored.body, order_id=number, action="order", outcome="replayed"
            )
        p = self.options.products.get(req.sku_id)
        if p is None:
            return _fail(400, "sku_unavailable", "sku not found", number)
        if req.callback_url and not self.platform.callback_allowed(req.callback_url):
            return _fail(
                400, "invalid_callback_url", "callback_url must be on the shop's site", number
            )
        amount = wire.money(p.price * req.quantity)
        currency = self.options.currency
        now = self.clock()

        def render(handed: Handed | None) -> tuple[int, bytes]:
            if handed is None:
                return 409, wire.error("insufficient_stock", "product stock is insufficient")
            return 200, wire.created(handed.line.id, amount, currency)

        def callback_body(handed: Handed) -> bytes:
            return wire.callback(handed.line.id, number, handed.items, now)

        callback = (req.callback_url, callback_body) if req.callback_url else None
        reply = await self.store.place_order(
            self.name, number, Want(p.sku, req.quantity, amount, currency), now, render, callback
        )
        outcome = (
            "replayed" if reply.replayed else ("refused" if reply.status != 200 else "answered")
        )
        return Outbound(reply.status, reply.body, order_id=number, action="order", outcome=outcome)

    async def order_status(self, inbound: Inbound) -> Outbound:
        handed = await self._handed(inbound.params["id"])
        if handed is None:
            return _fail(404, "order_not_found", "order not found")
        line = handed.line
        p = self.options.by_sku.get(line.sku)
        if p is None:
            return _fail(404, "order_not_found", "order not found")
        status = _status(line.state)
        amount = await self._amount(line, p)
        at = line.delivered_at or line.seen_at
        body = wire.order_detail(
            line.id, status, p, line.quantity, amount, self.options.currency, handed.items, at
        )
        if line.state == LineState.PROVIDED:
            # The shop has read the keys: handed over, whatever becomes of the callback.
            await self.store.handed_over(line.id, "the shop read the order's keys", self.clock())
        return Outbound(200, body, order_id=line.order_id, action="order_status")

    async def cancel(self, inbound: Inbound) -> Outbound:
        handed = await self._handed(inbound.params["id"])
        if handed is None:
            return _fail(404, "order_not_found", "order not found")
        # Keys are handed over when the order is taken: nothing is left to cancel.
        return _fail(
            409,
            "cancel_not_allowed",
            "order cannot be canceled in current status",
            handed.line.order_id,
        )

    async def _handed(self, raw: str) -> Handed | None:
        if not raw.isdigit() or len(raw) > 18:
            return None
        handed: Handed | None = await self.store.handed_line(self.name, int(raw))
        return handed

    @staticmethod
    async def _amount(line: Any, p: wire.Product) -> str:
        return wire.money(p.price * line.quantity)

    # --- the callback outbox ------------------------------------------------------------
    async def drain_callbacks(self) -> int:
        sent = 0
        for item in await self.store.due_callbacks(self.name, self.clock(), CALLBACK_BATCH):
            sent += await self._send(item)
        return sent

    async def _send(self, item: CallbackItem) -> int:
        error = await self.platform.send_callback(item.url, item.body)
        now = self.clock()
        if error is None:
            await self.store.callback_done(item, now)
            log.info("dujiao_callback_sent", platform=self.name, line=item.line_id)
            return 1
        attempts = item.attempts + 1
        retry_at = (
            None
            if attempts >= CALLBACK_MAX_ATTEMPTS
            else now + retry_delay(attempts, self.options.callback_retry, 1800.0)
        )
        await self.store.callback_done(item, now, error=error, retry_at=retry_at)
        log.warning(
            "dujiao_callback_failed",
            platform=self.name,
            line=item.line_id,
            attempt=attempts,
            error=error,
            given_up=retry_at is None,
        )
        return 0


def _status(state: LineState) -> str:
    """Our line's state as a dujiao-next order status (section 6)."""
    if state in (LineState.PROVIDED, LineState.DELIVERED):
        return "delivered"
    if state in (LineState.CANCELLED, LineState.REFUNDED):
        return "canceled"
    return "paid"


def _whole(raw: str | None, default: int, low: int, high: int) -> int:
    if raw is None or not raw.isdigit() or len(raw) > 9:
        return default
    return max(low, min(high, int(raw)))


def listener_routes(platform: DujiaoPlatform, context: ListenerContext) -> Mount:
    """The upstream API at <path_prefix>/api/v1/upstream/..., every route signed with the
    shop's key and secret; and the callback outbox's drainer."""
    responder = DujiaoResponder(platform, context)
    prefix = platform.options.path_prefix
    auth = SignedHeadersAuth(
        platform.api_key, platform.secret, wire.HEADERS, wire.MAX_SKEW, _refused, strip=prefix
    )
    base = f"{prefix}{UPSTREAM}"

    def route(method: str, path: str, handler: Any) -> Route:
        return Route(platform.name, method, base + path, auth, handler)

    return Mount(
        routes=[
            route("POST", "/ping", responder.ping),
            route("GET", "/products", responder.products),
            route("GET", "/products/{id}", responder.product),
            route("POST", "/orders", responder.order),
            route("GET", "/orders/{id}", responder.order_status),
            route("POST", "/orders/{id}/cancel", responder.cancel),
        ],
        jobs=[
            Job(
                f"{platform.name}:callbacks",
                platform.options.callback_interval,
                responder.drain_callbacks,
            )
        ],
    )
