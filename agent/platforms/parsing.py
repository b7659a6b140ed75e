"""Turns platform JSON into domain values; anything odd becomes a RejectedOrder with a reason."""

from __future__ import annotations

from typing import Any

from agent.domain import CardItem, OrderPage, PlatformOrder, RejectedOrder, RemoteDelivery
from agent.reasons import (
    FIELD_UNSTORABLE,
    INVALID_QUANTITY,
    INVALID_SKU,
    INVALID_STATUS,
    ORDER_ID_CONTROL,
    QUANTITY_ABSURD,
    QUANTITY_BELOW_ONE,
    SKU_UNSTORABLE,
    english,
)
from agent.storable import identifier, storable

MAX_ID_LENGTH = 128
MAX_TEXT_LENGTH = 512
# Far beyond any real order; anything larger is treated as garbage, not as a big order.
ABSURD_QUANTITY = 1_000_000


class ParseError(ValueError):
    """The response as a whole is not what the protocol promises."""


def _short(value: Any, limit: int = 60) -> str:
    """A value as a reason shows it: escaped (repr), cut short. An array or object by its
    size alone: walking a hostile one again (repr) could be as costly as reading it."""
    if isinstance(value, list):
        return f"<array of {len(value)} items>"
    if isinstance(value, dict):
        return f"<object of {len(value)} members>"
    if isinstance(value, str):
        value = value[:limit]
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _optional_text(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if isinstance(value, str) and len(value) <= MAX_TEXT_LENGTH:
        return value
    return None


def parse_order(raw: Any) -> PlatformOrder | RejectedOrder | None:
    """None when the entry has no usable id at all (it cannot even be parked)."""
    parsed = _parse_order(raw)
    return None if isinstance(parsed, str) else parsed


def _parse_order(raw: Any) -> PlatformOrder | RejectedOrder | str:
    """The order, its rejection, or (a str) why the entry cannot even be parked: it has no
    order id a ledger could store."""
    if not isinstance(raw, dict):
        return f"an entry that is not an object: {_short(raw)}"
    order_id = raw.get("id")
    if isinstance(order_id, int) and not isinstance(order_id, bool):
        order_id = str(order_id)
    if not isinstance(order_id, str) or not order_id or len(order_id) > MAX_ID_LENGTH:
        return f"no usable order id: {_short(order_id)}"
    if not storable(order_id):
        return f"order id {_short(order_id)} holds characters no ledger can store"
    if not identifier(order_id):
        return RejectedOrder(order_id, english(ORDER_ID_CONTROL, id=_short(order_id)))
    sku = raw.get("sku")
    if not isinstance(sku, str) or not sku or len(sku) > MAX_ID_LENGTH:
        clipped = sku[:MAX_ID_LENGTH] if isinstance(sku, str) else ""
        return RejectedOrder(
            order_id,
            english(INVALID_SKU, sku=_short(sku)),
            sku=clipped if identifier(clipped) else "",
        )
    if not identifier(sku):
        reason = english(SKU_UNSTORABLE, sku=_short(sku))
        return RejectedOrder(order_id, reason)
    quantity = raw.get("quantity")
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        return RejectedOrder(
            order_id, english(INVALID_QUANTITY, quantity=_short(quantity)), sku=sku
        )
    if quantity < 1:
        return RejectedOrder(order_id, english(QUANTITY_BELOW_ONE, quantity=quantity), sku=sku)
    if quantity > ABSURD_QUANTITY:
        return RejectedOrder(order_id, english(QUANTITY_ABSURD, quantity=_short(quantity)), sku=sku)
    status = raw.get("status")
    if not isinstance(status, str):
        return RejectedOrder(order_id, english(INVALID_STATUS, status=_short(status)), sku=sku)
    buyer = raw.get("buyer")
    contact = _optional_text(buyer, "contact") if isinstance(buyer, dict) else None
    paid_at, amount = _optional_text(raw, "paid_at"), _optional_text(raw, "amount")
    currency, deliver_by = _optional_text(raw, "currency"), _optional_text(raw, "deliver_by")
    # One check for all (None reads as "None"); which one failed is looked for only then.
    if not storable(f"{contact}{paid_at}{amount}{currency}{deliver_by}"):
        texts = {
            "buyer contact": contact,
            "paid_at": paid_at,
            "amount": amount,
            "currency": currency,
            "deliver_by": deliver_by,
        }
        name, text = next((n, t) for n, t in texts.items() if t is not None and not storable(t))
        reason = english(FIELD_UNSTORABLE, field=name, value=_short(text))
        return RejectedOrder(order_id, reason, sku=sku, quantity=quantity)
    return PlatformOrder(
        order_id=order_id,
        status=status,
        sku=sku,
        quantity=quantity,
        paid_at=paid_at,
        amount=amount,
        currency=currency,
        buyer_contact=contact,
        deliver_by=deliver_by,
    )


def parse_order_page(body: Any) -> OrderPage:
    if not isinstance(body, dict) or not isinstance(body.get("orders"), list):
        raise ParseError("order list response has no 'orders' array")
    next_cursor = body.get("next_cursor")
    if next_cursor is not None and not (isinstance(next_cursor, str) and storable(next_cursor)):
        raise ParseError(f"next_cursor must be a string, got {_short(next_cursor)}")
    has_more = body.get("has_more", False)
    if not isinstance(has_more, bool):
        raise ParseError(f"has_more must be a boolean, got {_short(has_more)}")
    orders: list[PlatformOrder | RejectedOrder] = []
    ignored: list[str] = []
    for raw in body["orders"]:
        parsed = _parse_order(raw)
        if isinstance(parsed, str):
            ignored.append(parsed)
        else:
            orders.append(parsed)
    return OrderPage(orders, next_cursor or None, has_more, len(ignored), tuple(ignored))


def parse_items(raw: Any) -> tuple[CardItem, ...]:
    if not isinstance(raw, list):
        raise ParseError("items must be an array")
    items = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise ParseError("each item must be an object")
        code, secret = entry.get("code", ""), entry.get("secret")
        if not isinstance(code, str) or not isinstance(secret, str):
            raise ParseError("item code and secret must be strings")
        items.append(CardItem(code=code, secret=secret))
    return tuple(items)


def parse_remote_order(body: Any) -> RemoteDelivery:
    if not isinstance(body, dict) or not isinstance(body.get("status"), str):
        raise ParseError("order response has no status")
    delivery = body.get("delivery")
    items: tuple[CardItem, ...] = ()
    if isinstance(delivery, dict) and "items" in delivery:
        items = parse_items(delivery["items"])
    content = _parse_order(body)  # the order as it stands: for a retry of a parked order
    order = None if isinstance(content, str) else content
    return RemoteDelivery(status=body["status"], items=items, order=order)
