"""Adapter for Eneba's declared stock (docs/platforms/eneba.md): a responder.

Eneba calls the merchant: RESERVE (one attempt) when a buyer orders, PROVIDE (three attempts,
5 s apart) once paid, CANCEL when the order ends otherwise. The calls arrive at the listener
(agent/listener.py) on one path, `Authorization: Bearer <callback_token>`:

- RESERVE binds `keyCount` keys per auction, every auction's in one transaction, or refuses
  with nothing bound;
- PROVIDE answers with exactly the keys RESERVE bound; its reply is stored, so every retry
  (and a PROVIDE arriving while the agent restarts) gets those very bytes;
- CANCEL before PROVIDE releases the keys to stock; after it voids them with the reason
  (Eneba deletes keys it was given when a cancel is answered 200).

Reservations never paid are released after `reserve_hours` (Eneba: hold up to 48 h, its
longest payment wait). Handed-out lines are confirmed (`delivered`) when Eneba's
P_declaredStockResult reports the provision COMPLETED; one it reports FAILED is parked.

There is nothing to poll: `list_paid` returns empty pages, the listener does the intake.
The stock sync publishes each auction's declared stock (S_updateAuction declaredStock): what
can be filled, reserved keys excluded (they are bound).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from agent.config import PlatformSettings, Section
from agent.domain import (
    Ambiguous,
    AuthFailed,
    BadResponse,
    CardItem,
    Held,
    LineState,
    OrderPage,
    Permanent,
    RemoteDelivery,
    StockNotOffered,
    Transient,
)
from agent.listener_routes import BearerAuth, Inbound, Job, ListenerContext, Mount, Outbound, Route
from agent.logs import get_logger
from agent.platforms import eneba_wire as wire
from agent.platforms.rest_client import Reply, RestClient
from agent.redact import fingerprint, register
from agent.secrets import resolve_secret
from agent.signed_http import DEFAULT_CONNECTIONS
from agent.store.ledger.responder import Cancelled, Handed, Want

log = get_logger("kami.eneba")

DEFAULT_TOKEN_URL = "https://user.eneba.com/oauth/token"
# Eneba's OAuth client id for API consumers (HelisLT/eneba-client docs/QUICKSTART.md);
# the sandbox has its own: 917611c2-70a5-11e9-00c4-ee691bb8bfaa.
DEFAULT_CLIENT_ID = "917611c2-70a5-11e9-97c4-46691b78bfa2"
DEFAULT_RESERVE_HOURS = 48.0
DEFAULT_SWEEP_INTERVAL = 60.0
DEFAULT_RECONCILE_AFTER = 120.0  # Eneba gives up on a PROVIDE after 3 x 60 s + 2 x 5 s
TOKEN_RENEW_BEFORE = 3600.0
MAX_TOKEN_LIFETIME = 86_400.0  # Eneba's tokens last 29 days; ours are renewed daily
RECONCILE_BATCH = 50
# S_updateAuction "is rate-limited. You can update each auction only once every 30 seconds"
# (api.eneba.com/documentation/api-reference/mutation/s-update-auction; another version of the
# page says 45): the stricter figure, so a declared count is never refused for coming early.
DEFAULT_UPDATE_SPACING = 45.0


@dataclass(frozen=True, slots=True)
class EnebaOptions:
    """`[platforms.<name>]` keys only Eneba has. `base_url` is the GraphQL endpoint, `api_key`
    the auth id Eneba's representative gives, `secret` names the secret holding its auth
    secret (agent.config reads those)."""

    auctions: Mapping[str, str]  # Eneba auctionId -> our SKU
    callback_token_secret: str  # the Bearer value registered with P_registerCallback
    token_url: str = DEFAULT_TOKEN_URL
    client_id: str = DEFAULT_CLIENT_ID
    reserve_hours: float = DEFAULT_RESERVE_HOURS
    sweep_interval: float = DEFAULT_SWEEP_INTERVAL
    reconcile_after: float = DEFAULT_RECONCILE_AFTER
    update_spacing: float = DEFAULT_UPDATE_SPACING  # seconds between updates of one auction
    path: str = ""  # the callbacks' path on the listener; default /eneba/<platform name>
    skus: Mapping[str, str] = field(init=False)  # our SKU -> its auction

    def __post_init__(self) -> None:
        object.__setattr__(self, "skus", {sku: a for a, sku in self.auctions.items()})

    def secret_names(self) -> list[str]:
        """Secrets named besides the platform's `secret` (`kami-agent check` asks for them)."""
        return [self.callback_token_secret]


