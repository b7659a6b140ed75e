"""A local fake of Eneba for the declared-stock feature, built from its documentation and
written independently of the adapter (no imports from agent.platforms.eneba): it plays Eneba
*calling the merchant*, and serves the API the merchant calls.

Sources (docs/platforms/eneba.md says what each one says):
- HelisLT/eneba-client docs/howto/declared-stock.md: RESERVE is one call (60 s timeout);
  PROVIDE is 3 attempts with a 5 s sleep (60 s timeout each), a final failure cancels the
  order; CANCEL is 2 attempts with a 5 s sleep; every call carries `Authorization: Bearer`
  with the value registered for the callback; the payloads and replies;
- api.eneba.com/documentation/guide/cancellation-flow: a CANCEL after PROVIDE answered 200
  means the keys are deleted;
- docs/howto/declared-stock-result.md: P_declaredStockResult lists each callback's requests
  and their responses, with a status per callback type (COMPLETED, FAILED, ...);
- docs/howto/authorization.md: POST /oauth/token grant_type=api_consumer, client_id, id,
  secret -> access_token, expires_in; docs/API.md: S_updateAuction(input: {id,
  declaredStock}) -> actionId;
- api.eneba.com/documentation/api-reference/mutation/s-update-auction: "This mutation is
  rate-limited. You can update each auction only once every 30 seconds" (45 in another
  version of the page): `update_every`; an update sooner is refused, as a GraphQL error
  (how Eneba words that refusal is not documented);
- money is an Int of cents (guide/purchasing-keys: "1500 -> EUR 15.00"): RESERVE's
  `price.amount` is the price of one key in cents (`price_cents`).

What the documents leave open is modelled the simple way: a reply is a success when it is
HTTP 200 with `"success": true` and the shape above; anything else (a refused connection, a
timeout, a 5xx, a malformed body) is a failed attempt. The sleep between attempts is `gap`
(tests scale Eneba's 5 s down).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from tests.loopback import serve

PROVISION = "DECLARED_STOCK_PROVISION"
RESERVATION = "DECLARED_STOCK_RESERVATION"
CANCELLATION = "DECLARED_STOCK_CANCELLATION"


@dataclass
class Attempt:
    at: float
    status: int  # 0: no HTTP answer (refused, timed out, broken)
    body: bytes


@dataclass
class EnebaOrder:
    order_id: str
    auctions: list[tuple[str, int]]
    calls: dict[str, list[Attempt]] = field(default_factory=dict)
    results: dict[str, str] = field(default_factory=dict)  # callback type -> COMPLETED/FAILED
    keys: dict[str, list[str]] | None = None  # what Eneba took from the PROVIDE reply


class FakeEneba:
    def __init__(
        self,
        callback_token: str,
        auth_id: str,
        auth_secret: str,
        *,
        gap: float = 5.0,
        timeout: float = 60.0,
        client_id: str = "917611c2-70a5-11e9-97c4-46691b78bfa2",
        update_every: float = 30.0,
        price_cents: int = 1999,
    ) -> None:
        self.callback_token = callback_token
        self.auth_id = auth_id
        self.auth_secret = auth_secret
        self.client_id = client_id
        self.gap = gap
        self.timeout = timeout
        self.update_every = update_every
        self.price_cents = price_cents
        self.monotonic = time.monotonic  # the clock of update_every (tests may move it)
        self.updated_at: dict[str, float] = {}  # auction -> monotonic time of its last update
        self.refused_updates = 0  # S_updateAuction calls sooner than update_every
        self.callback_url = ""
        self.orders: dict[str, EnebaOrder] = {}
        self.declared: dict[str, int | None] = {}  # auction -> last declaredStock
        self.declared_log: list[tuple[str, int | None]] = []
        self.tokens: set[str] = set()
        self.graphql_calls = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.base_url = ""

    # --- the API the merchant calls ----------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        app.router.add_post("/graphql", self._graphql)
        self._runner, self.base_url = await serve(app, access_log=None)
        self._session = aiohttp.ClientSession()

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if (
            form.get("grant_type") != "api_consumer"
            or form.get("client_id") != self.client_id
            or form.get("id") != self.auth_id
            or form.get("secret") != self.auth_secret
        ):
            return web.json_response({"error": "invalid_client"}, status=401)
        token = secrets.token_hex(16)
        self.tokens.add(token)
        return web.json_response(
            {"access_token": token, "expires_in": 2505600, "token_type": "Bearer"}
        )

    async def _graphql(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            return web.json_response({"error": "unauthorized"}, status=401)
        self.graphql_calls += 1
        body = await request.json()
        query, variables = body.get("query", ""), body.get("variables") or {}
        if "S_updateAuction" in query:
            auction = variables.get("id")
            stock = variables.get("declaredStock")
            if not isinstance(auction, str):
                return web.json_response({"errors": [{"message": "id is required"}]})
            now = self.monotonic()
            last = self.updated_at.get(auction)
            if last is not None and now - last < self.update_every:
                self.refused_updates += 1
                message = f"You can update each auction only once every {self.update_every:g} s"
                return web.json_response({"errors": [{"message": message}]})
            self.updated_at[auction] = now
            self.declared[auction] = stock
            self.declared_log.append((auction, stock))
            return web.json_response(
                {"data": {"S_updateAuction": {"actionId": secrets.token_hex(8)}}}
            )
        if "P_declaredStockResult" in query:
            order = self.orders.get(str(variables.get("orderId")))
            results = []
            if order is not None:
                for kind, attempts in order.calls.items():
                    results.append(
                        {
                            "status": order.results.get(kind, "RETRYING"),
                            "type": kind,
                            "callbackRequests": [
                                {
                                    "createdAt": _iso(a.at),
                                    "callbackResponse": {"status": str(a.status)},
                                }
                                for a in attempts
                            ],
                        }
                    )
            return web.json_response(
                {"data": {"P_declaredStockResult": {"callbackResults": results}}}
            )
        return web.json_response({"errors": [{"message": "unknown query"}]})

    # --- Eneba calling the merchant ----------------------------------------------------------
    async def _call(self, order: EnebaOrder, kind: str, payload: dict[str, Any]) -> Attempt:
        assert self._session is not None
        started = time.time()
        try:
            async with self._session.post(
                self.callback_url,
                data=json.dumps(payload).encode(),
                headers={
                    "Authorization": f"Bearer {self.callback_token}",
                    "Content-Type": "application/json",
                },
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as resp:
                attempt = Attempt(started, resp.status, await resp.read())
        except (aiohttp.ClientError, TimeoutError):
            attempt = Attempt(started, 0, b"")
        order.calls.setdefault(kind, []).append(attempt)
        return attempt

    def _order(self, order_id: str, auctions: Sequence[tuple[str, int]] = ()) -> EnebaOrder:
        return self.orders.setdefault(order_id, EnebaOrder(order_id, list(auctions)))

    @staticmethod
    def _ok(attempt: Attempt, action: str, order_id: str) -> dict[str, Any] | None:
        if attempt.status != 200:
            return None
        try:
            body = json.loads(attempt.body)
        except ValueError:
            return None
        if (
            not isinstance(body, dict)
            or body.get("action") != action
            or body.get("orderId") != order_id
            or body.get("success") is not True
        ):
            return None
        return body

    async def reserve(self, order_id: str, auctions: Sequence[tuple[str, int]]) -> bool:
        """One call; True when the merchant can fulfil the whole reservation."""
        order = self._order(order_id, auctions)
        payload = {
            "action": "RESERVE",
            "orderId": order_id,
            "auctions": [
                {
                    "auctionId": a,
                    "keyCount": n,
                    "price": {"amount": self.price_cents, "currency": "EUR"},
                }
                for a, n in auctions
            ],
        }
        ok = self._ok(await self._call(order, RESERVATION, payload), "RESERVE", order_id)
        order.results[RESERVATION] = "COMPLETED" if ok else "FAILED"
        return ok is not None

    async def provide(self, order_id: str) -> dict[str, list[str]] | None:
        """Up to 3 attempts `gap` apart; the keys per auction, or None after the last failed
        (and then the order is cancelled, as Eneba does)."""
        order = self._order(order_id)
        for attempt_no in range(3):
            if attempt_no:
                await asyncio.sleep(self.gap)
            attempt = await self._call(order, PROVISION, {"action": "PROVIDE", "orderId": order_id})
            body = self._ok(attempt, "PROVIDE", order_id)
            keys = _keys(body, order) if body is not None else None
            if keys is not None:
                order.results[PROVISION] = "COMPLETED"
                order.keys = keys
                return keys
        order.results[PROVISION] = "FAILED"
        await self.cancel(order_id)
        return None

    async def cancel(self, order_id: str) -> bool:
        """Up to 2 attempts `gap` apart; True when one was answered 200."""
        order = self._order(order_id)
        for attempt_no in range(2):
            if attempt_no:
                await asyncio.sleep(self.gap)
            attempt = await self._call(
                order, CANCELLATION, {"action": "CANCEL", "orderId": order_id}
            )
            if attempt.status == 200:
                order.results[CANCELLATION] = "COMPLETED"
                return True
        order.results[CANCELLATION] = "FAILED"
        return False


def _iso(ts: float) -> str:
    """A time as declared-stock-result.md shows it: 2021-01-01T01:01:00+00:00."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _keys(body: dict[str, Any], order: EnebaOrder) -> dict[str, list[str]] | None:
    """The keys per auction of a PROVIDE reply, when it holds exactly what was reserved."""
    auctions = body.get("auctions")
    if not isinstance(auctions, list):
        return None
    found: dict[str, list[str]] = {}
    for entry in auctions:
        keys = entry.get("keys") if isinstance(entry, dict) else None
        if not isinstance(keys, list) or not all(
            isinstance(k, dict) and k.get("type") == "TEXT" and isinstance(k.get("value"), str)
            for k in keys
        ):
            return None
        found.setdefault(str(entry.get("auctionId")), []).extend(k["value"] for k in keys)
    if order.auctions and sorted((a, len(found.get(a, []))) for a, _ in order.auctions) != sorted(
        order.auctions
    ):
        return None
    return found
