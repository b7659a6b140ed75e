"""Adapter for a WooCommerce shop's REST API (wc/v3); see docs/platforms/woocommerce.md.

Intake lists `processing` orders (paid, not yet fulfilled); each line item with a SKU is one
order line of ours, `<order id>/<line item id>`. Delivery is a customer note carrying the keys
and a marker derived from the idempotency key (WooCommerce e-mails it to the buyer), then, once
every line item of the order has its note, the order is set `completed`.

Nothing WooCommerce offers is idempotent: every note POSTed is another e-mail to the buyer. So
every delivery reads the order's notes first and sends only when its marker is not there; an
order the shop closed meanwhile is reported closed, not delivered.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import aiohttp
from aiohttp import hdrs
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential
from yarl import URL

from agent import safejson
from agent.config import PlatformSettings, Section
from agent.domain import (
    AgentError,
    Ambiguous,
    AuthFailed,
    BadResponse,
    CardItem,
    OrderClosed,
    OrderPage,
    Permanent,
    RemoteDelivery,
    Transient,
)
from agent.logs import get_logger
from agent.platforms.woocommerce_auth import oauth_params, query_string
from agent.platforms.woocommerce_listing import (
    ListingPass,
    bound_from_date,
    order_lines,
    split_line_id,
)
from agent.platforms.woocommerce_notes import (
    NoteView,
    delivered_items,
    deliveries_for,
    delivery_ref,
    note_text,
    unsendable,
)
from agent.redact import register
from agent.signed_http import (
    DEFAULT_CONNECTIONS,
    Redirected,
    TransportErrors,
    parse_retry_after,
    raise_for_answer,
    read_capped,
    redirect_refusal,
)

log = get_logger("kami.woocommerce")

API = "/wp-json/wc/v3"
MAX_PER_PAGE = 100  # WooCommerce's own limit (per_page maximum 100)
_JSON = json.JSONEncoder(ensure_ascii=False)
# Statuses of an order the shop has closed, as the engine names them. `completed` without our
# note means the shop fulfilled it some other way (or by mistake): delivering now would be a
# second fulfilment, so the line is closed as cancelled, with the reason saying so.
_CLOSED = {"cancelled": "cancelled", "failed": "cancelled", "trash": "cancelled"}


@dataclass(frozen=True, slots=True)
class WooCommerceOptions:
    """The `[platforms.<name>]` keys only the woocommerce kind has."""

    # Seconds the next pass's modified_after stays behind the shop's clock: covers a Date header
    # written by another machine than the one stamping orders (a proxy in front of the shop).
    listing_margin: float = 60.0
    # Set the order `completed` once every line item has its note (WooCommerce then e-mails its
    # "order complete" message). Off: the shop completes orders itself.
    complete_orders: bool = True


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_options(section: Section) -> WooCommerceOptions:
    """Reads the woocommerce keys and refuses settings WooCommerce cannot honour."""
    _ = section._
    url = urlparse(str(section.data.get("base_url", "")))
    if url.scheme == "http" and not _loopback(url.hostname or ""):
        # Basic auth sends the consumer secret with every request: over plain HTTP anyone on
        # the way reads it (WooCommerce itself accepts Basic auth over HTTPS only).
        raise section.error(
            "base_url", _("must be https:// (the consumer secret would travel in clear text)")
        )
    if section.data.get("long_poll") is True:
        raise section.error("long_poll", _("WooCommerce has no long poll; remove it"))
    page_size = section.data.get("page_size")
    if isinstance(page_size, int) and page_size > MAX_PER_PAGE:
        raise section.error(
            "page_size",
            _("WooCommerce serves at most %(n)d orders per page") % {"n": MAX_PER_PAGE},
        )
    return WooCommerceOptions(
        listing_margin=section.number("listing_margin", 60.0, minimum=1.0, maximum=86400.0),
        complete_orders=section.boolean("complete_orders", True),
    )


def build(settings: PlatformSettings, secret: str, max_connections: int) -> WooCommercePlatform:
    """An adapter for one WooCommerce shop (no I/O until the first call)."""
    return WooCommercePlatform(settings, secret, max_connections)


# --- the HTTP client --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WooResponse:
    status: int
    body: bytes
    retry_after: float | None
    total_pages: int | None  # X-WP-TotalPages
    date: str | None  # the shop's clock (Date header)

    def json(self) -> Any:
        """The body's JSON value, read by the bounded decoder (agent/safejson.py)."""
        try:
            return safejson.loads(self.body)
        except safejson.JsonError as exc:
            raise BadResponse(f"malformed JSON in HTTP {self.status} response: {exc}") from None

    def error_text(self) -> str:
        """`code: message` of WordPress's error body, shortened, for reasons and logs."""
        try:
            body = safejson.loads(self.body)
            text = f"{body.get('code', '?')}: {body.get('message', '')}"
        except (safejson.JsonError, AttributeError):
            text = "unparseable error body"
        return f"HTTP {self.status} {text[:200]}"


