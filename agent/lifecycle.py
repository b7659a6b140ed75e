"""THE transition table: every allowed `from -> to` edge of an order line, a purchase, a card
key and a pool add.

Each edge names the event kind(s) the ledger records with it. Nothing else in the code says
which state may follow which: the ledger's `WHERE state IN (...)` guards are rendered from
these edges (agent/store/tx.py), and the database refuses any other transition with triggers
generated from them at every open (agent/store/guards.py), so code and database never
disagree. The classes of states the ledger's queries select by live here too.

Adding a state: the enum member (agent/domain.py), its row in LINE_CLASSES, its edges below,
and a migration widening the CHECK constraint of the state column. docs/design.md shows the
table as a diagram (`mermaid()`; a test keeps the two the same).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from agent.domain import KeyState as K
from agent.domain import LineState as L
from agent.domain import PurchaseState as P
from agent.pool_domain import PoolAddState as A

S = TypeVar("S", L, P, K, A)


@dataclass(frozen=True, slots=True)
class Edge(Generic[S]):
    source: S | None  # None: the row is inserted in `target`
    target: S
    events: tuple[str, ...]  # the event kinds recorded with this transition


def edges(sources: Iterable[S | None], targets: S | Iterable[S], *events: str) -> list[Edge[S]]:
    """Every source -> target pair, recorded by `events`."""
    many = [targets] if isinstance(targets, L | P | K | A) else list(targets)
    return [Edge(source, target, events) for source in sources for target in many]


ANY_LINE: tuple[L, ...] = tuple(L)
WAITING = (L.NEW, L.BACKORDERED, L.PURCHASING)  # no keys bound yet

# The order line. Transitions made by statements that are unguarded today (park, close,
# mark delivered) come from any state: on a shared ledger another agent may have moved the
# line since this one read it, and the platform's word (cancelled, refunded) or the
# merchant's attention wins whatever the state.
LINE_EDGES: tuple[Edge[L], ...] = (
    *edges([None], L.NEW, "intake"),
    *edges([None], L.DELIVERING, "intake"),  # claimed as taken in: keys bound, intent made
    *edges([None], L.NEEDS_ATTENTION, "rejected"),
    *edges(WAITING, L.BACKORDERED, "backordered"),
    *edges(WAITING, L.PURCHASING, "purchase_intent"),
    *edges(WAITING, L.ALLOCATED, "allocated"),
    *edges([L.ALLOCATED, L.DELIVERING], L.DELIVERING, "delivery_intent"),
    # A shared ledger's intake inserts a line `new`, then claims it set-wise: keys bound
    # (its `allocated` event) and the intent made in one statement per table.
    *edges([L.NEW], L.DELIVERING, "allocated", "delivery_intent"),
    *edges([s for s in ANY_LINE if s is not L.DELIVERED], L.DELIVERED, "delivered"),
    *edges([L.NEEDS_ATTENTION], [L.NEW, L.PURCHASING, L.ALLOCATED, L.DELIVERING], "operator_retry"),
    *edges([L.DELIVERED], L.DELIVERING, "operator_resend"),
    # After-sales: a bad key voided and a fresh one bound in its slot, delivered anew.
    *edges([L.DELIVERED], L.DELIVERING, "key_replaced"),
    *edges(ANY_LINE, L.NEEDS_ATTENTION, "parked"),
    *edges(ANY_LINE, L.REFUNDED, "refunded"),
    *edges(ANY_LINE, L.CANCELLED, "cancelled"),
    # Responder platforms (agent/listener.py): the platform calls us and the reply carries
    # the keys. Eneba: RESERVE binds keys (`reserved`), PROVIDE answers with them
    # (`provided`), its reconciliation confirms (`delivered`); a CANCEL before PROVIDE, or
    # a reservation never paid, releases the keys to stock; a CANCEL after PROVIDE voids
    # them. dujiao-next: an order binds its keys and is handed to the shop at once.
    *edges([None], L.RESERVED, "reserved"),
    *edges([None], L.PROVIDED, "provided"),
    *edges([L.RESERVED], L.PROVIDED, "provided"),
    *edges([L.RESERVED], L.CANCELLED, "released"),
    *edges([L.PROVIDED], L.CANCELLED, "keys_voided"),
)

OPEN_PURCHASE = (P.INTENT, P.UNKNOWN, P.PROCESSING)
# A purchase. Completing is unguarded today (only a completed one is left alone), so a
# purchase failed on one agent's view can still complete on the supplier's later answer.
PURCHASE_EDGES: tuple[Edge[P], ...] = (
    *edges([None], P.INTENT, "purchase_intent"),
    *edges([P.INTENT, P.UNKNOWN], P.UNKNOWN, "purchase_unknown"),
    *edges(OPEN_PURCHASE, P.PROCESSING, "purchase_processing"),
    *edges(OPEN_PURCHASE, P.FAILED, "purchase_failed"),
    *edges([*OPEN_PURCHASE, P.FAILED], P.COMPLETED, "purchase_completed"),
)

# A card key. Keys are inserted free (imported, or bought: bound in the same transaction).
# The kinds name the step; keys have no event rows (a line's events name its keys). The
# stricter rules on bound keys (never unbound, never rebound) are card_keys_stay_bound's.
KEY_EDGES: tuple[Edge[K], ...] = (
    *edges([None], K.FREE, "imported"),
    *edges([K.FREE], K.BOUND, "allocated", "sold_from_pool"),
    *edges([K.FREE], K.VOID, "voided"),
    *edges([K.VOID], K.FREE, "unvoided"),
    # After-sales and responders: a bad key replaced on its line goes void naming the line;
    # a reservation cancelled before its keys were handed over gives them back.
    *edges([K.BOUND], K.VOID, "replaced", "keys_voided"),
    *edges([K.BOUND], K.FREE, "released"),
    # Consignment: handed to a platform's pool in the same transaction as the add intent;
    # bound to the line the platform sold it on; back to free when the pool definitely did
    # not take it, or gave it back (StockBack).
    *edges([K.FREE], K.CONSIGNED, "pool_add_intent"),
    *edges([K.CONSIGNED], K.BOUND, "sold_from_pool"),
    *edges([K.CONSIGNED], K.FREE, "pool_add_failed", "stock_back"),
)

# An add of keys to a platform pool (agent/consignment.py): the intent is committed with its
# keys consigned; an unclear outcome is settled by adding the same keys again.
POOL_ADD_EDGES: tuple[Edge[A], ...] = (
    *edges([None], A.INTENT, "pool_add_intent"),
    *edges([A.INTENT, A.UNKNOWN], A.UNKNOWN, "pool_add_unknown"),
    *edges([A.INTENT, A.UNKNOWN], A.ADDED, "pool_added"),
    *edges([A.INTENT, A.UNKNOWN], A.PARTIAL, "pool_add_partial"),
    *edges([A.INTENT], A.FAILED, "pool_add_failed"),  # never after an unclear outcome
)

# Event kinds recorded on a line that change no state (the last two by the engine and the
# console through add_event).
NOTE_EVENTS = frozenset(
    {
        "retry_scheduled",
        "buyer_notice",
        "refund_intent",
        "refund_refused",  # the platform refused a merchant's refund: nothing changed
        "reconciled",
        "keys_revealed",
        "callback_sent",  # a responder's callback reached the platform (agent/listener.py)
    }
)

# The classes of line states the ledger's queries select by: state -> its classes.
#   due: the sweep offers it to a worker when its time comes; scheduled: the same, only once
#        a time is set (else when the free stock can fill it);
#   active: the engine still drives it; waiting: no keys bound yet, more may be needed;
#   holds_keys: exactly `quantity` keys bound; noticed: the buyer hears of a wait;
#   not_demand: not counted as a sale by the forecast.
LINE_CLASSES: dict[L, frozenset[str]] = {
    L.NEW: frozenset({"due", "active", "waiting"}),
    L.BACKORDERED: frozenset({"scheduled", "active", "waiting", "noticed"}),
    L.PURCHASING: frozenset({"due", "active", "waiting", "noticed"}),
    L.ALLOCATED: frozenset({"due", "active", "holds_keys"}),
    L.DELIVERING: frozenset({"due", "active", "holds_keys"}),
    L.DELIVERED: frozenset({"holds_keys"}),
    L.NEEDS_ATTENTION: frozenset({"not_demand"}),
    L.REFUNDED: frozenset(),
    L.CANCELLED: frozenset({"not_demand"}),
    # Driven by the platform's calls, not by the engine's workers.
    L.RESERVED: frozenset({"holds_keys"}),
    L.PROVIDED: frozenset({"holds_keys"}),
}


def states_in(name: str) -> tuple[L, ...]:
    """The line states of one class, in the enum's order."""
    return tuple(s for s in L if name in LINE_CLASSES[s])


