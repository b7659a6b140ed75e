"""Adapter for Kinguin's Sales Manager API: intake of reservations that need a key, delivery
by uploading the key to its reservation, declared stock (docs/platforms/kinguin.md).

Kinguin gives no idempotency key on an upload. It refuses a second key for a reservation
(409 "Stock already uploaded") and a reservation no longer open (400), and both answers, like
a lost response or a 5xx, leave us not knowing whose key the buyer has. So every such answer
is followed by a read of the offer's stock for that reservation, compared with OUR key; a
key is uploaded again only when that read shows no key at all and the reservation still
open, and then only once per call. The engine binds the same key to the line for every
attempt, so even then a reservation can only ever receive that one key from us.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from agent.config import PlatformSettings, Section
from agent.domain import (
    Ambiguous,
    AuthFailed,
    BadResponse,
    CardItem,
    DeliveryConflict,
    OrderClosed,
    OrderPage,
    Permanent,
    PlatformOrder,
    RejectedOrder,
    RemoteDelivery,
    Transient,
)
from agent.logs import get_logger
from agent.platforms.kinguin_wire import (
    CLOSED_AS,
    INTAKE_STATUS,
    MAX_ID,
    OPEN_STATUSES,
    SEPARATOR,
    StockEntry,
    WireError,
    has_more,
    item_from_text,
    key_text,
    page_content,
    parse_reservation,
    reservation_status,
    split_order_id,
    stock_for,
    text_id,
)
from agent.platforms.oauth import ClientCredentials
from agent.platforms.ratelimit import BURST_SHARE, TokenBucket
from agent.platforms.rest_client import Reply, RestClient
from agent.redact import fingerprint, safe_url
from agent.signed_http import DEFAULT_CONNECTIONS, quote_segment, raise_for_answer

log = get_logger("kami.kinguin")

DEFAULT_TOKEN_URL = "https://id.kinguin.net/auth/token"
# Kinguin's limits (seller hub: "2000 POST/PATCH per minute, 4000 GET per minute"); ours stay
# under them even with a full bucket's burst on top of a minute's rate (see ratelimit.py).
KINGUIN_WRITES_PER_MINUTE = 2000
KINGUIN_READS_PER_MINUTE = 4000
MAX_WRITES = int(KINGUIN_WRITES_PER_MINUTE / (1 + BURST_SHARE))
MAX_READS = int(KINGUIN_READS_PER_MINUTE / (1 + BURST_SHARE))
DEFAULT_WRITES = 1800
DEFAULT_READS = 3600
# Kinguin does not document its largest page; Spring services commonly allow 100 or more.
MAX_PAGE_SIZE = 100
# A reservation's own lookups: one reservation (or a handful of stock entries) per answer.
LOOKUP_PAGE = 20
CURSOR_PREFIX = "page:"
RESERVATIONS = "/api/v1/reservations"
ARCHIVE = "/api/v1/reservations/archive"


@dataclass(frozen=True, slots=True)
class KinguinOptions:
    """`[platforms.<name>]` keys only Kinguin has. `api_key` is the client id and `secret`
    names the secret holding the client secret (agent.config reads those)."""

    offers: Mapping[str, str]  # Kinguin offerId -> our SKU
    token_url: str = DEFAULT_TOKEN_URL
    writes_per_minute: int = DEFAULT_WRITES
    reads_per_minute: int = DEFAULT_READS
    skus: Mapping[str, tuple[str, ...]] = field(init=False)  # our SKU -> its offers

    def __post_init__(self) -> None:
        by_sku: dict[str, list[str]] = {}
        for offer, sku in sorted(self.offers.items()):
            by_sku.setdefault(sku, []).append(offer)
        object.__setattr__(self, "skus", {s: tuple(o) for s, o in by_sku.items()})


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require_https(section: Section, key: str, url: str) -> None:
    """The client secret and the bearer token travel in these requests: https only (plain
    http to this machine is allowed, for tests and a local TLS-terminating proxy)."""
    parsed = urlparse(url)
    if parsed.scheme != "https" and not _loopback(parsed.hostname or ""):
        raise section.error(
            key,
            section._("must be an https:// URL (credentials travel in it), got %(value)r")
            % {"value": url},
        )


def parse_options(section: Section) -> KinguinOptions:
    """token_url (default Kinguin's), offers = { "<offerId>" = "<SKU>" } (required),
    writes_per_minute / reads_per_minute (client-side limits, under Kinguin's)."""
    _ = section._
    token_url = section.url("token_url") if "token_url" in section.data else DEFAULT_TOKEN_URL
    _require_https(section, "token_url", token_url)
    base_url = section.data.get("base_url")
    if isinstance(base_url, str):  # agent.config checks it is a URL at all
        _require_https(section, "base_url", base_url)
    offers = section.table("offers")
    if not offers:
        raise section.error(
            "offers",
            _('is required: map each Kinguin offer to a SKU, offers = { "<offerId>" = "<SKU>" }'),
        )
    for offer, sku in offers.items():
        if text_id(offer) != offer:
            raise section.error(
                f"offers.{offer}",
                _("not a Kinguin offer id (1-%(max)d characters, no %(separator)r)")
                % {"max": MAX_ID, "separator": SEPARATOR},
            )
        if not isinstance(sku, str) or not sku.strip() or len(sku) > 128:
            raise section.error(
                f"offers.{offer}", _("must name a SKU, got %(value)r") % {"value": sku}
            )
    return KinguinOptions(
        offers=dict(offers),
        token_url=token_url,
        writes_per_minute=section.integer(
            "writes_per_minute", DEFAULT_WRITES, minimum=1, maximum=MAX_WRITES
        ),
        reads_per_minute=section.integer(
            "reads_per_minute", DEFAULT_READS, minimum=1, maximum=MAX_READS
        ),
    )


def build(settings: PlatformSettings, secret: str, max_connections: int) -> KinguinPlatform:
    """An adapter for Kinguin's Sales Manager API."""
    return KinguinPlatform(settings, secret, max_connections)


def _worth_retrying_now(exc: BaseException) -> bool:
    # Reads have no side effect: an ambiguous read is just a failed read. Refused
    # credentials will not fix themselves within seconds.
    return isinstance(exc, Transient | Ambiguous) and not isinstance(exc, AuthFailed)


def _read_retrying() -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception(_worth_retrying_now),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.2, max=2),
        reraise=True,
    )