def _total_pages(value: str | None) -> int | None:
    try:
        return max(0, int(value)) if value is not None else None
    except ValueError:
        return None


class WooClient:
    """Basic-auth JSON client (plus an OAuth 1.0a signature in the query over plain HTTP, which
    names the consumer key but never the secret). Never follows a redirect (it would carry the
    credentials and the keys elsewhere), caps every body, never logs a URL or a credential."""

    def __init__(
        self,
        base_url: str,
        consumer_key: str,
        consumer_secret: str,
        timeout: float,
        max_connections: int,
    ) -> None:
        self._base = URL(base_url)
        self._base_text = str(self._base).rstrip("/")
        token = base64.b64encode(f"{consumer_key}:{consumer_secret}".encode()).decode()
        self._consumer_key = consumer_key
        self._consumer_secret = consumer_secret
        # Only a loopback shop may be plain HTTP (parse_options refuses any other).
        self._sign = self._base.scheme == "http"
        self._authorization = f"Basic {token}"
        register(consumer_secret, token)  # masked wherever a text might show them
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"WooClient({self._base_text})"

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=connector, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        payload: Any = None,
    ) -> WooResponse:
        """Transient when the request surely did not reach the shop, else Ambiguous;
        Redirected (Permanent) for a 3xx answer."""
        endpoint = f"{self._base_text}{API}{path}"
        query = {k: str(v) for k, v in (params or {}).items()}
        if self._sign:
            # Plain HTTP: WooCommerce ignores Basic unless WordPress believes it is on TLS, and
            # checks an OAuth 1.0a signature instead (see woocommerce_auth). The Basic header
            # stays for a loopback shop that WordPress is told is on TLS (a proxy in front).
            query.update(
                oauth_params(method, endpoint, query, self._consumer_key, self._consumer_secret)
            )
        url = URL(f"{endpoint}?{query_string(query)}" if query else endpoint, encoded=True)
        headers = {hdrs.AUTHORIZATION: self._authorization, hdrs.ACCEPT: "application/json"}
        body = None
        if payload is not None:
            body = _JSON.encode(payload).encode()
            headers[hdrs.CONTENT_TYPE] = "application/json"
        with TransportErrors(self._base.host, method, path):
            async with self._session_or_new().request(
                method, url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                if 300 <= resp.status < 400:
                    raise Redirected(redirect_refusal(resp, f"the shop ({method} {path})"))
                data = await read_capped(resp)
                return WooResponse(
                    resp.status,
                    data,
                    parse_retry_after(resp.headers.get(hdrs.RETRY_AFTER)),
                    _total_pages(resp.headers.get("X-WP-TotalPages")),
                    resp.headers.get(hdrs.DATE),
                )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _raise_for_status(resp: WooResponse, what: str, *, changes: bool) -> None:
    """Maps a WooCommerce answer to the error class the engine acts on. `changes`: the request
    writes (a note, a status), so a 5xx may come after the write was made."""
    if resp.status >= 300:
        text = resp.error_text()
        raise_for_answer(
            resp.status,
            text,
            resp.retry_after,
            "the shop",
            what,
            unknown_outcome=changes,
            credentials="our consumer key",
        )


def _worth_retrying_now(exc: BaseException) -> bool:
    # A read has no side effect: an ambiguous read is a failed read. A 429 asks us to wait
    # longer than an in-call retry would; bad credentials will not fix themselves in seconds.
    return (
        isinstance(exc, Transient | Ambiguous)
        and not isinstance(exc, AuthFailed)
        and not (isinstance(exc, Transient) and exc.retry_after)
    )


def _retrying() -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception(_worth_retrying_now),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.2, max=2),
        reraise=True,
    )


# --- the order as the adapter reads it ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Item:
    id: int
    sku: str
    quantity: int


@dataclass(frozen=True, slots=True)
class _Order:
    id: int
    status: str
    items: tuple[_Item, ...]

    def item(self, item_id: int) -> _Item | None:
        return next((i for i in self.items if i.id == item_id), None)

    @property
    def all_ours(self) -> bool:
        """Every line item has a SKU: nothing in the order is left for the shop to send."""
        return all(i.sku for i in self.items)


def _parse_order(body: Any, order_id: int) -> _Order:
    if not isinstance(body, dict) or not isinstance(body.get("status"), str):
        raise BadResponse(f"order {order_id}: no status in the answer")
    items = []
    for raw in body.get("line_items") or []:
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), int):
            raise BadResponse(f"order {order_id}: a line item without an id")
        sku = raw.get("sku")
        quantity = raw.get("quantity")
        items.append(
            _Item(
                raw["id"],
                sku if isinstance(sku, str) else "",
                quantity if isinstance(quantity, int) else 0,
            )
        )
    return _Order(order_id, body["status"], tuple(items))


