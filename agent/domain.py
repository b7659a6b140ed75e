"""Domain types and pure rules shared by the engine, the store and the adapters."""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from agent.i18n import ENGLISH, N_, Translator


class LineState(enum.StrEnum):
    NEW = "new"
    BACKORDERED = "backordered"
    PURCHASING = "purchasing"
    ALLOCATED = "allocated"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    NEEDS_ATTENTION = "needs_attention"
    REFUNDED = "refunded"
    CANCELLED = "cancelled"
    # Responder platforms (the listener): keys held for an order the platform may still cancel
    # (Eneba's RESERVE), and keys handed over in a reply the platform has not confirmed yet.
    RESERVED = "reserved"
    PROVIDED = "provided"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {LineState.DELIVERED, LineState.NEEDS_ATTENTION, LineState.REFUNDED, LineState.CANCELLED}
)
# States the sweeper drives forward on its own.
ACTIVE_STATES = frozenset(
    {
        LineState.NEW,
        LineState.BACKORDERED,
        LineState.PURCHASING,
        LineState.ALLOCATED,
        LineState.DELIVERING,
    }
)


class KeyState(enum.StrEnum):
    FREE = "free"
    BOUND = "bound"
    VOID = "void"
    CONSIGNED = "consigned"  # handed to a platform's own pool, the platform's to sell


# --- errors decided at the adapter edge; the engine acts on the class -------------------


class AgentError(Exception):
    """Base class of every error kami-agent raises on purpose."""


