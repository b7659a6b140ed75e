"""The Store port: the ledger of orders, card keys, events and cursors.

Every method is one transaction: when it returns, its effect is durable; when it raises,
nothing of it happened. The engine relies on that to bracket every external call.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from agent.domain import (
    AgentError,
    AlertCondition,
    AlertMessage,
    CardItem,
    ClosedAlert,
    DeliveryIntent,
    ImportReport,
    KeyState,
    LineState,
    OpenAlert,
    OrderEvent,
    OrderLine,
    OutboxItem,
    PlatformOrder,
    Purchase,
    RejectedOrder,
    StockCount,
    StockPosition,
    Transient,
)
from agent.pool_domain import (
    ConsignedKey,
    Pool,
    PoolAdd,
    PoolAddIntent,
    PoolAddState,
    PoolLevel,
    PoolSaleRecord,
)

ProgressCallback = Callable[[int], None]


# The store's errors, inside the AgentError tree. Each engine maps its driver's errors to
# these at the transaction boundary (agent/store/sqlite.py, postgres.py): nothing raw escapes.
class StoreError(AgentError):
    """The store refused an operation (unknown line, wrong state); phrased for the merchant."""


class LedgerError(AgentError):
    """The ledger cannot be used at all: missing, empty, replaced, foreign, damaged,
    unreadable or not writable. Driver errors (sqlite3, OSError, asyncpg) are mapped to it
    at the store boundary, phrased for the merchant, so a command ends in one clear line.
    Not a StoreError: the engine parks a line on a StoreError, and a ledger it cannot
    reach is no reason to park anything."""


class LedgerBusy(LedgerError, Transient):
    """The ledger's write lock (or a row lock) was not had in time: try again later."""


class LedgerContention(LedgerBusy):
    """Two agents' transactions deadlocked or could not be serialized: the PostgreSQL engine
    runs the transaction again from the start, a few times, before giving this up."""


class LedgerUnavailable(LedgerError, Transient):
    """The connection to the ledger was lost, or its server is shutting down or starting."""


class LedgerRefused(StoreError):
    """A constraint or a guard of the ledger refused a write (a key bound twice, a second
    open purchase, a transition not in agent/lifecycle.py): the write, not the ledger, is
    wrong, and nothing of the transaction happened."""


class LedgerDataError(LedgerRefused):
    """A value the ledger cannot store (text with no UTF-8, a NUL, a number out of range)."""


@dataclass(frozen=True, slots=True)
class DeliveredSince:
    """Lines delivered since a time: how many, and their latency (seconds from the ledger
    seeing the order to its delivery) at the 50th and 99th percentile (nearest rank)."""

    count: int
    p50: float | None
    p99: float | None


