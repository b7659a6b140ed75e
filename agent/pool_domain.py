"""Domain types of consignment: a platform's own card pool (Agiso's 卡种, cpcId) kept topped up
from the ledger, the intents of adding keys to it, and what a sale from it binds.

A key handed to a pool is `consigned` (agent.domain.KeyState): bound to the pool in the same
transaction as the add intent, never free, never delivered by the agent; the platform sells
it, and the ledger binds it to the order line the platform's send log names.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from agent.domain import CardItem


class PoolAddState(enum.StrEnum):
    INTENT = "intent"  # committed with its keys consigned; the call maybe not made yet
    UNKNOWN = "unknown"  # called, outcome unclear: the same keys are added again
    ADDED = "added"  # every key is in the pool (added, or already there)
    PARTIAL = "partial"  # the platform refused some keys, or an unclear outcome could not be
    # settled: the keys stay consigned (never delivered by the agent) until a human looks
    FAILED = "failed"  # definitely nothing added: the keys went back to free


OPEN_POOL_ADD = (PoolAddState.INTENT, PoolAddState.UNKNOWN)


@dataclass(frozen=True, slots=True)
class Pool:
    """One platform pool a SKU is consigned to."""

    id: int
    platform: str
    cpc_id: str
    sku: str


@dataclass(frozen=True, slots=True)
class PoolAdd:
    """One add intent: `quantity` keys consigned to a pool under a deterministic reference."""

    id: int
    pool: Pool
    reference: str
    state: PoolAddState
    quantity: int
    added: int | None
    refused: int | None
    attempts: int
    created_at: float


@dataclass(frozen=True, slots=True)
class PoolAddIntent:
    """An add intent with its keys, opened: what the call carries (the same on every try)."""

    add: PoolAdd
    items: tuple[CardItem, ...]
    key_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PoolLevel:
    """A pool as the ledger sees it: keys consigned to it and not known sold."""

    pool: Pool
    consigned: int
    returning: int  # of those, keys a StockBack is under way for


@dataclass(frozen=True, slots=True)
class ConsignedKey:
    """A consigned key, opened (for a StockBack, or adding it again)."""

    key_id: int
    pool: Pool
    item: CardItem


@dataclass(frozen=True, slots=True)
class PoolSaleRecord:
    """What the ledger made of a sale the platform's send log shows."""

    bound: int  # keys bound to the line (consigned ones, or free ones the platform sold)
    unknown: int  # cards the ledger does not hold (added to the pool by hand?)
    conflicts: int  # cards the ledger bound to another line, or voided
    were_free: int  # of those bound, keys the ledger held free, not consigned
    delivered: bool  # the line is delivered; else it was parked with the reason


def pool_add_reference(platform: str, cpc_id: str, number: int) -> str:
    """Deterministic per pool and intent number: written to the pool with the keys (the
    call's `summary`), so a merchant can find a batch in Agiso's back office."""
    digest = hashlib.sha256(f"{platform}\x1f{cpc_id}".encode()).hexdigest()[:12]
    return f"kami-pool-{digest}-{number}"


def pool_card_number(item: CardItem) -> str:
    """What a pool knows a key by (its card number): the code, or the secret for a key
    without one (a line without a comma)."""
    return item.code or item.secret


@dataclass(frozen=True, slots=True)
class PoolBounds:
    """A SKU consigned to a platform pool: the pool, and the level kept between `low` and
    `high` keys (topped up to `high` when it falls below `low`; keys beyond `high` given
    back)."""

    cpc_id: str
    low: int
    high: int


@dataclass(frozen=True, slots=True)
class PoolAddAnswer:
    """What the platform answered to an add: keys added, keys refused (already there, or not
    taken: the answer does not say which)."""

    added: int
    refused: int
