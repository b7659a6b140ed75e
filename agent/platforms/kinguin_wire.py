"""Kinguin's JSON into domain values, and back. Pure functions; no I/O.

Field names follow the Sales Manager API OpenAPI copy (ReservationRepresentationModel,
PagedReservationRepresentationModel, StockRepresentationModel, PagedModelStockRepresentation-
Model). Every filter the adapter asks the server for is checked again here: a server that
ignored a filter must not make us act on another reservation's data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.domain import CardItem, Permanent, PlatformOrder, RejectedOrder

# "If the merchant fails to deliver within 15 minutes, the order is canceled."
DELIVERY_WINDOW = timedelta(minutes=15)
# The status of a reservation Kinguin could not fill from uploaded stock: ours to fill now.
INTAKE_STATUS = "OUT_OF_STOCK"
# Statuses in which a key may still be uploaded to the reservation.
OPEN_STATUSES = frozenset({"BOUGHT", "OUT_OF_STOCK", "PROCESSING_PREORDER"})
# What the engine should make of a reservation closed without our key.
CLOSED_AS = {
    "CANCELED": "cancelled",
    "CANCELLED": "cancelled",
    "REFUNDED": "refunded",
    "RETURNED": "refunded",
    "REVERSED": "refunded",
}
MAX_ID = 128
SEPARATOR = "/"


class WireError(ValueError):
    """A response as a whole is not what the API documents."""


def order_id_for(offer_id: str, reservation_id: str) -> str:
    """The engine's order id: the offer is needed to read or upload a reservation's stock
    (both live under /offers/{offerId}), and the ledger keeps nothing else across a restart."""
    return f"{offer_id}{SEPARATOR}{reservation_id}"


def split_order_id(order_id: str) -> tuple[str, str]:
    offer_id, sep, reservation_id = order_id.partition(SEPARATOR)
    if not sep or not offer_id or not reservation_id or SEPARATOR in reservation_id:
        raise Permanent(f"not a Kinguin order id (offerId/reservationId): {order_id[:80]!r}")
    return offer_id, reservation_id


def key_text(item: CardItem) -> str:
    """One key as Kinguin's text stock body: the secret, after the card number when there is
    one (on its own line). `item_from_text` reads it back."""
    return f"{item.code}\n{item.secret}" if item.code else item.secret


def item_from_text(text: str) -> CardItem:
    code, sep, secret = text.partition("\n")
    return CardItem(code=code, secret=secret) if sep else CardItem(code="", secret=text)


def parse_time(value: Any) -> datetime | None:
    """Kinguin's date-times look like 2021-08-31T13:00:38.914+0000; None when absent/odd."""
    if not isinstance(value, str) or not 10 <= len(value) <= 40:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def text_id(value: Any) -> str | None:
    """An id as text when it is one we can use in an order id and a URL segment."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and 0 < len(value) <= MAX_ID and SEPARATOR not in value:
        return value
    return None


def _amount(price: Any) -> tuple[str | None, str | None]:
    if not isinstance(price, dict):
        return None, None
    cents, currency = price.get("amount"), price.get("currency")
    if isinstance(cents, bool) or not isinstance(cents, int) or not 0 <= cents <= 10**9:
        return None, None
    return f"{cents // 100}.{cents % 100:02d}", currency if isinstance(currency, str) else None


def deliver_by(raw: Mapping[str, Any]) -> str | None:
    """When the reservation must have its key: 15 minutes after it needed stock, or the
    reservation's own maxDeliveryDate when that is sooner. The listing does not say when the
    reservation ran out of stock; `outOfStockDate` (ReservationDocument) when present, else
    `updatedAt` (its last change, which for one still out of stock is that change), else
    `createdDate` (earlier still: the warning comes early rather than late)."""
    basis = None
    for key in ("outOfStockDate", "updatedAt", "createdDate"):
        basis = parse_time(raw.get(key))
        if basis is not None:
            break
    if basis is None:
        return None
    due = basis + DELIVERY_WINDOW
    latest = parse_time(raw.get("maxDeliveryDate"))
    if latest is not None and latest < due:
        due = latest
    return iso_utc(due)


def parse_reservation(raw: Any, offers: Mapping[str, str]) -> PlatformOrder | RejectedOrder | None:
    """One reservation = one key = one order line. None when it carries no usable id, or is
    not one that needs our key (the server's status filter is not trusted)."""
    if not isinstance(raw, dict):
        return None
    reservation_id = text_id(raw.get("id"))
    if reservation_id is None or raw.get("status") != INTAKE_STATUS:
        return None
    offer_id = text_id(raw.get("offerId"))
    if offer_id is None:
        return RejectedOrder(f"-{SEPARATOR}{reservation_id}", "reservation has no valid offerId")
    order_id = order_id_for(offer_id, reservation_id)
    sku = offers.get(offer_id)
    if sku is None:
        return RejectedOrder(
            order_id,
            f"unknown SKU: Kinguin offer {offer_id!r} is not mapped in this platform's offers",
            sku=offer_id,
            quantity=1,
        )
    quantity = raw.get("quantity")
    if quantity is not None and quantity != 1:
        # In-game offers sell quantities; a key reservation is always one key.
        return RejectedOrder(order_id, f"reservation quantity {quantity!r}", sku=sku)
    amount, currency = _amount(raw.get("price"))
    created = parse_time(raw.get("createdDate"))
    return PlatformOrder(
        order_id=order_id,
        status="paid",
        sku=sku,
        quantity=1,
        paid_at=iso_utc(created) if created else None,
        amount=amount,
        currency=currency,
        deliver_by=deliver_by(raw),
    )


def page_content(body: Any) -> list[Any]:
    if not isinstance(body, dict) or not isinstance(body.get("content"), list):
        raise WireError("page has no 'content' array")
    content: list[Any] = body["content"]
    return content


def has_more(body: dict[str, Any]) -> bool:
    """Spring's page: `last`, else number/totalPages (reservations), else metadata (stock)."""
    last = body.get("last")
    if isinstance(last, bool):
        return not last
    metadata = body.get("metadata")
    meta: dict[str, Any] = metadata if isinstance(metadata, dict) else body
    number, pages = meta.get("number", meta.get("page")), meta.get("totalPages")
    if isinstance(number, int) and isinstance(pages, int):
        return number + 1 < pages
    return False


def reservation_status(body: Any, reservation_id: str) -> str | None:
    """The status of `reservation_id` in a reservations page, None when it is not there."""
    for raw in page_content(body):
        if isinstance(raw, dict) and text_id(raw.get("id")) == reservation_id:
            status = raw.get("status")
            if isinstance(status, str) and 0 < len(status) <= 40:
                return status
            raise WireError(f"reservation {reservation_id} has no status")
    return None


@dataclass(frozen=True, slots=True)
class StockEntry:
    """A key Kinguin holds for the reservation; content None when the API did not show it."""

    id: str
    status: str
    content: str | None

    def __repr__(self) -> str:  # never the key
        return f"StockEntry({self.id}, {self.status})"


def stock_for(body: Any, reservation_id: str) -> list[StockEntry]:
    entries = []
    for raw in page_content(body):
        if not isinstance(raw, dict) or raw.get("reservationId") != reservation_id:
            continue  # the server's filter is not trusted
        if raw.get("status") == "REMOVED":
            continue  # deleted from the offer: it reached no buyer
        content = raw.get("content")
        entries.append(
            StockEntry(
                id=str(raw.get("id"))[:MAX_ID],
                status=str(raw.get("status"))[:40],
                content=content if isinstance(content, str) else None,
            )
        )
    return entries