def _raise_for_status(reply: Reply, what: str, *, unknown_outcome: bool) -> None:
    """A non-2xx answer as the error class the engine acts on."""
    if reply.status >= 300:
        raise_for_answer(
            reply.status,
            reply.message(),
            reply.retry_after,
            "Kinguin",
            what,
            unknown_outcome=unknown_outcome,
            credentials="our token",
        )


def _page_number(cursor: str | None) -> int:
    if cursor and cursor.startswith(CURSOR_PREFIX):
        number = cursor.removeprefix(CURSOR_PREFIX)
        if number.isdigit() and len(number) < 7:
            return int(number)
    return 0


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Why an upload's outcome must be looked up; `definite` when Kinguin answered (a 4xx),
    not when the answer was lost or a 5xx."""

    reason: str
    definite: bool


class KinguinPlatform:
    def __init__(
        self,
        settings: PlatformSettings,
        secret: str,
        max_connections: int = DEFAULT_CONNECTIONS,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`monotonic`: the clock of token renewal and rate limiting (tests move it)."""
        options = settings.options
        if not isinstance(options, KinguinOptions):
            raise TypeError("a kinguin platform needs KinguinOptions (agent.config reads them)")
        clock = monotonic
        self.name = settings.name
        self._base = settings.base_url.rstrip("/")
        self._options = options
        self._page_size = min(settings.page_size, MAX_PAGE_SIZE)
        self._http = RestClient(settings.timeout, max_connections)
        self._auth = ClientCredentials(
            self._http,
            options.token_url,
            settings.api_key,
            secret,
            who=f"kinguin {settings.name}",
            clock=clock,
        )
        self._writes = TokenBucket(options.writes_per_minute, clock=clock)
        self._reads = TokenBucket(options.reads_per_minute, clock=clock)
        self._declared: dict[str, int] = {}  # offer -> declared stock we last published

    def __repr__(self) -> str:
        return f"KinguinPlatform({self.name})"

    # --- HTTP ------------------------------------------------------------------------------
    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json_body: object = None,
    ) -> Reply:
        """One call with a valid token, under the rate limits. A 401 (the token expired early
        or was revoked) is answered once with a fresh token; a request refused with 401 was
        not carried out, so sending it again is safe, even an upload."""
        bucket = self._reads if method == "GET" else self._writes
        for attempt in (1, 2):
            await bucket.acquire()
            token = await self._auth.token()
            reply = await self._http.request(
                method,
                f"{self._base}{path}",
                params=params,
                json_body=json_body,
                headers={"Authorization": f"Bearer {token}"},
            )
            if reply.status == 401 and attempt == 1:
                self._auth.invalidate(token)
                log.info("kinguin_token_refused", platform=self.name, access_fp=fingerprint(token))
                continue
            if 300 <= reply.status < 400:
                raise Permanent(
                    f"Kinguin {method} {path.split('?')[0][:80]} redirects to "
                    f"{safe_url(reply.location or '')}; redirects are never followed "
                    "(check base_url)"
                )
            return reply
        raise AssertionError("unreachable: the second attempt returns")

    async def _read(self, path: str, params: Mapping[str, str | int]) -> Reply:
        async for attempt in _read_retrying():
            with attempt:
                reply = await self._call("GET", path, params=params)
                _raise_for_status(reply, f"GET {path}", unknown_outcome=False)
                return reply
        raise AssertionError("unreachable: tenacity reraises")

    async def _read_page(self, path: str, params: Mapping[str, str | int]) -> object:
        reply = await self._read(path, params)
        body = reply.json()
        try:
            page_content(body)
        except WireError as exc:
            raise BadResponse(f"Kinguin {path}: {exc}") from None
        return body

    # --- intake ----------------------------------------------------------------------------
    async def list_paid(self, cursor: str | None) -> OrderPage:
        """Reservations Kinguin could not fill (OUT_OF_STOCK), oldest first, a page at a time.

        The cursor is a page number. The set of reservations needing stock is small and
        short-lived (each leaves it within 15 minutes: delivered or cancelled), so every
        listing walks it from the first page and the last page points back there; a creation
        date cursor would miss a reservation created (BUYING) long before it was paid. The
        engine drops what it already has."""
        number = _page_number(cursor)
        params: dict[str, str | int] = {
            "status": INTAKE_STATUS,
            "page": number,
            "size": self._page_size,
            "sort": "createdDate,asc",
        }
        body = await self._read_page(RESERVATIONS, params)
        assert isinstance(body, dict)
        orders: list[PlatformOrder | RejectedOrder] = []
        unidentifiable = 0
        for raw in page_content(body):
            if not isinstance(raw, dict) or text_id(raw.get("id")) is None:
                unidentifiable += 1
                continue
            parsed = parse_reservation(raw, self._options.offers)
            if parsed is not None:
                orders.append(parsed)
        more = has_more(body)
        next_cursor = f"{CURSOR_PREFIX}{number + 1 if more else 0}"
        return OrderPage(orders, next_cursor, more, unidentifiable)

    async def wait_for_orders(self, cursor: str | None, wait_seconds: float) -> OrderPage:
        """Kinguin has no long poll (it pushes webhooks instead, which this adapter does not
        use): always Permanent, and the engine polls."""
        raise Permanent("Kinguin offers no long poll; set long_poll = false")

    # --- reconcile -------------------------------------------------------------------------
    async def _status(self, reservation_id: str) -> str | None:
        """The reservation's status, from the live list or the archive (delivered and closed
        reservations move there after a while); None when neither has it."""
        params: dict[str, str | int] = {
            "reservationId": reservation_id,
            "page": 0,
            "size": LOOKUP_PAGE,
        }
        for path in (RESERVATIONS, ARCHIVE):
            body = await self._read_page(path, params)
            try:
                status = reservation_status(body, reservation_id)
            except WireError as exc:
                raise BadResponse(f"Kinguin {path}: {exc}") from None
            if status is not None:
                return status
        return None

    async def _stock(self, offer_id: str, reservation_id: str) -> list[StockEntry]:
        """The keys the offer holds for this reservation (normally none or one)."""
        params: dict[str, str | int] = {
            "reservationId": reservation_id,
            "page": 0,
            "size": LOOKUP_PAGE,
        }
        body = await self._read_page(f"/api/v1/offers/{quote_segment(offer_id)}/stock", params)
        return stock_for(body, reservation_id)

    async def get_order(self, order_id: str) -> RemoteDelivery:
        """The reservation as the engine knows orders: "delivered" with the key Kinguin holds
        for it, "paid" while it still waits for one, "cancelled"/"refunded" once closed."""
        offer_id, reservation_id = split_order_id(order_id)
        entries = await self._stock(offer_id, reservation_id)
        status = await self._status(reservation_id)
        if status in CLOSED_AS:
            return RemoteDelivery(CLOSED_AS[status])
        if entries:
            if any(e.content is None for e in entries):
                raise Ambiguous(f"Kinguin does not show the key of reservation {reservation_id}")
            return RemoteDelivery(
                "delivered", tuple(item_from_text(e.content or "") for e in entries)
            )
        if status is None:
            raise Permanent(f"Kinguin has no reservation {reservation_id}")
        if status in OPEN_STATUSES:
            return RemoteDelivery("paid")
        if status == "DELIVERED":
            # Delivered, but no key of the offer carries this reservation (yet): never taken
            # for ours; asked again later, and parked for a human if it stays so.
            raise Ambiguous(f"Kinguin shows reservation {reservation_id} delivered, no key")
        return RemoteDelivery(status.lower()[:40])  # the engine parks what it does not know

    # --- delivery --------------------------------------------------------------------------
    async def _upload(
        self, offer_id: str, reservation_id: str, text: str, idempotency_key: str
    ) -> _Refusal | None:
        """None when Kinguin took the key. Raises for an answer that leaves no doubt nothing
        was stored (429, refused token, unknown offer)."""
        payload = {
            "body": text,
            "mimeType": "text/plain",
            "reservationId": reservation_id,
            # Optional, <= 36 characters, meaning undocumented: sent, never relied on.
            "requestId": idempotency_key[:36],
        }
        path = f"/api/v1/offers/{quote_segment(offer_id)}/stock"
        try:
            reply = await self._call("POST", path, json_body=payload)
        except Ambiguous as exc:  # the response was lost: the key may be stored
            return _Refusal(str(exc), definite=False)
        if reply.status < 300:
            try:
                body = reply.json()
            except BadResponse:
                return _Refusal(f"upload answered {reply.status} with malformed JSON", False)
            landed = body.get("reservationId") if isinstance(body, dict) else None
            if landed not in (None, reservation_id):
                return _Refusal(f"upload answered for another reservation {landed!r}", False)
            return None
        text_of = reply.message()
        if reply.status == 409 and "proceeded" in text_of.lower():
            # "Reservation is being proceeded by another action now": perhaps our own earlier
            # upload; the engine asks again (reading first) in a few seconds.
            raise Ambiguous(f"Kinguin is busy with reservation {reservation_id}: {text_of}")
        if reply.status in (400, 409):
            return _Refusal(text_of, definite=True)
        if reply.status >= 500:
            return _Refusal(text_of, definite=False)
        _raise_for_status(reply, "the key upload", unknown_outcome=True)
        raise AssertionError("unreachable: every other status raises")

    async def deliver(
        self, order_id: str, idempotency_key: str, items: Sequence[CardItem], message: str
    ) -> None:
        """Uploads the line's one key to its reservation; returns once Kinguin holds OUR key
        for it. Raises DeliveryConflict when it holds another key, OrderClosed when the
        reservation was cancelled or refunded first, Ambiguous when it cannot tell yet.
        (`message` has nowhere to go: Kinguin shows the buyer the key only.)"""
        offer_id, reservation_id = split_order_id(order_id)
        if len(items) != 1:
            raise Permanent(f"a Kinguin reservation takes exactly one key, got {len(items)}")
        text = key_text(items[0])
        refusal = await self._upload(offer_id, reservation_id, text, idempotency_key)
        if refusal is None:
            return
        await self._settle(offer_id, reservation_id, text, idempotency_key, refusal)

    async def _settle(
        self,
        offer_id: str,
        reservation_id: str,
        text: str,
        idempotency_key: str,
        refusal: _Refusal,
    ) -> None:
        """After an upload whose outcome is not known: look, and upload again only when
        nothing is there and the reservation is still open (once)."""
        for round_ in (1, 2):
            try:
                entries = await self._stock(offer_id, reservation_id)
                status = None if entries else await self._status(reservation_id)
            except (Transient, Ambiguous) as exc:
                raise Ambiguous(f"{refusal.reason}; and the check failed: {exc}") from None
            if any(e.content is None for e in entries):
                raise Ambiguous(f"Kinguin does not show the key of reservation {reservation_id}")
            if any(e.content != text for e in entries):
                raise DeliveryConflict(
                    f"Kinguin reservation {reservation_id} already holds another key "
                    f"({refusal.reason})"
                )
            if entries:
                log.info(
                    "kinguin_delivery_confirmed",
                    platform=self.name,
                    reservation=reservation_id,
                    after=refusal.reason,
                )
                return
            if status in CLOSED_AS:
                closed = CLOSED_AS[status]
                raise OrderClosed(f"Kinguin reservation {status} before our key landed", closed)
            if status is None:
                raise Permanent(f"Kinguin has no reservation {reservation_id} ({refusal.reason})")
            if status not in OPEN_STATUSES:
                raise Ambiguous(f"Kinguin reservation {status}, no key shown ({refusal.reason})")
            if round_ == 2:
                if refusal.definite:
                    raise Permanent(f"Kinguin refused the key: {refusal.reason}")
                raise Ambiguous(f"the key did not land: {refusal.reason}")
            log.warning(
                "kinguin_upload_again",
                platform=self.name,
                reservation=reservation_id,
                after=refusal.reason,
            )
            again = await self._upload(offer_id, reservation_id, text, idempotency_key)
            if again is None:
                return
            refusal = again
        raise AssertionError("unreachable: the second round returns or raises")

    async def notice(self, order_id: str, message: str, idempotency_key: str | None = None) -> None:
        """Kinguin's API has no message to the buyer of a key: nothing is sent. (Kinguin
        cancels an undelivered reservation after 15 minutes anyway.)"""
        log.info("kinguin_notice_not_supported", platform=self.name, order_id=order_id)

    async def refund(self, order_id: str, idempotency_key: str, reason: str) -> None:
        """Kinguin's API has no merchant refund (refunds go through its Resolution Center,
        and an undelivered reservation is cancelled and refunded by Kinguin itself)."""
        raise Permanent("Kinguin offers no refund by API; an undelivered order is cancelled")

    # --- declared stock --------------------------------------------------------------------
    async def publish_stock(self, sku: str, available: int) -> None:
        """Declares `available` keys of `sku` on Kinguin: PATCH /api/v1/offers/{offerId}
        {"declaredStock": n, "declaredTextStock": n} for each offer mapped to it (our keys
        are text). Several offers of one SKU share the count, so their sum never exceeds
        what can be filled; offers being lowered are written before those being raised.
        The value is absolute, so repeating a call is safe: a lost answer is Transient.
        Raises Permanent when Kinguin refuses (e.g. "Max declared stock has been exceeded")."""
        offers = self._options.skus.get(sku, ())
        if not offers:
            return
        share, extra = divmod(max(0, available), len(offers))
        targets = {o: share + (1 if i < extra else 0) for i, o in enumerate(offers)}
        # Unknown previous values count as high: they are lowered first.
        order = sorted(offers, key=lambda o: targets[o] - self._declared.get(o, 2**31))
        for offer in order:
            count = targets[offer]
            self._declared.pop(offer, None)  # unknown until Kinguin confirms
            try:
                reply = await self._call(
                    "PATCH",
                    f"/api/v1/offers/{quote_segment(offer)}",
                    json_body={"declaredStock": count, "declaredTextStock": count},
                )
            except Ambiguous as exc:
                raise Transient(f"declared stock of offer {offer}: {exc}") from None
            what = f"declared stock {count} for offer {offer}"
            _raise_for_status(reply, what, unknown_outcome=False)
            self._declared[offer] = count
            log.info("kinguin_stock_declared", platform=self.name, offer=offer, declared=count)

    async def ping(self) -> None:
        """A token and one page of one reservation: credentials and base_url both work."""
        params: dict[str, str | int] = {"status": INTAKE_STATUS, "page": 0, "size": 1}
        await self._read_page(RESERVATIONS, params)

    async def close(self) -> None:
        await self._http.close()