def _https(section: Section, key: str, url: str) -> None:
    parsed = urlparse(url)
    host = parsed.hostname or ""
    if parsed.scheme != "https" and host not in ("127.0.0.1", "localhost", "::1"):
        raise section.error(
            key,
            section._("must be an https:// URL (credentials travel in it), got %(value)r")
            % {"value": url},
        )


def parse_options(section: Section) -> EnebaOptions:
    """auctions = { "<auctionId>" = "<SKU>" } (one auction per SKU), callback_token (a
    secret's name), token_url, client_id, reserve_hours, sweep_interval, reconcile_after,
    update_spacing, path."""
    _ = section._
    base_url = section.data.get("base_url")
    if isinstance(base_url, str):
        _https(section, "base_url", base_url)
    token_url = section.url("token_url", DEFAULT_TOKEN_URL)
    _https(section, "token_url", token_url)
    auctions = section.table("auctions")
    if not auctions:
        raise section.error(
            "auctions",
            _('is required: map each Eneba auction to a SKU, auctions = { "<id>" = "<SKU>" }'),
        )
    seen: dict[str, str] = {}
    for auction, sku in auctions.items():
        if not isinstance(sku, str) or not sku.strip() or len(sku) > 128:
            raise section.error(
                f"auctions.{auction}", _("must name a SKU, got %(value)r") % {"value": sku}
            )
        if len(auction) > wire.MAX_ORDER_ID:
            raise section.error(f"auctions.{auction}", _("is not an Eneba auction id"))
        if sku in seen:
            # Both auctions would be told the whole count: together they would sell it twice.
            raise section.error(
                f"auctions.{auction}",
                _("SKU %(sku)r is already sold by auction %(auction)s")
                % {"sku": sku, "auction": seen[sku]},
            )
        seen[sku] = auction
    path = section.string("path", "/").rstrip("/")
    if path and (not path.startswith("/") or "?" in path or "{" in path):
        raise section.error(
            "path", _("must be a path starting with /, got %(value)r") % {"value": path}
        )
    return EnebaOptions(
        auctions=dict(auctions),
        callback_token_secret=section.secret_name("callback_token"),
        token_url=token_url,
        client_id=section.string("client_id", DEFAULT_CLIENT_ID),
        reserve_hours=section.number(
            "reserve_hours", DEFAULT_RESERVE_HOURS, minimum=0.0001, maximum=240, unit="hours"
        ),
        sweep_interval=section.number(
            "sweep_interval", DEFAULT_SWEEP_INTERVAL, minimum=0.05, maximum=3600, unit="seconds"
        ),
        reconcile_after=section.number(
            "reconcile_after", DEFAULT_RECONCILE_AFTER, minimum=0.05, maximum=86_400, unit="seconds"
        ),
        update_spacing=section.number(
            "update_spacing", DEFAULT_UPDATE_SPACING, minimum=0, maximum=3600, unit="seconds"
        ),
        path=path,
    )


def build(settings: PlatformSettings, secret: str, max_connections: int) -> EnebaPlatform:
    options = settings.options
    assert isinstance(options, EnebaOptions)
    token = resolve_secret(options.callback_token_secret)
    return EnebaPlatform(settings, options, secret, token, max_connections)


