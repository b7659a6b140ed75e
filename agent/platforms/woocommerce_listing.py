"""Listing WooCommerce's processing orders: the cursor, and orders into order lines.

WooCommerce pages a listing by offset (`page`, `per_page` <= 100, `X-WP-TotalPages`), over a
set that changes while it is read: every order the agent completes leaves `status=processing`.
Read forwards, each order that leaves moves every later order one place down, and the first
order of the next page slips into the page already read: skipped. So a pass reads page 1 (to
learn how many pages there are), then the pages from the last one down to page 1 again. An
order leaving only moves the orders after it, which were read already; an order arriving
(a new order gets the highest id) lands after everything. What is left is an older order paid
during the pass (a pending order whose id is below the page being read), which pushes one order
up into a page already read: that order is taken by the next full re-list (see
docs/platforms/woocommerce.md).

Between passes, `modified_after` keeps a pass to the orders changed since the previous one.
The bound is the shop's own clock when the pass began (the `Date` header of its first answer)
less a margin, never our clock: WooCommerce compares `date_modified_gmt` with it, in whole
seconds and strictly after, so orders sharing the bound's second are listed again rather than
lost. Without a Date header the bound does not move (the next pass lists as much as this one).

The cursor is text the engine stores after each page, so a restart resumes the pass where it
stopped: `wc1;<modified_after or empty>;<next page, 0 = the pass has not started>;<the next
pass's modified_after>`. Anything else (a cursor of another kind, garbage) starts a full pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from agent.domain import PlatformOrder, RejectedOrder
from agent.platforms.parsing import ABSURD_QUANTITY, MAX_ID_LENGTH, MAX_TEXT_LENGTH

_PREFIX = "wc1"
_STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$")


def _stamp_or_none(text: str) -> str | None:
    if not text:
        return None
    if not _STAMP.match(text):
        raise ValueError(text)
    return text


@dataclass(frozen=True, slots=True)
class ListingPass:
    """Where a listing stands. `modified_after` None lists every processing order."""

    modified_after: str | None = None
    next_page: int = 0  # 0: the pass has not started (read page 1 first)
    following: str | None = None  # modified_after of the pass after this one

    def encode(self) -> str:
        return ";".join(
            (_PREFIX, self.modified_after or "", str(self.next_page), self.following or "")
        )

    @classmethod
    def decode(cls, cursor: str | None) -> ListingPass:
        if not cursor:
            return cls()
        parts = cursor.split(";")
        try:
            if len(parts) != 4 or parts[0] != _PREFIX:
                raise ValueError(cursor)
            page = int(parts[2])
            if page < 0:
                raise ValueError(cursor)
            return cls(_stamp_or_none(parts[1]), page, _stamp_or_none(parts[3]))
        except ValueError:
            return cls()  # not ours: a full pass is always safe

    @property
    def page(self) -> int:
        return self.next_page or 1

    def after(self, total_pages: int, following: str | None) -> tuple[ListingPass, bool]:
        """The cursor after reading `self.page`, and whether the pass has more pages.
        `total_pages` and `following` come from this answer (used on a pass's first page)."""
        if self.next_page == 0:
            if total_pages <= 1:
                return ListingPass(following), False
            return ListingPass(self.modified_after, total_pages, following), True
        if self.next_page <= 1:
            return ListingPass(self.following), False
        return ListingPass(self.modified_after, self.next_page - 1, self.following), True


def bound_from_date(date_header: str | None, margin: float) -> str | None:
    """The next pass's modified_after from the shop's Date header, or None without one."""
    if not date_header:
        return None
    try:
        when = parsedate_to_datetime(date_header)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    moment = datetime.fromtimestamp(when.timestamp() - margin, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


def line_order_id(order_id: int, item_id: int) -> str:
    """The ledger keys lines by order id: one WooCommerce line item is one of ours."""
    return f"{order_id}/{item_id}"


def split_line_id(order_id: str) -> tuple[int, int]:
    """(order id, line item id) of a line id; ValueError when it is not one of ours."""
    order, sep, item = order_id.partition("/")
    if not sep or not order.isdigit() or not item.isdigit():
        raise ValueError(f"{order_id!r} is not a WooCommerce order line (order/item)")
    return int(order), int(item)


def _int_id(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value and len(value) <= MAX_TEXT_LENGTH else None


@dataclass(frozen=True, slots=True)
class ParsedOrders:
    lines: list[PlatformOrder | RejectedOrder]
    unidentifiable: int  # orders or line items without a usable id
    without_sku: int  # line items that are not ours (no SKU)


def order_lines(raw_orders: list[Any]) -> ParsedOrders:
    """One order line per line item with a SKU, of the processing orders in a listing."""
    lines: list[PlatformOrder | RejectedOrder] = []
    unidentifiable = without_sku = 0
    for raw in raw_orders:
        order_id = _int_id(raw.get("id")) if isinstance(raw, dict) else None
        if order_id is None or not isinstance(raw.get("line_items"), list):
            unidentifiable += 1
            continue
        if raw.get("status") != "processing":
            continue  # WooCommerce's "payment received"; nothing else is ours to deliver
        billing = raw.get("billing")
        contact = _text(billing.get("email")) if isinstance(billing, dict) else None
        paid = _text(raw.get("date_paid_gmt"))
        for item in raw["line_items"]:
            item_id = _int_id(item.get("id")) if isinstance(item, dict) else None
            if item_id is None:
                unidentifiable += 1
                continue
            sku = item.get("sku")
            if sku is None or sku == "":
                without_sku += 1
                continue
            line_id = line_order_id(order_id, item_id)
            if not isinstance(sku, str) or len(sku) > MAX_ID_LENGTH:
                lines.append(RejectedOrder(line_id, f"invalid sku {str(sku)[:60]!r}"))
                continue
            quantity = item.get("quantity")
            if isinstance(quantity, bool) or not isinstance(quantity, int):
                lines.append(RejectedOrder(line_id, f"invalid quantity {quantity!r}", sku=sku))
                continue
            if not 1 <= quantity <= ABSURD_QUANTITY:
                lines.append(RejectedOrder(line_id, f"quantity out of range: {quantity}", sku=sku))
                continue
            lines.append(
                PlatformOrder(
                    order_id=line_id,
                    status="paid",
                    sku=sku,
                    quantity=quantity,
                    paid_at=f"{paid}Z" if paid else None,
                    amount=_text(item.get("total")),
                    currency=_text(raw.get("currency")),
                    buyer_contact=contact,
                )
            )
    return ParsedOrders(lines, unidentifiable, without_sku)