class Store(Protocol):
    async def open(self) -> None:
        """Opens the ledger (or makes it, when asked to create one), checked and up to date."""

    async def close(self) -> None:
        """Closes the ledger; writes already queued still get their commit."""

    def ledger_lost(self) -> str | None:
        """Why the ledger opened is no longer the one at its address (its file deleted or
        replaced while we run), or None. Cheap (a stat): the daemon asks every few seconds."""

    # --- intake ---------------------------------------------------------------------
    async def ingest(
        self, platform: str, orders: Sequence[PlatformOrder | RejectedOrder], now: float
    ) -> list[int]:
        """Insert order lines idempotently; returns the ids of lines that are new and ready."""

    async def take_in(
        self,
        platform: str,
        orders: Sequence[PlatformOrder | RejectedOrder],
        now: float,
        local_skus: Collection[str],
        delays: Mapping[str, float] | None = None,
    ) -> list[DeliveryIntent | OrderLine]:
        """ingest, then claim_for_delivery of each new line whose SKU sells from local stock
        only: each new line that is ready, claimed if its keys could be bound, else as it
        stands.
        The orders are in the ledger when it returns, claimed or not; a claim is all or
        nothing per line. `delays`: SKU -> seconds a new line of it waits before its keys are
        sent (its next_attempt_at)."""

    async def get_cursor(self, platform: str) -> str | None:
        """The platform's listing cursor, or None before its first listing."""

    async def set_cursor(self, platform: str, cursor: str | None, now: float) -> None:
        """Stores the platform's listing cursor."""

    # --- the order state machine --------------------------------------------------------
    async def due_lines(self, now: float, limit: int) -> list[OrderLine]:
        """Lines due for work that no other agent holds, each now leased to this agent: due
        by their time, and backordered lines the free stock can now fill whole, oldest
        first (so a sweep does not churn on lines that would just be backordered again)."""

    async def get_line(self, line_id: int) -> OrderLine | None:
        """The line, or None if there is no such line."""

    async def take_line(self, line_id: int, now: float) -> OrderLine | None:
        """The line, for this agent to work on; None if another agent sharing the store holds
        it now (its lease), or there is no such line."""

    def singleton(self, name: str) -> AbstractAsyncContextManager[bool]:
        """Enters True when this agent is the one to run job `name` now, False when another
        agent sharing the store is running it."""

    async def allocate(self, line_id: int, now: float, *, backorder: bool = True) -> OrderLine:
        """new/backordered/purchasing -> allocated (binding `quantity` distinct free keys);
        when stock is short: -> backordered, or unchanged with backorder=False."""

    async def backorder(
        self, line_id: int, next_attempt_at: float, reason: str, now: float
    ) -> None:
        """-> backordered; next_attempt_at > 0 offers it to the suppliers again then."""

    # --- purchases ------------------------------------------------------------------------
    async def open_purchase(self, line_id: int) -> Purchase | None:
        """The line's purchase in flight (intent, unknown or processing), if any."""

    async def purchases_for(self, line_id: int) -> list[Purchase]:
        """Every purchase made for the line, oldest first."""

    async def begin_purchase(self, line_id: int, supplier: str, now: float) -> Purchase:
        """Commits the intent (deterministic merchant_ref) before the request; -> purchasing."""

    async def purchase_unknown(self, purchase: Purchase, reason: str, now: float) -> Purchase:
        """-> unknown: sent, its outcome not known; asked about again later."""

    async def purchase_processing(self, purchase: Purchase, purchase_id: str, now: float) -> None:
        """-> processing: the supplier took it, its keys come later."""

    async def purchase_failed(self, purchase: Purchase, failure: str, now: float) -> None:
        """-> failed: a definite failure, after which a new purchase may be made."""

    async def complete_purchase(
        self, purchase: Purchase, purchase_id: str, items: Sequence[CardItem], now: float
    ) -> OrderLine:
        """Stores bought keys and binds them to the line in the same transaction."""

    async def claim_for_delivery(self, line_id: int, now: float) -> DeliveryIntent | OrderLine:
        """allocate + begin_delivery in one transaction: the intent if the keys were bound,
        else the line (backordered, or in whatever state it already was)."""

    async def begin_delivery(self, line_id: int, now: float) -> DeliveryIntent:
        """allocated/delivering -> delivering: commits the idempotency key before the call."""

    async def mark_delivered(self, line_id: int, now: float, detail: str) -> OrderLine:
        """-> delivered (a line delivered already is left as it is)."""

    async def mark_many_delivered(self, deliveries: Sequence[tuple[int, str]], now: float) -> None:
        """mark_delivered for each (line id, detail), in one transaction."""

    async def defer(
        self, line_id: int, next_attempt_at: float, reason: str, *, ambiguous: bool, now: float
    ) -> None:
        """Keep the state, try again at next_attempt_at (long waits live in the row)."""

    async def park(self, line_id: int, reason: str, now: float) -> None:
        """-> needs_attention with the reason; keys stay bound."""

    async def close_line(self, line_id: int, state: LineState, reason: str, now: float) -> None:
        """-> cancelled/refunded because the platform says so."""

    async def add_event(self, line_id: int, kind: str, detail: str, now: float) -> None:
        """Records an event on the line (the audit trail), changing nothing else."""

    # --- operator actions ---------------------------------------------------------------
    async def retry_line(self, line_id: int, now: float) -> OrderLine:
        """needs_attention -> the state it can go on from (see rows.retry_target)."""

    async def resend_line(self, line_id: int, now: float) -> OrderLine:
        """delivered -> delivering with a new delivery generation, so a new idempotency key
        and the platform sends it again (same keys: resend never hands out a second set)."""

    async def revise_parked_line(
        self, line_id: int, sku: str, quantity: int, reason: str | None, now: float
    ) -> OrderLine:
        """A parked line holding nothing yet, with the SKU and quantity its platform states
        now: -> new (reason None), or parked again with `reason`."""

    async def bound_count(self, line_id: int) -> int:
        """How many keys are bound to the line."""

    async def buyer_lines(
        self, contacts: Sequence[str], since: float
    ) -> list[tuple[str, str, str, str, int]]:
        """(platform, order id, buyer contact, sku, quantity) of these buyers' lines taken in
        since a time, bar those not sold (parked, cancelled)."""

    async def find_lines(self, order_ref: str) -> list[OrderLine]:
        """The lines of a platform order id, else the line with that row id."""

    async def delivered_lines_of(self, platform: str, order_ids: Sequence[str]) -> list[OrderLine]:
        """The lines of these platform orders that the ledger records as delivered."""

    async def list_lines(self, state: LineState | None, limit: int) -> list[OrderLine]:
        """The newest lines (in one state, if given), newest first."""

    async def filter_lines(
        self, state: LineState | None, sku: str, platform: str, limit: int
    ) -> list[OrderLine]:
        """The newest lines in `state`, of `sku`, on `platform` (each when given)."""

    async def delivered_since(self, since: float) -> DeliveredSince:
        """Exact count and p50/p99 latency (seen -> delivered) of lines delivered since."""

    async def events(self, line_id: int) -> list[OrderEvent]:
        """The line's audit trail, oldest first."""

    async def count_by_state(self) -> dict[LineState, int]:
        """How many lines are in each state."""

    # --- forecast, alerts, outbox ----------------------------------------------------------
    async def demand_since(self, since: float) -> list[tuple[str, float, int]]:
        """(sku, time, quantity) of real demand since a time, for the sales rate: summed per
        SKU and DEMAND_BUCKET_SECONDS, at the mean time of the orders summed."""

    async def free_counts(self) -> dict[str, int]:
        """Free keys per SKU, counted from the free keys' index, not the whole key table."""

    async def stock_position(self, bought_since: float | None) -> StockPosition:
        """What the stock sync publishes from: free keys and units of lines still waiting for
        keys (new, backordered, purchasing) per SKU, and (unless `bought_since` is None) units
        of purchases not failed and updated at or after `bought_since`. Read in this order, so
        a line that takes keys meanwhile is counted twice, never missed."""

    async def active_lines(self, limit: int) -> list[OrderLine]:
        """Lines the engine still drives, oldest first."""

    async def apply_alerts(
        self,
        active: Sequence[AlertCondition],
        channels: Sequence[str],
        now: float,
        escalate_after: float,
        max_escalations: int,
    ) -> list[AlertMessage]:
        """Opens/escalates/resolves alerts and queues one outbox row per channel, atomically."""

    async def open_alerts(self) -> list[OpenAlert]:
        """The alerts open now, oldest first."""

    async def closed_alerts(self, limit: int) -> list[ClosedAlert]:
        """The alerts closed, newest first: each time one was resolved."""

    async def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
        """Messages to send now, oldest first."""

    async def outbox_done(
        self, item_id: int, now: float, *, error: str | None = None, retry_at: float | None = None
    ) -> None:
        """Sent (no error), to retry at `retry_at`, or dead (error and no retry)."""

    # --- buyer side -----------------------------------------------------------------------
    async def lines_needing_notice(self, seen_before: float, limit: int) -> list[OrderLine]:
        """Lines the buyer waits for, seen before a time, not told of the wait yet."""

    async def mark_notice_sent(self, line_id: int, message: str, now: float) -> None:
        """Records that the buyer was told of the wait."""

    async def begin_refund(self, line_id: int, now: float) -> str | None:
        """Commits the refund key if the line is backordered with no keys and no purchase."""

    async def refunds_in_flight(self) -> list[tuple[OrderLine, str]]:
        """Backordered lines whose refund key is committed: (line, refund key)."""

    async def replace_key(
        self, line_id: int, slot: int | None, reason: str, now: float
    ) -> tuple[OrderLine, str]:
        """delivered -> delivering: the key in `slot` void with the reason, a fresh one in
        its place, a new delivery generation; (line, the delivery key it replaces)."""

    async def begin_merchant_refund(
        self, line_id: int, reason: str, now: float
    ) -> tuple[OrderLine, str]:
        """Commits the refund key of a merchant's refund; (line, key). StoreError when the
        line is closed or has a delivery or purchase under way."""

    async def drop_refund(self, line_id: int, why: str, now: float) -> None:
        """The platform refused the refund: the key cleared, the refusal recorded."""

    # --- stock ----------------------------------------------------------------------------
    async def import_keys(
        self,
        sku: str,
        items: Iterable[CardItem],
        source: str,
        now: float,
        progress: ProgressCallback | None = None,
    ) -> ImportReport:
        """Stores card keys as free stock, each batch in a transaction of its own (the
        agents' writes flow between batches; an interrupted import is simply run again:
        keys already held are counted, not stored twice)."""

    async def void_free_keys(self, sku: str, count: int | None, reason: str, now: float) -> int:
        """Voids free keys of the SKU (all, or `count`), with a reason; how many."""

    async def unvoid_keys(self, sku: str, reason: str, count: int | None, now: float) -> int:
        """void -> free for keys of the SKU voided with exactly `reason` (all, or `count` of
        them, oldest first) that were never bound to an order; how many."""

    async def stock_counts(self) -> list[StockCount]:
        """Free (sellable), bound and void keys per SKU, and free keys past their expiry."""

    async def bound_items(self, line_id: int) -> tuple[CardItem, ...]:
        """The keys bound to the line, opened, in slot order."""

    async def export_keys(self, sku: str, state: KeyState) -> list[CardItem]:
        """Decrypted keys, for `kami-agent stock export` only."""

    async def rotate_data_key(self, now: float, batch: int = 10_000) -> tuple[int, int]:
        """Seals every card key with a fresh data key; returns (new key id, rows moved)."""

    async def integrity_check(self) -> str:
        """The engine's check of every page and index: 'ok', or the first problem."""

    # --- consignment: platform pools (agent/consignment.py) -----------------------------------
    async def ensure_pool(self, platform: str, cpc_id: str, sku: str, now: float) -> Pool:
        """The pool, recorded the first time it is named; StoreError for a pool recorded
        for another SKU."""

    async def begin_pool_add(self, pool: Pool, count: int, now: float) -> PoolAddIntent | None:
        """Commits an add intent (deterministic reference) with up to `count` free keys of
        the pool's SKU consigned to it, before the call; None when there is no free key."""

    async def open_pool_adds(self, platform: str) -> list[PoolAddIntent]:
        """The platform's adds not settled yet, each with the keys it still holds consigned."""

    async def pool_add_deferred(
        self, add_id: int, reason: str, *, unclear: bool, now: float
    ) -> None:
        """The call did not settle the add; `unclear`: it may have taken effect (-> unknown)."""

    async def finish_pool_add(
        self, add_id: int, sent: int, added: int, refused: int, first: bool, now: float
    ) -> PoolAddState:
        """The platform's answer to an add of `sent` keys (`first`: the intent's first call,
        where a refusal is a key the pool did not take): -> added or partial."""

    async def fail_pool_add(self, add_id: int, reason: str, now: float) -> bool:
        """Definitely nothing added: -> failed, the keys free again (an intent only)."""

    async def park_pool_add(self, add_id: int, reason: str, now: float) -> None:
        """An add that cannot be settled: -> partial, its keys kept consigned."""

    async def pool_levels(self, platform: str) -> list[PoolLevel]:
        """Each pool of the platform with the keys the ledger holds consigned to it."""

    async def consigned_counts(self) -> dict[str, int]:
        """Keys consigned to platform pools, per SKU."""

    async def pool_adds(self, platform: str) -> list[PoolAdd]:
        """Every add to the platform's pools, oldest first."""

    async def record_pool_sale(
        self, line_id: int, items: Sequence[CardItem], now: float
    ) -> PoolSaleRecord:
        """Binds the keys the platform's pool sent for the line; delivered when they are
        exactly its keys, else parked with the reason (the keys bound all the same)."""

    async def begin_stock_back(self, pool: Pool, count: int, now: float) -> list[ConsignedKey]:
        """Marks up to `count` consigned keys of the pool as being given back, before the
        calls."""

    async def returning_keys(self, platform: str) -> list[ConsignedKey]:
        """Keys whose StockBack began and was not settled."""

    async def stock_back_done(self, key_ids: Sequence[int], now: float) -> int:
        """The pool gave these keys back: free again."""

    async def keep_consigned(self, key_ids: Sequence[int], now: float) -> int:
        """A StockBack settled the other way: the keys stay consigned."""