class EnebaApi:
    """Eneba's GraphQL API: a token by `grant_type=api_consumer` (authorization.md), then
    `Authorization: Bearer` on every query. Never follows a redirect (RestClient)."""

    def __init__(
        self,
        endpoint: str,
        token_url: str,
        client_id: str,
        auth_id: str,
        auth_secret: str,
        timeout: float,
        max_connections: int,
    ) -> None:
        self._endpoint = endpoint
        self._token_url = token_url
        self._client_id = client_id
        self._auth_id = auth_id
        self._auth_secret = auth_secret
        register(auth_secret)
        self._client = RestClient(timeout, max_connections)
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        if self._token is not None and time.monotonic() < self._renew_at:
            return self._token
        async with self._lock:
            if self._token is None or time.monotonic() >= self._renew_at:
                await self._fetch_token()
            assert self._token is not None
            return self._token

    async def _fetch_token(self) -> None:
        reply = await self._client.request(
            "POST",
            self._token_url,
            form={
                "grant_type": "api_consumer",
                "client_id": self._client_id,
                "id": self._auth_id,
                "secret": self._auth_secret,
            },
        )
        if 300 <= reply.status < 400:
            raise Permanent("Eneba's token endpoint redirects; redirects are never followed")
        if reply.status in (400, 401, 403):
            raise AuthFailed(f"Eneba refused the auth id/secret: {reply.message()}")
        if reply.status >= 300:
            raise Transient(f"Eneba token endpoint: {reply.message()}", reply.retry_after)
        body = reply.json()
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token or len(token) > 8192:
            raise BadResponse("Eneba's token endpoint answered without an access_token")
        lifetime = body.get("expires_in")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float):
            lifetime = 3600.0
        lifetime = max(60.0, min(float(lifetime), MAX_TOKEN_LIFETIME))
        register(token)
        self._token = token
        self._renew_at = time.monotonic() + lifetime - min(TOKEN_RENEW_BEFORE, lifetime / 2)
        log.info("eneba_token_renewed", token_fp=fingerprint(token), lifetime_s=lifetime)

    async def graphql(self, query: str, variables: Mapping[str, Any], *, changes: bool) -> Any:
        """The `data` of the answer. `changes`: the call changes something, so a lost
        answer or a 5xx leaves it unknown whether it took effect (Ambiguous)."""
        token = await self.token()
        reply = await self._client.request(
            "POST",
            self._endpoint,
            json_body={"query": query, "variables": dict(variables)},
            headers={"Authorization": f"Bearer {token}"},
        )
        return self._data(reply, token, changes)

    def _data(self, reply: Reply, token: str, changes: bool) -> Any:
        if 300 <= reply.status < 400:
            raise Permanent("Eneba's API redirects; redirects are never followed")
        if reply.status == 401:
            if self._token == token:
                self._token = None
            raise AuthFailed("Eneba refused the access token")
        if reply.status == 429:
            raise Transient(f"Eneba rate limit: {reply.message()}", reply.retry_after)
        if reply.status >= 500:
            if changes:
                raise Ambiguous(f"Eneba error, outcome unknown: {reply.message()}")
            raise Transient(f"Eneba error: {reply.message()}", reply.retry_after)
        if reply.status >= 400:
            raise Permanent(f"Eneba rejected the request: {reply.message()}")
        body = reply.json()
        if not isinstance(body, dict):
            raise BadResponse("Eneba answered something other than a JSON object")
        errors = body.get("errors")
        if errors:
            first = errors[0] if isinstance(errors, list) and errors else errors
            message = first.get("message") if isinstance(first, dict) else None
            text = " ".join(str(message or "GraphQL error").split())[:200]
            raise Permanent(f"Eneba refused the query: {text}")
        return body.get("data", body)

    async def close(self) -> None:
        await self._client.close()


