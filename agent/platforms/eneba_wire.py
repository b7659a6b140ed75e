"""Eneba's declared stock on the wire: the callbacks Eneba sends (RESERVE, PROVIDE, CANCEL),
the replies we answer with, and the GraphQL documents of the calls we make.

From HelisLT/eneba-client docs/howto/declared-stock.md and api.eneba.com/documentation
(docs/platforms/eneba.md lists what each says and what stays uncertain):

    RESERVE {"action": "RESERVE", "orderId": Uuid,
             "auctions": [{"auctionId": Uuid, "keyCount": Int,
                           "price": {"amount": Int, "currency": String}}]}
        -> 200 {"action": "RESERVE", "orderId": ..., "success": true}
    PROVIDE {"action": "PROVIDE", "orderId": Uuid}
        -> 200 {"action": "PROVIDE", "orderId": ..., "success": true,
                "auctions": [{"auctionId": ..., "keys": [{"type": "TEXT", "value": ...}]}]}
    CANCEL  {"action": "CANCEL", "orderId": Uuid} -> 200 (no body expected)

Money is an Int of cents, as everywhere in Eneba's API (api.eneba.com/documentation/guide/
purchasing-keys: "Price amounts are returned in cents — divide by 100 ... 1500 -> EUR 15.00";
S_updateAuction's example price {amount: 1399, currency: "EUR"}). The ledger keeps amounts in
currency units ("13.99"), a line's amount being its total: the price per key times keyCount.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent import safejson
from agent.domain import CardItem
from agent.storable import identifier

ACTIONS = ("RESERVE", "PROVIDE", "CANCEL")
MAX_ORDER_ID = 64  # a UUID is 36
MAX_AUCTIONS = 50
MAX_KEYS = 1000  # keys one auction line may ask for
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

UPDATE_AUCTION = (
    "mutation kamiDeclaredStock($id: S_Uuid!, $declaredStock: Int) {"
    " S_updateAuction(input: {id: $id, declaredStock: $declaredStock}) { actionId } }"
)
DECLARED_STOCK_RESULT = (
    "query kamiDeclaredStockResult($orderId: P_Uuid!) {"
    " P_declaredStockResult(orderId: $orderId) {"
    " callbackResults { status type callbackRequests { createdAt"
    " callbackResponse { status } failureReason { reason } } } } }"
)
PROVISION = "DECLARED_STOCK_PROVISION"


class WireError(ValueError):
    """A callback we cannot read; the reason is safe to log (no body, no key)."""


MAX_CENTS = 10**11  # a price per key beyond a billion euros is not one


@dataclass(frozen=True, slots=True)
class AuctionWant:
    auction_id: str
    key_count: int
    amount: str | None  # the line's total in currency units ("27.98"), from cents
    currency: str | None
    cents: int | None = None  # the line's total in cents, as Eneba counts


def _cents(value: Any) -> int | None:
    """An Int of cents as Eneba sends it; None for anything else (a fraction, a negative,
    text that is not digits)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CENTS:
        return None
    return value


def money(cents: int) -> str:
    """Cents as the ledger's amount in currency units: 1399 -> "13.99"."""
    return f"{cents // 100}.{cents % 100:02d}"


@dataclass(frozen=True, slots=True)
class Callback:
    action: str
    order_id: str
    auctions: tuple[AuctionWant, ...] = ()


def _text_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ORDER_ID or not identifier(value):
        raise WireError(f"{what} is not an id")
    return value


def parse_callback(body: bytes) -> Callback:
    """The callback in `body`; WireError when it is not one we take."""
    try:
        data = safejson.loads(body)
    except (safejson.JsonError, UnicodeDecodeError, ValueError):
        raise WireError("body is not JSON") from None
    if not isinstance(data, dict):
        raise WireError("body is not a JSON object")
    action = data.get("action")
    if action not in ACTIONS:
        raise WireError("unknown action")
    order_id = _text_id(data.get("orderId"), "orderId")
    if action != "RESERVE":
        return Callback(action, order_id)
    auctions = data.get("auctions")
    if not isinstance(auctions, list) or not 0 < len(auctions) <= MAX_AUCTIONS:
        raise WireError("auctions is not a list of 1 to 50")
    counts: dict[str, AuctionWant] = {}
    for entry in auctions:
        if not isinstance(entry, dict):
            raise WireError("an auction is not an object")
        auction = _text_id(entry.get("auctionId"), "auctionId")
        count = entry.get("keyCount")
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= MAX_KEYS:
            raise WireError("keyCount is not a whole number from 1 to 1000")
        price = entry.get("price")
        total = currency = None
        if isinstance(price, dict):
            per_key, raw_currency = _cents(price.get("amount")), price.get("currency")
            total = None if per_key is None else per_key * count
            if isinstance(raw_currency, str) and identifier(raw_currency):
                currency = raw_currency[:8]
        earlier = counts.get(auction)
        if earlier is not None:  # the same auction twice: one line for both
            count += earlier.key_count
            if count > MAX_KEYS:
                raise WireError("keyCount is not a whole number from 1 to 1000")
            if earlier.cents is None or total is None or earlier.currency != currency:
                total = currency = None  # priced apart, or not at all: no amount
            else:
                total += earlier.cents
        amount = None if total is None else money(total)
        counts[auction] = AuctionWant(auction, count, amount, currency, total)
    return Callback(action, order_id, tuple(counts.values()))


def encode(value: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode(value).encode()


def reserve_reply(order_id: str, success: bool) -> bytes:
    return encode({"action": "RESERVE", "orderId": order_id, "success": success})


def key_value(item: CardItem) -> str:
    """One key as the TEXT value Eneba shows the buyer: the card number and the secret on
    lines of their own when it has both."""
    return f"{item.code}\n{item.secret}" if item.code else item.secret


def provide_reply(order_id: str, auctions: Sequence[tuple[str, Sequence[CardItem]]]) -> bytes:
    """The keys per auction; no auctions: a refusal (nothing to hand out)."""
    if not auctions:
        return encode({"action": "PROVIDE", "orderId": order_id, "success": False})
    return encode(
        {
            "action": "PROVIDE",
            "orderId": order_id,
            "success": True,
            "auctions": [
                {
                    "auctionId": auction,
                    "keys": [{"type": "TEXT", "value": key_value(item)} for item in items],
                }
                for auction, items in auctions
            ],
        }
    )


def cancel_reply(order_id: str) -> bytes:
    return encode({"action": "CANCEL", "orderId": order_id, "success": True})


def bad_request(reason: str) -> bytes:
    return encode({"success": False, "error": reason})


def provision_status(data: Any) -> str | None:
    """The status of the PROVISION callback in a P_declaredStockResult answer (COMPLETED,
    FAILED, RETRYING, ...), or None when it lists none."""
    if not isinstance(data, dict):
        return None
    result = data.get("P_declaredStockResult", data.get("declaredStockResult"))
    if not isinstance(result, dict):
        return None
    for entry in result.get("callbackResults") or ():
        if isinstance(entry, dict) and entry.get("type") == PROVISION:
            status = entry.get("status")
            return status if isinstance(status, str) else None
    return None
