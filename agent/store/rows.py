"""What both ledgers share: the row layouts, their mappers, and the migration files."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any

from agent.domain import (
    AlertCondition,
    AlertMessage,
    CardItem,
    DeliveryIntent,
    LineState,
    OrderLine,
    PlatformOrder,
    Purchase,
    PurchaseState,
    delivery_idempotency_key,
)
from agent.reasons import CHANGED_ORDER, english

IMPORT_BATCH = 20_000
# Demand is read summed per SKU and per this many seconds (at the sales' mean time): the
# forecast reads a few hundred rows, not every recent order, and its sales rate (half-life
# an hour by default) barely notices the difference.
DEMAND_BUCKET_SECONDS = 60
# The tables' columns bear the fields' names: a row read by these is the dataclass, in order.
LINE_COLUMNS = ", ".join(f.name for f in fields(OrderLine))
LINE_WIDTH = len(fields(OrderLine))  # a query's own extra columns come after these


def line_from_row(row: Any) -> OrderLine:
    values = (*row[:6], LineState(row[6]), *row[7:10], bool(row[10]), *row[11:LINE_WIDTH])
    return OrderLine(*values)


def new_line(
    line_id: int, platform: str, order: PlatformOrder, now: float, delivery_key: str | None = None
) -> OrderLine:
    """A line as intake inserts it: `new`, or, given its delivery key, claimed at intake
    (`delivering`, attempt 1), without reading it back."""
    claimed = delivery_key is not None
    return OrderLine(
        id=line_id,
        platform=platform,
        order_id=order.order_id,
        line=0,
        sku=order.sku,
        quantity=order.quantity,
        state=LineState.DELIVERING if claimed else LineState.NEW,
        reason=None,
        attempts=1 if claimed else 0,
        next_attempt_at=0.0,
        ambiguous=False,
        delivery_key=delivery_key,
        seen_at=now,
        delivered_at=None,
        buyer_contact=order.buyer_contact,
        paid_at=order.paid_at,
        deliver_by=order.deliver_by,
    )


# Free keys of each SKU for intake to claim: (key id, secret hash, the key), in id order.
FreeKeys = dict[str, deque[tuple[int, bytes, CardItem]]]


def take_keys(free: FreeKeys, sku: str, quantity: int) -> list[tuple[int, bytes, CardItem]] | None:
    """`quantity` keys off the SKU's free keys, or None (and none taken) if too few."""
    keys = free.get(sku)
    if keys is None or len(keys) < quantity:
        return None
    return [keys.popleft() for _ in range(quantity)]


def intake_delivery_key(
    platform: str, order: PlatformOrder, keys: Sequence[tuple[int, bytes, CardItem]]
) -> str:
    """The idempotency key of a new line's first delivery (line 0, generation 0) of the keys
    `take_keys` gave it."""
    return delivery_idempotency_key(platform, order.order_id, 0, 0, (k[1] for k in keys))


def claimed_at_intake(
    line_id: int,
    platform: str,
    order: PlatformOrder,
    now: float,
    keys: Sequence[tuple[int, bytes, CardItem]],
    key: str,
) -> DeliveryIntent:
    """The delivery intent of a new line claimed as intake inserts it (attempt 1), with the
    keys `take_keys` gave it and its idempotency key (`intake_delivery_key`)."""
    return DeliveryIntent(
        new_line(line_id, platform, order, now, key),
        key,
        tuple(k[2] for k in keys),
        tuple(k[0] for k in keys),
    )


PURCHASE_COLUMNS = ", ".join(f.name for f in fields(Purchase))


def purchase_from_row(row: Any) -> Purchase:
    values = (*row[:6], PurchaseState(row[6]), *row[7:11])
    return Purchase(*values)


def migrations(dialect: str = "sqlite") -> list[tuple[int, str]]:
    """(version, sql) of one dialect's migration files, oldest first."""
    folder = resources.files("agent.store.migrations").joinpath(dialect)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(found)


def changed_order_reason(
    sku: str, quantity: int, state: LineState, order: PlatformOrder
) -> str | None:
    """Why an order seen again must be parked, or None when that is harmless: identical,
    or too far along to change (its keys are already bound to what was first listed)."""
    if (order.sku, order.quantity) == (sku, quantity):
        return None
    if state not in (LineState.NEW, LineState.BACKORDERED):
        return None
    return english(
        CHANGED_ORDER,
        old_sku=sku,
        new_sku=order.sku,
        old_quantity=quantity,
        new_quantity=order.quantity,
    )


def retry_target(line: OrderLine, bound_keys: int, open_purchase: bool) -> tuple[LineState, bool]:
    """Where an operator's retry sends a parked line: (state, ambiguous)."""
    if line.delivery_key is not None:
        # It may have reached the platform: ask before sending again.
        return LineState.DELIVERING, True
    if open_purchase and not bound_keys:
        # Ask the supplier about the open purchase again; never buy blind.
        return LineState.PURCHASING, False
    if bound_keys:
        return LineState.ALLOCATED, False
    return LineState.NEW, False


# An open alert as both ledgers read it: key, kind, severity, summary, last_sent_at, escalations.
OPEN_ALERT_COLUMNS = "key, kind, severity, summary, last_sent_at, escalations"


@dataclass
class AlertPlan:
    """What apply_alerts writes, decided once for both ledgers."""

    opened: list[AlertCondition] = field(default_factory=list)
    escalated: list[AlertCondition] = field(default_factory=list)
    unchanged: list[AlertCondition] = field(default_factory=list)  # summary refreshed only
    resolved: list[str] = field(default_factory=list)
    messages: list[AlertMessage] = field(default_factory=list)


def plan_alerts(
    open_rows: Sequence[Any],
    active: Sequence[AlertCondition],
    now: float,
    escalate_after: float,
    max_escalations: int,
) -> AlertPlan:
    """Each alert fires once per crossing, is re-sent while unresolved (a bounded number of
    times), and sends a recovery when its condition clears."""
    plan = AlertPlan()
    open_now = {r[0]: r for r in open_rows}
    for cond in active:
        row = open_now.get(cond.key)
        if row is None:
            plan.opened.append(cond)
            event = "opened"
        elif now - row[4] >= escalate_after and row[5] < max_escalations:
            plan.escalated.append(cond)
            event = "escalated"
        else:
            plan.unchanged.append(cond)
            continue
        plan.messages.append(
            AlertMessage(cond.key, cond.kind, event, cond.severity, cond.summary, now)
        )
    current = {c.key for c in active}
    for key, row in open_now.items():
        if key not in current:
            plan.resolved.append(key)
            # "RESOLVED" is said around the summary, in the merchant's language.
            plan.messages.append(AlertMessage(key, row[1], "resolved", row[2], row[3], now))
    return plan


def allocated_detail(keys: Iterable[tuple[int, bytes]]) -> str:
    """The `allocated` event's detail, from (key id, secret hash) pairs: each key by its id
    and a fingerprint, the start of its keyed hash, never the key itself."""
    return "keys " + ",".join(f"#{key_id}:{bytes(digest).hex()[:10]}" for key_id, digest in keys)