class EnebaPlatform:
    def __init__(
        self,
        settings: PlatformSettings,
        options: EnebaOptions,
        secret: str,
        callback_token: str,
        max_connections: int = DEFAULT_CONNECTIONS,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`monotonic`: the clock spacing the auction updates (tests move it)."""
        self.name = settings.name
        self.options = options
        register(callback_token)
        self.callback_token = callback_token
        self.api = EnebaApi(
            settings.base_url,
            options.token_url,
            options.client_id,
            settings.api_key,
            secret,
            settings.timeout,
            max_connections,
        )
        self._monotonic = monotonic
        self._updated_at: dict[str, float] = {}  # auction -> when its last update was sent

    def __repr__(self) -> str:  # never a secret
        return f"EnebaPlatform({self.name})"

    # --- the Platform port: Eneba calls us, so most of it has nothing to do -------------
    async def list_paid(self, cursor: str | None) -> OrderPage:
        """Always empty: Eneba's orders arrive as calls to the listener (RESERVE), not by
        listing. The engine's poll finds nothing to do here."""
        return OrderPage(orders=[], next_cursor=cursor, has_more=False)

    async def wait_for_orders(self, cursor: str | None, wait_seconds: float) -> OrderPage:
        """Eneba offers no long poll."""
        raise Permanent("Eneba calls the listener; it offers no long poll")

    async def get_order(self, order_id: str) -> RemoteDelivery:
        """Eneba's word on an order's provision (P_declaredStockResult): `delivered` when
        COMPLETED, `failed` when FAILED, else `unknown`."""
        data = await self.api.graphql(
            wire.DECLARED_STOCK_RESULT, {"orderId": order_id}, changes=False
        )
        status = wire.provision_status(data)
        word = {"COMPLETED": "delivered", "FAILED": "failed"}.get(status or "", "unknown")
        return RemoteDelivery(status=word)

    async def deliver(
        self, order_id: str, idempotency_key: str, items: Sequence[CardItem], message: str
    ) -> None:
        """Never called: Eneba takes keys only in the reply to its PROVIDE."""
        raise Permanent("Eneba takes keys only in the listener's reply to PROVIDE")

    async def notice(self, order_id: str, message: str, idempotency_key: str | None = None) -> None:
        """Eneba has no message to the buyer."""
        raise Permanent("Eneba has no buyer messages")

    async def refund(self, order_id: str, idempotency_key: str, reason: str) -> None:
        """Eneba refunds by its own process (a failed PROVIDE cancels the order)."""
        raise Permanent("Eneba refunds its buyers itself")

    async def ping(self) -> None:
        """An access token is had: the auth id and secret are good."""
        await self.api.token()

    async def close(self) -> None:
        await self.api.close()

    # --- StockPublisher: the auction's declared stock ----------------------------------------
    async def publish_stock(self, sku: str, available: int) -> None:
        """S_updateAuction(declaredStock: available) on the SKU's auction (absolute: a
        repeat is harmless). A count of 0 keeps the feature on with nothing to sell (null
        would turn it off). Eneba takes one update of an auction per `update_spacing`: one
        asked sooner is not sent but raised Transient with the wait, and the stock sync sends
        its latest count then (a refused update would cost a failure and tell nothing)."""
        auction = self.options.skus.get(sku)
        if auction is None:
            raise StockNotOffered(f"no Eneba auction sells {sku}", sku=sku)
        now = self._monotonic()
        last = self._updated_at.get(auction)
        wait = 0.0 if last is None else last + self.options.update_spacing - now
        if wait > 0:
            raise Held(
                f"Eneba takes one update of auction {auction} every"
                f" {self.options.update_spacing:g} s; the next in {wait:.1f} s",
                retry_after=wait,
            )
        # Counted from the sending: an update whose answer is lost may have been taken.
        self._updated_at[auction] = now
        await self.api.graphql(
            wire.UPDATE_AUCTION, {"id": auction, "declaredStock": max(0, available)}, changes=True
        )

    # --- the listener's side -----------------------------------------------------------------
    def auction_lines(self, handed: Sequence[Handed]) -> list[tuple[str, Sequence[CardItem]]]:
        return [(self.options.skus[h.line.sku], h.items) for h in handed]


def _refused(reason: str) -> Outbound:
    return Outbound(401, b"", outcome="refused")


class EnebaResponder:
    """Answers Eneba's callbacks from the ledger (agent/store/ledger/responder.py)."""

    def __init__(self, platform: EnebaPlatform, context: ListenerContext) -> None:
        self.platform = platform
        self.name = platform.name
        self.store = context.store
        self.clock = context.clock

    async def handle(self, inbound: Inbound) -> Outbound:
        try:
            call = wire.parse_callback(inbound.body)
        except wire.WireError as exc:
            return Outbound(400, wire.bad_request(str(exc)), outcome="refused")
        # A retry this process answered before: from memory. Else the ledger call, which
        # replays a reply stored earlier (another agent's, or before a restart) itself.
        reply = self.store.cached_reply(self.name, call.order_id, call.action)
        if reply is None:
            reply = await self._answer(call)
        return Outbound(
            reply.status,
            reply.body,
            order_id=call.order_id,
            action=call.action,
            outcome="replayed" if reply.replayed else "answered",
        )

    async def _answer(self, call: wire.Callback) -> Any:
        now = self.clock()
        order = call.order_id
        if call.action == "RESERVE":
            skus = self.platform.options.auctions
            unknown = [a.auction_id for a in call.auctions if a.auction_id not in skus]
            wants = [
                Want(skus[a.auction_id], a.key_count, a.amount, a.currency)
                for a in call.auctions
                if not unknown
            ]
            if unknown:
                log.warning("eneba_unknown_auction", order_id=order, auctions=len(unknown))
            return await self.store.reserve(
                self.name, order, wants, now, lambda ok: (200, wire.reserve_reply(order, ok))
            )
        if call.action == "PROVIDE":

            def provided(handed: Sequence[Handed]) -> tuple[int, bytes]:
                return 200, wire.provide_reply(order, self.platform.auction_lines(handed))

            return await self.store.provide(self.name, order, now, provided)

        def cancelled(outcome: Cancelled) -> tuple[int, bytes]:
            log.info("eneba_cancel", order_id=order, outcome=outcome.value)
            return 200, wire.cancel_reply(order)

        return await self.store.cancel_order(
            self.name, order, "Eneba cancelled the order", now, cancelled
        )

    # --- jobs ---------------------------------------------------------------------------------
    async def release_unpaid(self) -> int:
        now = self.clock()
        cutoff = now - self.platform.options.reserve_hours * 3600
        released = int(await self.store.release_expired(self.name, cutoff, now))
        if released:
            log.info("eneba_reservations_released", platform=self.name, lines=released)
        return released

    async def reconcile(self) -> int:
        """Provided lines old enough are confirmed from Eneba's P_declaredStockResult."""
        now = self.clock()
        lines = await self.store.lines_in(
            self.name,
            LineState.PROVIDED,
            now - self.platform.options.reconcile_after,
            RECONCILE_BATCH,
        )
        confirmed = 0
        for order_id in dict.fromkeys(line.order_id for line in lines):
            try:
                remote = await self.platform.get_order(order_id)
            except (Transient, Ambiguous, Permanent) as exc:
                log.warning("eneba_reconcile_failed", order_id=order_id, error=str(exc))
                continue
            mine = [line for line in lines if line.order_id == order_id]
            if remote.status == "delivered":
                for line in mine:
                    await self.store.handed_over(line.id, "Eneba: provision COMPLETED", now)
                confirmed += len(mine)
            elif remote.status == "failed":
                for line in mine:
                    await self.store.park(
                        line.id,
                        "Eneba reports the provision FAILED after our reply carried the keys:"
                        " check P_declaredStockResult before using them again",
                        now,
                    )
        return confirmed


def listener_routes(platform: EnebaPlatform, context: ListenerContext) -> Mount:
    """POST <path> (default /eneba/<name>) for RESERVE, PROVIDE and CANCEL alike, with the
    Bearer value registered for the callbacks; the sweep of unpaid reservations and the
    reconciliation of handed-out ones."""
    responder = EnebaResponder(platform, context)
    path = platform.options.path or f"/eneba/{platform.name}"
    route = Route(
        platform.name,
        "POST",
        path,
        BearerAuth(platform.callback_token, _refused),
        responder.handle,
    )
    interval = platform.options.sweep_interval
    return Mount(
        routes=[route],
        jobs=[
            Job(f"{platform.name}:release", interval, responder.release_unpaid),
            Job(f"{platform.name}:reconcile", interval, responder.reconcile),
        ],
    )