def _parse_notes(body: Any, order_id: int) -> list[NoteView]:
    if not isinstance(body, list):
        raise BadResponse(f"order {order_id}: the notes answer is not a list")
    notes = []
    for raw in body:
        if isinstance(raw, dict) and isinstance(raw.get("id"), int):
            text = raw.get("note")
            notes.append(
                NoteView(
                    raw["id"],
                    text if isinstance(text, str) else "",
                    raw.get("customer_note") is True,
                )
            )
    return notes


def _line_id(order_id: str) -> tuple[int, int]:
    try:
        return split_line_id(order_id)
    except ValueError as exc:
        raise Permanent(str(exc)) from None


class WooCommercePlatform:
    def __init__(
        self, settings: PlatformSettings, secret: str, max_connections: int = DEFAULT_CONNECTIONS
    ) -> None:
        """`secret`: the consumer secret; `settings.api_key`: the consumer key."""
        self.name = settings.name
        options = settings.options
        self._options = options if isinstance(options, WooCommerceOptions) else WooCommerceOptions()
        self._page_size = min(settings.page_size, MAX_PER_PAGE)
        self._client = WooClient(
            settings.base_url, settings.api_key, secret, settings.timeout, max_connections
        )

    # --- reads (no side effect: retried within the call) ------------------------------------
    async def _read(
        self, path: str, what: str, params: Mapping[str, str | int] | None = None
    ) -> WooResponse:
        async for attempt in _retrying():
            with attempt:
                resp = await self._client.request("GET", path, params=params)
                if resp.status == 404:
                    raise Permanent(f"the shop has no {what}: {resp.error_text()}")
                _raise_for_status(resp, what, changes=False)
                return resp
        raise AssertionError("unreachable: tenacity reraises")

    async def _order(self, order_id: int) -> _Order:
        resp = await self._read(f"/orders/{order_id}", f"order {order_id}")
        return _parse_order(resp.json(), order_id)

    async def _notes(self, order_id: int) -> list[NoteView]:
        resp = await self._read(f"/orders/{order_id}/notes", f"notes of order {order_id}")
        return _parse_notes(resp.json(), order_id)

    # --- the Platform port -----------------------------------------------------------------
    async def list_paid(self, cursor: str | None) -> OrderPage:
        """One page of a listing pass over processing orders (see woocommerce_listing)."""
        current = ListingPass.decode(cursor)
        params: dict[str, str | int] = {
            "status": "processing",
            "orderby": "id",
            "order": "asc",
            "per_page": self._page_size,
            "page": current.page,
            "dates_are_gmt": "true",
        }
        if current.modified_after:
            params["modified_after"] = current.modified_after
        resp = await self._read("/orders", "order listing", params)
        body = resp.json()
        if not isinstance(body, list):
            raise BadResponse("order listing: the answer is not a list")
        following = current.following
        if current.next_page == 0:  # a pass's first page: the shop's clock as it began
            following = bound_from_date(resp.date, self._options.listing_margin)
            if following is None:
                log.warning("woocommerce_no_date_header", platform=self.name)
                following = current.modified_after
        total_pages = resp.total_pages
        if total_pages is None:  # no header: a full page may have a next one
            total_pages = current.page + 1 if len(body) >= self._page_size else current.page
        after, has_more = current.after(total_pages, following)
        parsed = order_lines(body)
        if parsed.without_sku:
            # A product without a SKU (a physical good, a service) is the shop's to fulfil.
            log.info("woocommerce_items_without_sku", platform=self.name, count=parsed.without_sku)
        return OrderPage(parsed.lines, after.encode(), has_more, parsed.unidentifiable)

    async def wait_for_orders(self, cursor: str | None, wait_seconds: float) -> OrderPage:
        """WooCommerce has no long poll: always Permanent."""
        raise Permanent("WooCommerce offers no long poll; orders are listed every poll_interval")

    async def get_order(self, order_id: str) -> RemoteDelivery:
        """`delivered` with the keys read back from our note when the line has one (and the
        order completed if that was left undone), else the order's status as the engine names
        it: `paid` (processing), `refunded`, `cancelled` (also: completed without our note)."""
        shop_order, item_id = _line_id(order_id)
        order = await self._order(shop_order)
        notes = await self._notes(shop_order)
        found = deliveries_for(notes, item_id)
        if found:
            await self._complete_quietly(order, notes)
            return RemoteDelivery("delivered", found[0].items or ())
        if order.status == "processing":
            return RemoteDelivery("paid")
        if order.status == "refunded":
            return RemoteDelivery("refunded")
        if order.status in _CLOSED or order.status == "completed":
            return RemoteDelivery("cancelled")
        return RemoteDelivery(order.status[:40])  # pending, on-hold: not ours to decide

    async def deliver(
        self, order_id: str, idempotency_key: str, items: Sequence[CardItem], message: str
    ) -> None:
        """Sends the keys as a customer note unless the order's notes already hold this
        delivery's marker, then completes the order when every line item has its note.
        OrderClosed when the shop closed the order before the note went out."""
        shop_order, item_id = _line_id(order_id)
        problem = unsendable(items)
        if problem:
            raise Permanent(f"cannot deliver in a WooCommerce note: {problem}")
        order = await self._order(shop_order)
        item = order.item(item_id)
        if item is None:
            raise Permanent(f"order {shop_order} no longer has line item {item_id}")
        notes = await self._notes(shop_order)
        ref = delivery_ref(idempotency_key)
        if any(d.ref == ref for d in deliveries_for(notes, item_id)):
            log.info("woocommerce_note_found", platform=self.name, order_id=order_id)
        else:
            self._refuse_closed(order)
            text = note_text(message, item.sku, item.quantity, items, ref, item_id)
            resp = await self._client.request(
                "POST",
                f"/orders/{shop_order}/notes",
                payload={"note": text, "customer_note": True},
            )
            _raise_for_status(resp, f"the note for order {order_id}", changes=True)
            if len(order.items) > 1:
                # Sibling lines may be delivering right now: read what they wrote, so the last
                # of them to finish sees every note and completes the order.
                notes = await self._notes_or_none(shop_order) or []
            else:
                notes = [*notes, NoteView(0, text, True)]
        await self._complete_quietly(order, notes)

    def _refuse_closed(self, order: _Order) -> None:
        if order.status == "processing":
            return
        if order.status == "refunded":
            raise OrderClosed(f"the shop refunded order {order.id} before delivery", "refunded")
        if order.status == "completed":
            raise OrderClosed(
                f"the shop completed order {order.id} without our delivery note: not sending"
                " a second fulfilment",
                "cancelled",
            )
        if order.status in _CLOSED:
            raise OrderClosed(f"the shop closed order {order.id} ({order.status})", "cancelled")
        raise Permanent(f"order {order.id} is {order.status[:40]!r} at the shop, not processing")

    async def _notes_or_none(self, order_id: int) -> list[NoteView] | None:
        try:
            return await self._notes(order_id)
        except AgentError as exc:
            log.warning(
                "woocommerce_notes_unread", platform=self.name, order=order_id, error=str(exc)
            )
            return None

    async def _complete_quietly(self, order: _Order, notes: Sequence[NoteView]) -> None:
        """Sets the order completed once every line item has its note. The keys are with the
        buyer already, so a failure here is logged, not raised: the order is completed on the
        next delivery or reconciliation that touches it (the full re-list asks for it)."""
        if not self._options.complete_orders or not order.all_ours or not notes:
            return
        if not {i.id for i in order.items} <= delivered_items(notes):
            return
        try:
            # Read again right before writing: WooCommerce sets whatever status it is told,
            # and a refund that landed meanwhile must not be overwritten with "completed".
            current = await self._order(order.id)
            if current.status != "processing":
                return
            async for attempt in _retrying():
                with attempt:
                    resp = await self._client.request(
                        "PUT", f"/orders/{order.id}", payload={"status": "completed"}
                    )
                    # Setting a status twice is harmless: a lost answer may simply be retried.
                    _raise_for_status(resp, f"completing order {order.id}", changes=False)
            log.info("woocommerce_order_completed", platform=self.name, order=order.id)
        except AgentError as exc:
            log.warning(
                "woocommerce_order_not_completed",
                platform=self.name,
                order=order.id,
                error=str(exc),
            )

    async def notice(self, order_id: str, message: str, idempotency_key: str | None = None) -> None:
        """A customer note (an e-mail to the buyer) without keys and without a marker (the
        idempotency key is not used: WooCommerce has nothing to carry it)."""
        shop_order, _ = _line_id(order_id)
        resp = await self._client.request(
            "POST", f"/orders/{shop_order}/notes", payload={"note": message, "customer_note": True}
        )
        _raise_for_status(resp, f"the notice for order {order_id}", changes=True)

    async def refund(self, order_id: str, idempotency_key: str, reason: str) -> None:
        """Not automated: a WooCommerce refund moves money through the payment gateway and the
        API gives no way to make it safe to repeat. Always Permanent."""
        raise Permanent(
            f"order {order_id}: refund it in the shop's admin; kami-agent does not refund"
            " WooCommerce orders"
        )

    async def ping(self) -> None:
        """Lists one order: checks the URL, the consumer key and its read access."""
        await self._read("/orders", "order listing", {"per_page": 1, "status": "processing"})

    async def close(self) -> None:
        await self._client.close()