TABLES: dict[type[Any], tuple[Edge[Any], ...]] = {
    L: LINE_EDGES,
    P: PURCHASE_EDGES,
    K: KEY_EDGES,
    A: POOL_ADD_EDGES,
}


def table(kind: type[S]) -> tuple[Edge[S], ...]:
    return TABLES[kind]


def sources(kind: type[S], target: S, event: str | None = None) -> tuple[S, ...]:
    """The states a row of `kind` may move to `target` from (recorded by `event`, if given),
    in the enum's order; inserts left out."""
    found = {
        e.source
        for e in table(kind)
        if e.target == target and e.source is not None and (event is None or event in e.events)
    }
    return tuple(s for s in kind if s in found)


def allowed(kind: type[S], source: S | None, target: S) -> bool:
    return any(e.source == source and e.target == target for e in table(kind))


def event_kinds(kind: type[S]) -> frozenset[str]:
    return frozenset(event for e in table(kind) for event in e.events)


def mermaid(kind: type[L] | type[P] | type[K] | type[A]) -> str:
    """One table as a mermaid state diagram (docs/design.md shows them). An event moving
    rows from every state (every other state) to one is drawn from `any`."""
    members: list[Any] = list(kind)
    rows: Sequence[Edge[Any]] = TABLES[kind]
    out = ["stateDiagram-v2", '    state "any (other) state" as any']
    groups: dict[tuple[str, str], set[Any]] = {}
    for e in rows:
        for event in e.events:
            groups.setdefault((event, e.target.value), set()).add(e.source)
    labels: dict[tuple[str, str], list[str]] = {}
    for (event, target), found in groups.items():
        every = set(members) - {kind(target)} <= found
        ordered = sorted(found, key=lambda s: -1 if s is None else members.index(s))
        for source in ["any"] if every else ordered:
            key = ("[*]" if source is None else getattr(source, "value", source), target)
            labels.setdefault(key, []).append(event)
    out += [f"    {a} --> {b}: {', '.join(ev)}" for (a, b), ev in labels.items()]
    return "\n".join(out) + "\n"
