"""dujiao-next's site-integration API on the wire, as the upstream site answers it (kami-agent
is the supplier a dujiao-next shop buys from).

From dujiao-next/document docs/en/api/integration-open-api.md and the shop's own client
(dujiao-next internal/upstream/adapter.go, dujiao_next.go, signer.go; the upstream side in
internal/modules/upstreamapi/transport/http/upstream_order.go); docs/platforms/dujiao-next.md
lists what each says and what stays uncertain. Every answer is a JSON object with `ok`;
a failure carries `error_code` and `error_message`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from agent import safejson
from agent.domain import CardItem
from agent.storable import identifier

HEADERS = ("Dujiao-Next-Api-Key", "Dujiao-Next-Timestamp", "Dujiao-Next-Signature")
MAX_SKEW = 60.0  # seconds, either way (signer.go: MaxTimestampSkew)
PROTOCOL_VERSION = "1.0"
# What a callback is signed over, wherever the shop's callback URL points (the shop's
# HandleCallback verifies this path; dujiao-next's SendCallback signs it).
CALLBACK_PATH = "/api/v1/upstream/callback"
# The callback's event for a delivered order, as dujiao-next's own sender names it
# (DownstreamCallbackService.SendCallback: "order.fulfilled", else "order.status_changed").
DELIVERED_EVENT = "order.fulfilled"
MAX_ORDER_NO = 64
MAX_QUANTITY = 1000
MAX_URL = 1024
LOW_STOCK = 20  # 1..20 is low_stock, more is in_stock (the stock status reference)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class WireError(ValueError):
    """A request we do not take; the text is safe to send back and to log."""


@dataclass(frozen=True, slots=True)
class Product:
    """One configured product: the shop orders it by `id` (product and SKU share it)."""

    id: int
    sku: str
    price: Decimal
    title: str


@dataclass(frozen=True, slots=True)
class OrderRequest:
    sku_id: int
    quantity: int
    downstream_order_no: str
    callback_url: str


def encode(value: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode(value).encode()


def error(code: str, message: str) -> bytes:
    return encode({"ok": False, "error_code": code, "error_message": message})


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def money(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.01'))}"


def parse_order(body: bytes) -> OrderRequest:
    try:
        data = safejson.loads(body)
    except (safejson.JsonError, UnicodeDecodeError, ValueError):
        raise WireError("invalid request body: not JSON") from None
    if not isinstance(data, dict):
        raise WireError("invalid request body: not a JSON object")
    sku_id, quantity = data.get("sku_id"), data.get("quantity")
    if isinstance(sku_id, bool) or not isinstance(sku_id, int) or sku_id < 1:
        raise WireError("sku_id is required")
    if (
        isinstance(quantity, bool)
        or not isinstance(quantity, int)
        or not 0 < quantity <= MAX_QUANTITY
    ):
        raise WireError(f"quantity must be from 1 to {MAX_QUANTITY}")
    order_no = data.get("downstream_order_no")
    if (
        not isinstance(order_no, str)
        or not 0 < len(order_no) <= MAX_ORDER_NO
        or not identifier(order_no)
    ):
        # Without it a repeated request would be a second order: this supplier requires it.
        raise WireError("downstream_order_no is required (1-64 printable characters)")
    url = data.get("callback_url") or ""
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise WireError("callback_url must be a URL")
    return OrderRequest(sku_id, quantity, order_no, url)


def stock_status(available: int) -> str:
    if available <= 0:
        return "out_of_stock"
    return "low_stock" if available <= LOW_STOCK else "in_stock"


def product(p: Product, available: int, currency: str, updated: float) -> dict[str, Any]:
    title = {"zh-CN": p.title, "en": p.title}
    price = money(p.price)
    return {
        "id": p.id,
        "slug": f"kami-{p.id}",
        "title": title,
        "description": {},
        "content": {},
        "seo_meta": {},
        "images": [],
        "tags": [],
        "price_amount": price,
        "currency": currency,
        "fulfillment_type": "auto",
        "manual_form_schema": None,
        "is_active": True,
        "category_id": 0,
        "skus": [
            {
                "id": p.id,
                "sku_code": p.sku,
                "spec_values": {},
                "price_amount": price,
                "stock_status": stock_status(available),
                "stock_quantity": max(0, available),
                "is_active": True,
            }
        ],
        "created_at": iso(updated),
        "updated_at": iso(updated),
    }


def order_no(line_id: int) -> str:
    return f"KAMI{line_id:010d}"


def created(line_id: int, amount: str, currency: str) -> bytes:
    return encode(
        {
            "ok": True,
            "order_id": line_id,
            "order_no": order_no(line_id),
            "status": "paid",
            "amount": amount,
            "currency": currency,
        }
    )


def payload(items: Sequence[CardItem]) -> str:
    """The keys as the shop shows them: one a line, the card number before the secret."""
    return "\n".join(f"{i.code} {i.secret}" if i.code else i.secret for i in items)


def fulfillment(items: Sequence[CardItem], delivered_at: float) -> dict[str, Any]:
    return {
        "type": "auto",
        "status": "delivered",
        "payload": payload(items),
        "delivery_data": None,
        "delivered_at": iso(delivered_at),
    }


def order_detail(
    line_id: int,
    status: str,
    p: Product,
    quantity: int,
    amount: str,
    currency: str,
    items: Sequence[CardItem],
    handed_at: float,
) -> bytes:
    detail: dict[str, Any] = {
        "ok": True,
        "order_id": line_id,
        "order_no": order_no(line_id),
        "status": status,
        "amount": amount,
        "currency": currency,
        "items": [
            {
                "product_id": p.id,
                "sku_id": p.id,
                "title": {"zh-CN": p.title, "en": p.title},
                "quantity": quantity,
                "unit_price": money(p.price),
                "total_price": amount,
                "fulfillment_type": "auto",
            }
        ],
    }
    if status == "delivered" and items:
        detail["fulfillment"] = fulfillment(items, handed_at)
    return encode(detail)


def callback(line_id: int, downstream_order_no: str, items: Sequence[CardItem], at: float) -> bytes:
    """The callback's body (section 5.1: event, order_id, order_no, downstream_order_no,
    status, fulfillment, timestamp)."""
    return encode(
        {
            "event": DELIVERED_EVENT,
            "order_id": line_id,
            "order_no": order_no(line_id),
            "downstream_order_no": downstream_order_no,
            "status": "delivered",
            "fulfillment": fulfillment(items, at),
            "timestamp": int(at),
        }
    )


def acknowledged(body: bytes) -> bool:
    """The shop's answer to a callback says it took it: {"ok": true, ...}."""
    try:
        data = safejson.loads(body)
    except (safejson.JsonError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("ok") is True