class Transient(AgentError):
    """The call did not take effect; trying again later is safe."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Held(Transient):
    """The adapter held the call back, unsent, to keep the platform's own rate limit (Eneba
    takes one update of an auction per 45 s): nothing failed; it may go out in
    `retry_after` seconds."""

    retry_after: float

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after)


class AuthFailed(Transient):
    """The platform refused our credentials; nothing took effect."""


class CallsUnpaid(AuthFailed):
    """The platform stops our calls until a prepaid balance for them is topped up (Agiso's
    deposit ran out): our credentials are fine, the merchant must pay; orders wait."""


class Ambiguous(AgentError):
    """The call may or may not have taken effect; ask the other side before acting again
    (not before `retry_after` seconds, when the other side said so: a 503's Retry-After)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Permanent(AgentError):
    """The other side refused the request for good; retrying the same request won't help."""


class DeliveryConflict(Permanent):
    """The platform already holds a different delivery for this order."""


class OrderClosed(Permanent):
    """The platform closed the order (cancelled or refunded) before our delivery landed: the
    line is closed with that state, not parked as a conflict."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status  # "cancelled" or "refunded"


class BadResponse(Transient):
    """The other side answered with something we cannot parse (malformed or oversized)."""


class StockNotOffered(Permanent):
    """The platform takes no published stock: at all (`sku` None, e.g. platform-http v1
    answering 404 to the stock endpoint), or not for this SKU (it sells no such offer)."""

    def __init__(self, message: str, sku: str | None = None) -> None:
        super().__init__(message)
        self.sku = sku


# --- wire-level values --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CardItem:
    """One card key as delivered: an optional card number (code) and the secret."""

    code: str
    secret: str
    # When the key stops being valid (Unix time; from a stock file's expiry column), or None.
    # Not part of the key's identity: the same code and secret are the same key.
    expires_at: float | None = field(default=None, compare=False)

    def __repr__(self) -> str:  # never let a secret slip into a log or traceback
        return "CardItem(<sealed>)"


@dataclass(frozen=True, slots=True)
class PlatformOrder:
    """An order as the platform reports it, already validated."""

    order_id: str
    status: str
    sku: str
    quantity: int
    paid_at: str | None = None
    amount: str | None = None
    currency: str | None = None
    buyer_contact: str | None = None
    deliver_by: str | None = None


@dataclass(frozen=True, slots=True)
class RejectedOrder:
    """An order whose content we cannot act on; it is parked with the reason."""

    order_id: str
    reason: str
    sku: str = ""
    quantity: int = 0


@dataclass(frozen=True, slots=True)
class OrderPage:
    orders: list[PlatformOrder | RejectedOrder]
    next_cursor: str | None
    has_more: bool
    # Entries so broken they do not even carry an order id; logged, cannot be parked.
    unidentifiable: int = 0
    # Why each of them was ignored (the bad value escaped), for that log line.
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RemoteDelivery:
    """What the platform says about an order when we reconcile."""

    status: str
    items: tuple[CardItem, ...] = ()
    # The order's content as the platform states it now (SKU, quantity, buyer), where the
    # adapter reads it; `orders retry` of an order parked at intake takes it in again from
    # this. None: the adapter cannot say.
    order: PlatformOrder | RejectedOrder | None = None


# --- ledger rows -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrderLine:
    id: int
    platform: str
    order_id: str
    line: int
    sku: str
    quantity: int
    state: LineState
    reason: str | None
    attempts: int
    next_attempt_at: float
    ambiguous: bool
    delivery_key: str | None
    seen_at: float
    delivered_at: float | None
    buyer_contact: str | None = None
    paid_at: str | None = None
    # ISO 8601: when the platform wants the key at the latest (Kinguin cancels after that).
    deliver_by: str | None = None
    # While a bad key's replacement is under way (kami-agent orders replace-key): the
    # idempotency key of the delivery it replaces, so the engine can finish it.
    replaces: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryIntent:
    """Committed before the delivery call: the idempotency key and the exact items."""

    line: OrderLine
    idempotency_key: str
    items: tuple[CardItem, ...]
    key_ids: tuple[int, ...]


class PurchaseState(enum.StrEnum):
    INTENT = "intent"  # committed, request maybe not sent yet
    UNKNOWN = "unknown"  # sent, outcome not known (timeout, lost response, 5xx)
    PROCESSING = "processing"  # supplier accepted, keys come later
    COMPLETED = "completed"
    FAILED = "failed"  # definite failure: a new merchant_ref is allowed

    @property
    def open(self) -> bool:
        return self in (PurchaseState.INTENT, PurchaseState.UNKNOWN, PurchaseState.PROCESSING)


@dataclass(frozen=True, slots=True)
class PurchaseResult:
    """What a supplier says about one purchase."""

    purchase_id: str
    merchant_ref: str
    status: str  # completed | processing | failed
    items: tuple[CardItem, ...] = ()
    failure_code: str | None = None
    failure_message: str | None = None


@dataclass(frozen=True, slots=True)
class Purchase:
    """Our ledger row for one purchase attempt."""

    id: int
    order_line_id: int
    supplier: str
    sku: str
    quantity: int
    merchant_ref: str
    state: PurchaseState
    purchase_id: str | None
    failure: str | None
    created_at: float
    unknown_since: float | None


@dataclass(frozen=True, slots=True)
class ImportReport:
    added: int = 0
    duplicates: int = 0
    # Refused, not duplicates: keys this ledger already bound to an order (delivered), and
    # keys it holds under another SKU (a key is unique across SKUs).
    already_bound: int = 0
    other_sku: int = 0
    # The SKUs those keys are held under, each once, in the order first met.
    other_skus: tuple[str, ...] = ()
    rejected: int = 0
    rejected_samples: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StockPosition:
    """What the ledger holds against the stock published to the platforms (stock sync)."""

    free: Mapping[str, int]  # free keys per SKU
    waiting: Mapping[str, int]  # units of lines taken in without their keys yet, per SKU
    # Units bought (purchases not failed, changed since the time asked), per (supplier, SKU).
    bought: Mapping[tuple[str, str], int]


@dataclass(frozen=True, slots=True)
class StockCount:
    sku: str
    free: int  # free keys that may be sold (not past their expiry)
    bound: int
    void: int
    expired: int = 0  # free keys past their expiry: never bound to an order


@dataclass(frozen=True, slots=True)
class OrderEvent:
    at: float
    kind: str
    detail: str


# --- pure rules --------------------------------------------------------------------------


def _line_digest(platform: str, order_id: str, line: int, length: int) -> str:
    """A stable name for one order line, the root of every deterministic reference."""
    return hashlib.sha256(f"{platform}\x1f{order_id}\x1f{line}".encode()).hexdigest()[:length]


def delivery_idempotency_key(
    platform: str, order_id: str, line: int, generation: int, content: Iterable[bytes] = ()
) -> str:
    """Deterministic, so a restart after a crash re-sends with the very same key.

    `content`: the keyed hashes of the card keys the delivery carries. The key names what is
    sent, not only where: a platform that already holds a delivery under this order answers
    another set of keys with a conflict, never with a replay of its first answer (two agents
    on separate ledgers, a ledger restored from an old backup). The hashes are keyed per
    ledger, so nothing about a card key can be learnt from the idempotency key."""
    digest = hashlib.sha256()
    digest.update(_line_digest(platform, order_id, line, 64).encode())
    for item in sorted(content):
        digest.update(b"\x1f" + item)
    return f"kami-{digest.hexdigest()[:24]}-{generation}"


def refund_idempotency_key(platform: str, order_id: str, line: int) -> str:
    return f"kami-refund-{_line_digest(platform, order_id, line, 24)}"


def purchase_merchant_ref(
    platform: str, order_id: str, line: int, supplier: str, attempt: int
) -> str:
    """Deterministic per need and attempt: a restart asks about the very same purchase."""
    return f"kami-{_line_digest(platform, order_id, line, 20)}-{supplier}-{attempt}"


def retry_delay(attempts: int, base: float = 2.0, cap: float = 300.0) -> float:
    """Backoff for the order row: 2, 4, 8 … seconds, capped."""
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


@dataclass(frozen=True, slots=True)
class AlertCondition:
    """Something that is wrong right now; the alert store turns crossings into messages."""

    key: str
    kind: str
    severity: str
    summary: str


@dataclass(frozen=True, slots=True)
class AlertMessage:
    key: str
    kind: str
    event: str  # opened | escalated | resolved
    severity: str
    summary: str
    at: float
    # The merchant's language, for the words around the summary (the summary is written in
    # it already); the outbox drainer sets it.
    language: str = ENGLISH

    @property
    def text(self) -> str:
        _ = Translator(self.language)
        event = ALERT_EVENTS.get(self.event)
        severity = ALERT_SEVERITIES.get(self.severity)
        return _("[kami-agent] %(event)s (%(severity)s): %(summary)s") % {
            "event": _(event) if event else self.event,
            "severity": _(severity) if severity else self.severity,
            "summary": self.summary,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> AlertMessage:
        return cls(**json.loads(raw))


ALERT_EVENTS = {
    "opened": N_("ALERT"),
    "escalated": N_("STILL UNRESOLVED"),
    "resolved": N_("RESOLVED"),
}
ALERT_SEVERITIES = {"critical": N_("critical"), "warning": N_("warning"), "info": N_("info")}


@dataclass(frozen=True, slots=True)
class OpenAlert:
    key: str
    kind: str
    severity: str
    summary: str
    opened_at: float
    escalations: int


@dataclass(frozen=True, slots=True)
class ClosedAlert:
    """An alert as it was when its condition cleared."""

    key: str
    kind: str
    severity: str
    summary: str
    opened_at: float
    resolved_at: float
    escalations: int


@dataclass(frozen=True, slots=True)
class OutboxItem:
    id: int
    channel: str
    payload: str
    attempts: int
