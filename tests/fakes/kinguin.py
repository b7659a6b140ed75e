"""A local fake of Kinguin's Sales Manager API, built from its public documentation and
written independently of the adapter (no imports from agent.platforms.kinguin), so the
adapter is checked against the platform's documented behaviour, not against itself.

Sources (see docs/platforms/kinguin.md for what each one says):
- the Sales Manager API OpenAPI copy ("Sales Manager API V1"): paths, ReservationsFilter,
  Pageable, PagedReservationRepresentationModel, StockRequest, StockRepresentationModel,
  PagedModelStockRepresentationModel, OfferUpdateRequest, and the answers of
  POST /api/v1/offers/{offerId}/stock (200; 400 "Invalid reservation ID (does not exist or has
  already been processed)"; 409 "Reservation is being proceeded by another action now. Please
  try again in few seconds." / "Stock already uploaded");
- Kinguin's dev portal (api-access): the client-credentials token (`expires_in` 3600) and the
  2,000 writes per minute limit, 429 beyond; the seller-hub page: 2,000 POST/PATCH and 4,000
  GET per minute;
- the developer guide (copy in moemahdi/bitloot docs/kinguin-API-documentation.md):
  reservation statuses, "if the merchant fails to deliver within 15 minutes, the order is
  canceled", declared stock by PATCH, "Max declared stock has been exceeded".

What the documents leave open is modelled the simple way and named here: filters and paging
are flat query parameters (the OpenAPI default for an object parameter: `status=`, `page=`,
`size=`), error bodies are Spring's default JSON (`message`), an upload answers 200.

The business clock is injectable (`clock`): tests move it past the 15-minute window or a
token's expiry without sleeping. Rate limits count real (monotonic) time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.loopback import serve

DELIVERY_WINDOW = 15 * 60.0  # seconds from "needs stock" to Kinguin cancelling the order
NEEDS_STOCK = ("BOUGHT", "OUT_OF_STOCK")
FINAL = ("DELIVERED", "CANCELED", "REFUNDED", "RETURNED", "REVERSED")
MIME_TYPES = ("text/plain", "image/jpeg", "image/png", "image/gif")
MAX_KEY_BYTES = 200 * 1024
MAX_PAGE_SIZE = 200
INVALID_RESERVATION = "Invalid reservation ID (does not exist or has already been processed)"
BUSY = "Reservation is being proceeded by another action now. Please try again in few seconds."
ALREADY_UPLOADED = "Stock already uploaded"


class ShiftedClock:
    """Wall time plus an offset the test moves forward (time keeps flowing in between)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def kinguin_time(ts: float) -> str:
    """The documented date-time format: 2021-08-31T13:00:38.914+0000."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


@dataclass
class KinguinFaults:
    error_rate: float = 0.0  # 503 before anything is committed
    drop_after_commit_rate: float = 0.0  # the upload is committed, the response is lost
    rate_limit_rate: float = 0.0  # a 429 with Retry-After, limits or not
    duplicate_rate: float = 0.0  # a reservation listed twice in one page
    busy_rate: float = 0.0  # 409 "Reservation is being proceeded by another action now"
    cancel_on_upload_rate: float = 0.0  # the buyer's order is cancelled just before our upload
    latency: float = 0.0  # up to this many seconds added to every request
    ignore_filters: bool = False  # a server that ignores the filter parameters
    fail_uploads: int = 0  # the next uploads to a reservation answer 503, nothing stored


@dataclass
class FakeOffer:
    id: str
    product_id: str
    declared_stock: int = 0
    declared_text_stock: int = 0
    max_declared_stock: int = 1_000_000


@dataclass
class FakeReservation:
    id: str
    offer_id: str
    status: str
    created: float
    updated: float
    needs_stock_at: float | None
    price_cents: int = 1990
    archived: bool = False


@dataclass
class FakeStock:
    id: str
    offer_id: str
    reservation_id: str | None
    content: str
    mime_type: str
    status: str
    created: float


@dataclass
class UploadCall:
    offer_id: str
    reservation_id: str | None
    body: str
    request_id: str | None
    # delivered | dropped | stocked | conflict | invalid | busy | failed | rejected
    outcome: str


@dataclass
class FakeKinguin:
    client_id: str = "kinguin-client"
    client_secret: str = "kinguin-secret"
    seed: int = 0
    clock: Callable[[], float] = time.time
    token_lifetime: int = 3600
    writes_per_minute: int = 2000
    reads_per_minute: int = 4000
    archive_after: float | None = None  # final reservations move to the archive after this
    faults: KinguinFaults = field(default_factory=KinguinFaults)
    offers: dict[str, FakeOffer] = field(default_factory=dict)
    reservations: dict[str, FakeReservation] = field(default_factory=dict)
    stock: list[FakeStock] = field(default_factory=list)
    uploads: list[UploadCall] = field(default_factory=list)
    patches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    token_requests: int = 0
    rejected_tokens: int = 0  # API calls refused for a missing, unknown or expired token
    rate_limited: int = 0
    errors_injected: int = 0
    requests: int = 0
    base_url: str = ""

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)
        self._tokens: dict[str, float] = {}  # token -> expires at (business clock)
        self._ids = itertools.count(1)
        self._open: set[str] = set()  # reservations that still need stock
        self._windows: dict[str, deque[float]] = {"read": deque(), "write": deque()}
        self._by_reservation: dict[str, list[FakeStock]] = {}
        self._runner: web.AppRunner | None = None

    # --- test API ---------------------------------------------------------------------------
    def add_offer(self, offer_id: str | None = None, **extra: Any) -> str:
        offer_id = offer_id or f"{next(self._ids):024x}"
        self.offers[offer_id] = FakeOffer(offer_id, f"product-{offer_id[-6:]}", **extra)
        return offer_id

    def add_reservation(self, offer_id: str, status: str = "OUT_OF_STOCK", **extra: Any) -> str:
        """A paid reservation of one key, out of Kinguin's stock (declared stock only), so
        it needs ours from now on."""
        rid = f"{next(self._ids):08x}-{self.random.getrandbits(64):016x}"
        now = self.clock()
        needs = now if status in NEEDS_STOCK else None
        self.reservations[rid] = FakeReservation(rid, offer_id, status, now, now, needs, **extra)
        if needs is not None:
            self._open.add(rid)
        return rid

    def cancel(self, rid: str) -> None:
        """The buyer cancels (or payment is reversed) before any key arrived."""
        self._set_status(self.reservations[rid], "CANCELED")

    def keys_by_reservation(self) -> dict[str, list[str]]:
        """Every key uploaded to a reservation, as the buyer would see it."""
        return {rid: [s.content for s in entries] for rid, entries in self._by_reservation.items()}

    def _add_stock(self, entry: FakeStock) -> None:
        self.stock.append(entry)
        if entry.reservation_id is not None:
            self._by_reservation.setdefault(entry.reservation_id, []).append(entry)

    # --- server -----------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=4 * 1024 * 1024)
        app.router.add_post("/auth/token", self._token)
        app.router.add_get("/api/v1/reservations", self._reservations)
        app.router.add_get("/api/v1/reservations/archive", self._archive)
        app.router.add_get("/api/v1/offers/{offerId}", self._get_offer)
        app.router.add_patch("/api/v1/offers/{offerId}", self._patch_offer)
        app.router.add_post("/api/v1/offers/{offerId}/stock", self._upload)
        app.router.add_get("/api/v1/offers/{offerId}/stock", self._list_stock)
        return app

    async def start(self) -> str:
        self._runner, self.base_url = await serve(self.app(), access_log=None, shutdown_timeout=0.5)
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    def error(status: int, message: str, path: str = "", **headers: str) -> web.Response:
        """Spring Boot's default error body (the Sales Manager API is a Spring service; its
        exact error JSON is not documented)."""
        reason = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 409: "Conflict"}
        body = {
            "timestamp": kinguin_time(time.time()),
            "status": status,
            "error": reason.get(status, "Error"),
            "message": message,
            "path": path,
        }
        return web.json_response(body, status=status, headers=headers)

    def _limited(self, kind: str) -> float | None:
        """Seconds until a request of this kind fits the per-minute limit, or None."""
        window = self._windows[kind]
        limit = self.writes_per_minute if kind == "write" else self.reads_per_minute
        now = time.monotonic()
        while window and window[0] <= now - 60.0:
            window.popleft()
        if len(window) >= limit:
            return window[0] + 60.0 - now
        window.append(now)
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        if self.faults.latency:
            await asyncio.sleep(self.random.uniform(0, self.faults.latency))
        if not request.path.startswith("/api/"):
            return await handler(request)  # type: ignore[no-any-return]
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""
        expires = self._tokens.get(token)
        if expires is None or expires <= self.clock():
            self.rejected_tokens += 1
            return self.error(401, "Unauthorized", request.path)
        kind = "read" if request.method == "GET" else "write"
        wait = self._limited(kind)
        if wait is not None or self.random.random() < self.faults.rate_limit_rate:
            self.rate_limited += 1
            retry = str(max(1, math.ceil(wait or 1.0)))
            return self.error(429, "Too Many Requests", request.path, **{"Retry-After": retry})
        if self.random.random() < self.faults.error_rate:
            self.errors_injected += 1
            return self.error(503, "Service Unavailable", request.path)
        self._expire()
        return await handler(request)  # type: ignore[no-any-return]

    # --- auth ------------------------------------------------------------------------------
    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.token_requests += 1
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if form.get("client_id") != self.client_id or form.get("client_secret") != (
            self.client_secret
        ):
            return web.json_response({"error": "invalid_client"}, status=401)
        token = secrets.token_urlsafe(32)
        self._tokens[token] = self.clock() + self.token_lifetime
        return web.json_response(
            {
                "access_token": token,
                "expires_in": self.token_lifetime,
                "token_type": "bearer",
                "scope": None,
            }
        )

    # --- reservations ----------------------------------------------------------------------
    def _expire(self) -> None:
        """Kinguin's 15-minute rule: a reservation still without a key is cancelled."""
        now = self.clock()
        for rid in list(self._open):
            res = self.reservations[rid]
            if res.needs_stock_at is not None and now > res.needs_stock_at + DELIVERY_WINDOW:
                self._set_status(res, "CANCELED")
        if self.archive_after is not None:
            for res in self.reservations.values():
                if res.status in FINAL and now - res.updated > self.archive_after:
                    res.archived = True

    def _set_status(self, res: FakeReservation, status: str) -> None:
        res.status = status
        res.updated = self.clock()
        if status not in NEEDS_STOCK:
            self._open.discard(res.id)

    def _reservation_json(self, res: FakeReservation) -> dict[str, Any]:
        stock = next(iter(self._by_reservation.get(res.id, ())), None)
        offer = self.offers.get(res.offer_id)
        price = {"amount": res.price_cents, "currency": "EUR"}
        return {
            "id": res.id,
            "orderIncrementId": f"KG{res.id[:8].upper()}",
            "itemPrice": price,
            "price": price,
            "priceIWTR": {"amount": res.price_cents * 9 // 10, "currency": "EUR"},
            "sellerId": 1066100,
            "sellerName": None,
            "customerId": 42,
            "offerId": res.offer_id,
            "productId": offer.product_id if offer else "",
            "name": "Testowe CD Key",
            "rowNumber": 0,
            "createdDate": kinguin_time(res.created),
            "toReleaseDate": None,
            "nextAutoReleaseDate": None,
            "releasedDate": kinguin_time(stock.created) if stock else None,
            "releaseTryCount": 0,
            "releasedStockId": stock.id if stock else None,
            "releasedExternalStockId": None,
            "status": res.status,
            "orderItemId": None,
            "maxDeliveryDate": None,
            "quantity": None,
            "updatedAt": kinguin_time(res.updated),
        }

    def _page(self, request: web.Request) -> tuple[int, int] | web.Response:
        try:
            page = int(request.query.get("page", "0"))
            size = int(request.query.get("size", "20"))
        except ValueError:
            return self.error(400, "page and size must be integers", request.path)
        if page < 0 or not 1 <= size <= MAX_PAGE_SIZE:
            return self.error(400, f"page >= 0, 1 <= size <= {MAX_PAGE_SIZE}", request.path)
        return page, size

    def _matches(self, res: FakeReservation, query: Any) -> bool:
        if self.faults.ignore_filters:
            return True
        for name, value in (
            ("status", res.status),
            ("offerId", res.offer_id),
            ("reservationId", res.id),
        ):
            wanted = query.get(name)
            if wanted is not None and wanted != value:
                return False
        return True

    async def _reservations(self, request: web.Request) -> web.Response:
        return self._list_reservations(request, archived=False)

    async def _archive(self, request: web.Request) -> web.Response:
        return self._list_reservations(request, archived=True)

    def _list_reservations(self, request: web.Request, *, archived: bool) -> web.Response:
        paging = self._page(request)
        if isinstance(paging, web.Response):
            return paging
        page, size = paging
        found = sorted(
            (
                r
                for r in self.reservations.values()
                if r.archived == archived and self._matches(r, request.query)
            ),
            key=lambda r: (r.created, r.id),
        )
        chunk = [self._reservation_json(r) for r in found[page * size : (page + 1) * size]]
        if chunk and self.random.random() < self.faults.duplicate_rate:
            chunk.append(self.random.choice(chunk))
        total_pages = max(1, math.ceil(len(found) / size))
        return web.json_response(
            {
                "content": chunk,
                "pageable": {"pageNumber": page, "pageSize": size, "offset": page * size},
                "totalPages": total_pages,
                "totalElements": len(found),
                "last": page >= total_pages - 1,
                "size": size,
                "number": page,
                "sort": {"sorted": True, "unsorted": False, "empty": False},
                "numberOfElements": len(chunk),
                "first": page == 0,
                "empty": not chunk,
            }
        )

    # --- offers and stock ------------------------------------------------------------------
    def _offer_json(self, offer: FakeOffer) -> dict[str, Any]:
        available = sum(1 for s in self.stock if s.offer_id == offer.id and s.status == "AVAILABLE")
        reserved = sum(1 for rid in self._open if self.reservations[rid].offer_id == offer.id)
        return {
            "id": offer.id,
            "productId": offer.product_id,
            "status": "ACTIVE",
            "block": None,
            "declaredStock": offer.declared_stock,
            "declaredTextStock": offer.declared_text_stock,
            "reservedStock": reserved,
            "availableStock": available,
            "buyableStock": available + offer.declared_stock,
            "updatedAt": kinguin_time(self.clock()),
        }

    async def _get_offer(self, request: web.Request) -> web.Response:
        offer = self.offers.get(request.match_info["offerId"])
        if offer is None:
            return self.error(404, "Not found", request.path)
        return web.json_response(self._offer_json(offer))

    async def _patch_offer(self, request: web.Request) -> web.Response:
        offer = self.offers.get(request.match_info["offerId"])
        if offer is None:
            return self.error(404, "Not found", request.path)
        try:
            body = json.loads(await request.read())
        except ValueError:
            return self.error(400, "Bad request", request.path)
        if not isinstance(body, dict):
            return self.error(400, "Bad request", request.path)
        self.patches.append((offer.id, body))
        declared = body.get("declaredStock", offer.declared_stock)
        text = body.get("declaredTextStock", offer.declared_text_stock)
        for value in (declared, text):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                return self.error(400, "Bad request", request.path)
        if declared > offer.max_declared_stock:
            return self.error(400, "Max declared stock has been exceeded", request.path)
        if text > declared:
            return self.error(400, "declaredTextStock must not exceed declaredStock", request.path)
        offer.declared_stock, offer.declared_text_stock = declared, text
        return web.json_response(self._offer_json(offer))

    def _stock_json(self, entry: FakeStock) -> dict[str, Any]:
        return {
            "id": entry.id,
            "productId": self.offers[entry.offer_id].product_id,
            "offerId": entry.offer_id,
            "sellerId": 1066100,
            "status": entry.status,
            "createdAt": kinguin_time(entry.created),
            "dispatchedAt": kinguin_time(entry.created) if entry.status == "DISPATCHED" else None,
            "reservationId": entry.reservation_id,
            "ktcId": None,
            "content": entry.content,
            "mimeType": entry.mime_type,
            "externalName": None,
            "externalVendor": None,
            "externalPrice": None,
            "hidden": False,
        }

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        offer_id = request.match_info["offerId"]
        try:
            payload = json.loads(await request.read())
        except ValueError:
            return self.error(400, "Bad request", request.path)
        if not isinstance(payload, dict):
            return self.error(400, "Bad request", request.path)
        body, mime = payload.get("body"), payload.get("mimeType")
        rid, request_id = payload.get("reservationId"), payload.get("requestId")
        if (
            not isinstance(body, str)
            or not body
            or len(body.encode()) > MAX_KEY_BYTES
            or mime not in MIME_TYPES
            or not isinstance(request_id, str | None)
            or (request_id is not None and len(request_id) > 36)
            or (rid is not None and not isinstance(rid, str))
        ):
            return self.error(400, "Bad request", request.path)
        call = UploadCall(offer_id, rid, body, request_id, "rejected")
        self.uploads.append(call)
        offer = self.offers.get(offer_id)
        if offer is None:
            return self.error(404, "Offer not found", request.path)
        now = self.clock()
        entry = FakeStock(f"{next(self._ids):08x}-stock", offer_id, rid, body, mime, "", now)
        if rid is None:  # upfront stock: sold by Kinguin itself later
            entry.status = "AVAILABLE"
            self._add_stock(entry)
            call.outcome = "stocked"
            return web.json_response(self._stock_json(entry))
        if self.faults.fail_uploads > 0:
            self.faults.fail_uploads -= 1
            call.outcome = "failed"
            return self.error(503, "Service Unavailable", request.path)
        if self.random.random() < self.faults.busy_rate:
            call.outcome = "busy"
            return self.error(409, BUSY, request.path)
        res = self.reservations.get(rid)
        cancelled_meanwhile = self.random.random() < self.faults.cancel_on_upload_rate
        if res is not None and res.status in NEEDS_STOCK and cancelled_meanwhile:
            self._set_status(res, "CANCELED")  # cancelled while our key was on its way
        if rid in self._by_reservation:
            call.outcome = "conflict"
            return self.error(409, ALREADY_UPLOADED, request.path)
        if res is None or res.offer_id != offer_id or res.status not in NEEDS_STOCK:
            call.outcome = "invalid"
            return self.error(400, INVALID_RESERVATION, request.path)
        entry.status = "DISPATCHED"
        self._add_stock(entry)
        self._set_status(res, "DELIVERED")
        if self.random.random() < self.faults.drop_after_commit_rate:
            call.outcome = "dropped"
            if request.transport is not None:
                request.transport.close()
            return self.error(502, "response lost")
        call.outcome = "delivered"
        return web.json_response(self._stock_json(entry))

    async def _list_stock(self, request: web.Request) -> web.Response:
        offer_id = request.match_info["offerId"]
        paging = self._page(request)
        if isinstance(paging, web.Response):
            return paging
        page, size = paging
        wanted = None if self.faults.ignore_filters else request.query.get("reservationId")
        status = None if self.faults.ignore_filters else request.query.get("status")
        candidates = self.stock if wanted is None else self._by_reservation.get(wanted, [])
        found = [
            s
            for s in candidates
            if s.offer_id == offer_id and (status is None or s.status == status)
        ]
        chunk = found[page * size : (page + 1) * size]
        return web.json_response(
            {
                "content": [self._stock_json(s) for s in chunk],
                "metadata": {
                    "page": page,
                    "size": size,
                    "totalElements": len(found),
                    "totalPages": max(1, math.ceil(len(found) / size)),
                },
            }
        )
