"""Consignment: a SKU sold from a platform's own card pool (Agiso's 卡种) that the agent keeps
topped up from the ledger, instead of delivering each order itself.

Two halves, both bracketed by the ledger like every external call:

- `PoolKeeper`, one per platform account with pools: each round it settles what an earlier
  round (or process) left unsettled, then keeps every pool's level between its bounds. An add
  is committed first (its keys `consigned` in the same transaction, its reference
  deterministic), then called, then its answer committed. An add whose outcome is unclear (a
  lost answer, a 5xx, a crash) is settled by adding the SAME keys again with allowReplace off:
  those already in the pool are refused as duplicates, the others go in; never other keys.
  Keys beyond the pool's high bound are given back (StockBack) the same way: marked first,
  freed only when the pool says it gave them back; an unclear StockBack adds the key again.
- `ConsignedSales`, for the engine: an order line of a consigned SKU on that platform is the
  pool's to deliver. The engine never binds keys to it nor sends any; it asks the platform
  which keys the pool sent (its send log) and binds those (consigned -> bound), so the ledger
  says which buyer got which key, and marks the line delivered. A line still waiting for the
  pool is looked at again later, and parked with the reason after `pool_sale_wait`.

A consigned key is never free, so the agent's own deliveries (other SKUs, the same SKU on other
platforms) can never take it; the stock sync does not count it (not the agent's to sell), the
forecast does (it is still stock being sold).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from agent.crashpoints import crash_point
from agent.domain import (
    Ambiguous,
    AuthFailed,
    CardItem,
    LineState,
    OrderLine,
    Permanent,
    RemoteDelivery,
    Transient,
)
from agent.logs import get_logger
from agent.platforms.base import Platform
from agent.pool_domain import (
    ConsignedKey,
    Pool,
    PoolAddAnswer,
    PoolAddIntent,
    PoolAddState,
    PoolBounds,
)
from agent.reasons import (
    PLATFORM_REPORTS,
    POOL_AFTER_BOUND_KEYS,
    POOL_LOG_NOT_READ,
    POOL_LOG_UNREADABLE,
    POOL_WAITING,
    english,
)
from agent.store.base import Store

log = get_logger("kami.consignment")

RECHECK_MIN = 1.0  # seconds before a line waiting for the pool is looked at again, at first
RECHECK_MAX = 300.0  # ... and at most, later on
FAILING_RETRY = 30.0  # a keeper round that failed is tried again this soon


@runtime_checkable
class PoolPlatform(Protocol):
    """Optional port of a platform account that sells SKUs from its own card pools
    (agent/platforms/agiso.py)."""

    name: str

    def pool_bounds(self) -> Mapping[str, PoolBounds]:
        """Our SKU -> its pool, and the level kept there."""
        ...

    @property
    def pool_interval(self) -> float:
        """Seconds between the keeper's rounds."""
        ...

    @property
    def pool_sale_wait(self) -> float:
        """How long an order may wait for the pool to send its keys before it is parked."""
        ...

    @property
    def pool_batch(self) -> int:
        """Keys one add carries at most."""
        ...

    async def pool_levels(self, cpc_ids: Sequence[str]) -> dict[str, int]:
        """The keys left in each pool, by the platform (may be approximate)."""
        ...

    async def add_to_pool(
        self, cpc_id: str, items: Sequence[CardItem], reference: str
    ) -> PoolAddAnswer:
        """Adds the keys, never replacing one already there (a repeat is refused)."""
        ...

    async def take_back(self, cpc_id: str, item: CardItem) -> int:
        """Takes one key back out of the pool: 1 if it came back, 0 if the pool does not hold
        it unsold."""
        ...

    async def pool_sale(self, order_id: str, sku: str) -> RemoteDelivery:
        """What the pool sent for an order: delivered (with the keys), paid (nothing yet),
        cancelled or refunded."""
        ...


def consigned_skus(platform: Platform | object) -> frozenset[str]:
    """The SKUs a platform account sells from its own pools (none for most platforms)."""
    if isinstance(platform, PoolPlatform):
        return frozenset(platform.pool_bounds())
    return frozenset()


class ConsignedSales:
    """The engine's side: lines of a consigned SKU are recorded from the pool's send log,
    never delivered by the agent."""

    def __init__(
        self, store: Store, platforms: Mapping[str, Platform], clock: Callable[[], float]
    ) -> None:
        self.store = store
        self.clock = clock
        self.platforms: dict[str, PoolPlatform] = {
            name: p for name, p in platforms.items() if isinstance(p, PoolPlatform)
        }
        self._skus = {name: consigned_skus(p) for name, p in self.platforms.items()}

    def covers(self, line: OrderLine) -> bool:
        """True when the line's SKU is sold from a pool on its platform."""
        return line.sku in self._skus.get(line.platform, ())

    async def settle(self, line: OrderLine) -> None:
        """Records what the pool sent for the line, or looks again later."""
        platform = self.platforms[line.platform]
        now = self.clock()
        if line.state not in (LineState.NEW, LineState.BACKORDERED):
            # Keys the agent bound before the SKU was consigned here: the pool delivers this
            # order too, so sending them as well would give the buyer two sets.
            await self._park(line, POOL_AFTER_BOUND_KEYS)
            return
        try:
            remote = await platform.pool_sale(line.order_id, line.sku)
        except Permanent as exc:
            await self._park(line, english(POOL_LOG_UNREADABLE, error=exc))
            return
        except (Transient, Ambiguous) as exc:
            await self._later(line, english(POOL_LOG_NOT_READ, error=exc), now)
            return
        if remote.status in ("cancelled", "refunded"):
            await self.store.close_line(
                line.id, LineState(remote.status), PLATFORM_REPORTS[remote.status], now
            )
            return
        overdue = now - line.seen_at >= platform.pool_sale_wait
        if remote.status == "delivered" and (len(remote.items) >= line.quantity or overdue):
            record = await self.store.record_pool_sale(line.id, remote.items, now)
            if record.were_free:
                log.warning("pool_sold_free_keys", order_id=line.order_id, keys=record.were_free)
            if record.delivered:
                log.info(
                    "pool_sale_recorded",
                    platform=line.platform,
                    order_id=line.order_id,
                    sku=line.sku,
                    quantity=line.quantity,
                )
            else:
                log.error(
                    "needs_attention",
                    order_id=line.order_id,
                    sku=line.sku,
                    reason="pool sale does not match the ledger",
                    unknown=record.unknown,
                    conflicts=record.conflicts,
                )
            return
        if overdue:
            await self._park(
                line,
                f"阿奇索卡池在 {platform.pool_sale_wait:.0f} 秒内没有为该订单发出卡密（卡池空了？"
                f"自动发货关闭了？）：请在后台核对 (the pool sent no keys for this order in"
                f" {platform.pool_sale_wait:.0f} s: check the pool and Agiso's auto-delivery)",
            )
            return
        await self._later(line, POOL_WAITING, now)

    async def _later(self, line: OrderLine, reason: str, now: float) -> None:
        # The pool usually sends within seconds; its send log may lag ("等待5分钟后再尝试").
        delay = min(RECHECK_MAX, max(RECHECK_MIN, (now - line.seen_at) / 4))
        await self.store.defer(line.id, now + delay, reason, ambiguous=False, now=now)

    async def _park(self, line: OrderLine, reason: str) -> None:
        await self.store.park(line.id, reason, self.clock())
        log.error("needs_attention", order_id=line.order_id, sku=line.sku, reason=reason)


class PoolKeeper:
    """Keeps one platform account's pools topped up from the ledger (see the module)."""

    def __init__(
        self, store: Store, platform: PoolPlatform, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.platform = platform
        self.clock = clock
        self._pools: dict[str, Pool] = {}  # our SKU -> its pool in the ledger
        self._short: set[str] = set()  # SKUs with no free key to add, logged once

    async def run(self) -> None:
        """Runs until cancelled, on one agent at a time among those sharing the ledger."""
        while True:
            delay = self.platform.pool_interval
            try:
                async with self.store.singleton(f"pools:{self.platform.name}") as ours:
                    if ours:
                        await self.keep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "pool_keeper_failed",
                    platform=self.platform.name,
                    error=str(exc),
                    kind=type(exc).__name__,
                )
                delay = min(delay, FAILING_RETRY)
            await asyncio.sleep(delay)

    async def keep(self) -> None:
        """One round: settle what is unsettled, then bring each pool within its bounds."""
        await self.settle()
        bounds = self.platform.pool_bounds()
        if not bounds:
            return
        for sku, bound in bounds.items():
            if sku not in self._pools:
                self._pools[sku] = await self.store.ensure_pool(
                    self.platform.name, bound.cpc_id, sku, self.clock()
                )
        levels = await self.platform.pool_levels([b.cpc_id for b in bounds.values()])
        for sku, bound in bounds.items():
            level = levels.get(bound.cpc_id)
            if level is None:
                log.warning("pool_level_unknown", platform=self.platform.name, pool=bound.cpc_id)
                continue
            pool = self._pools[sku]
            if level < bound.low:
                await self._top_up(pool, bound.high - level)
            elif level > bound.high:
                await self._give_back(pool, level - bound.high)

    async def settle(self) -> None:
        """Adds an earlier round (or a killed process) left open are added again with the
        same keys; StockBacks left open add their keys again (consigned, as before)."""
        for intent in await self.store.open_pool_adds(self.platform.name):
            if not intent.items:  # every key sold meanwhile: in the pool for sure
                await self.store.finish_pool_add(
                    intent.add.id, 0, 0, 0, first=False, now=self.clock()
                )
                continue
            if intent.add.state is PoolAddState.UNKNOWN:
                # What the pool holds, for the record: an approximate count, no list.
                levels = await self.platform.pool_levels([intent.add.pool.cpc_id])
                log.info(
                    "pool_add_reconcile",
                    platform=self.platform.name,
                    pool=intent.add.pool.cpc_id,
                    reference=intent.add.reference,
                    keys=len(intent.items),
                    pool_level=levels.get(intent.add.pool.cpc_id),
                )
            await self._add(intent, first=False)
        returning = await self.store.returning_keys(self.platform.name)
        if returning:
            await self._add_back(returning)

    async def _top_up(self, pool: Pool, wanted: int) -> None:
        while wanted > 0:
            count = min(wanted, self.platform.pool_batch)
            intent = await self.store.begin_pool_add(pool, count, self.clock())
            if intent is None:
                if pool.sku not in self._short:
                    self._short.add(pool.sku)
                    log.warning(
                        "pool_no_free_keys",
                        platform=self.platform.name,
                        sku=pool.sku,
                        pool=pool.cpc_id,
                    )
                return
            self._short.discard(pool.sku)
            crash_point("after_pool_intent")
            if not await self._add(intent, first=True):
                return  # not settled: the next round tries the same keys again
            wanted -= len(intent.items)

    async def _add(self, intent: PoolAddIntent, *, first: bool) -> bool:
        """The add call and its outcome committed; True when it is settled."""
        add, now = intent.add, self.clock()
        try:
            answer = await self.platform.add_to_pool(add.pool.cpc_id, intent.items, add.reference)
        except Ambiguous as exc:
            await self.store.pool_add_deferred(add.id, str(exc), unclear=True, now=now)
            log.warning("pool_add_unclear", reference=add.reference, error=str(exc))
            return False
        except (AuthFailed, Transient) as exc:  # nothing happened: the same keys later
            await self.store.pool_add_deferred(add.id, str(exc), unclear=False, now=now)
            log.warning("pool_add_deferred", reference=add.reference, error=str(exc))
            return False
        except Permanent as exc:
            if first and await self.store.fail_pool_add(add.id, str(exc), now):
                log.error("pool_add_refused", reference=add.reference, error=str(exc))
            else:  # an earlier call may have added them: kept consigned
                await self.store.park_pool_add(add.id, str(exc), now)
                log.error("pool_add_unsettled", reference=add.reference, error=str(exc))
            return True
        crash_point("after_pool_add_call")
        sent = len(intent.items)
        state = await self.store.finish_pool_add(
            add.id, sent, answer.added, answer.refused, first, self.clock()
        )
        if state is PoolAddState.PARTIAL:
            log.error(
                "pool_add_partial",
                platform=self.platform.name,
                pool=add.pool.cpc_id,
                reference=add.reference,
                added=answer.added,
                refused=answer.refused,
                kept_consigned=sent,
            )
        else:
            log.info(
                "pool_added",
                platform=self.platform.name,
                pool=add.pool.cpc_id,
                reference=add.reference,
                added=answer.added,
                already=answer.refused,
            )
        return True

    async def _give_back(self, pool: Pool, surplus: int) -> None:
        keys = await self.store.begin_stock_back(pool, surplus, self.clock())
        back: list[int] = []
        kept: list[int] = []
        unclear: list[ConsignedKey] = []
        for key in keys:
            try:
                count = await self.platform.take_back(pool.cpc_id, key.item)
            except (Ambiguous, Transient) as exc:
                # It may be out of the pool (or not): adding it again makes it consigned
                # for sure. Done below, before anything else.
                log.warning("pool_stock_back_unclear", pool=pool.cpc_id, error=str(exc))
                unclear.append(key)
                continue
            except Permanent as exc:
                log.error("pool_stock_back_refused", pool=pool.cpc_id, error=str(exc))
                kept.append(key.key_id)
                continue
            (back if count > 0 else kept).append(key.key_id)
        crash_point("after_stock_back_call")
        now = self.clock()
        if back:
            await self.store.stock_back_done(back, now)
        if kept:  # not in the pool unsold: sold (its sale is recorded when listed)
            await self.store.keep_consigned(kept, now)
        if unclear:
            await self._add_back(unclear)
        log.info("pool_stock_back", pool=pool.cpc_id, back=len(back), kept=len(kept))

    async def _add_back(self, keys: Sequence[ConsignedKey]) -> None:
        """Keys whose StockBack is unclear, added again: afterwards the pool holds each (or
        has sold it), which is what `consigned` says."""
        by_pool: dict[str, list[ConsignedKey]] = {}
        for key in keys:
            by_pool.setdefault(key.pool.cpc_id, []).append(key)
        for cpc_id, group in by_pool.items():
            for start in range(0, len(group), self.platform.pool_batch):
                batch = group[start : start + self.platform.pool_batch]
                try:
                    await self.platform.add_to_pool(
                        cpc_id, [k.item for k in batch], f"kami-stock-back-{batch[0].key_id}"
                    )
                except (Ambiguous, Transient) as exc:
                    log.warning("pool_add_back_deferred", pool=cpc_id, error=str(exc))
                    continue  # still marked: tried again next round
                except Permanent as exc:
                    log.error("pool_add_back_refused", pool=cpc_id, error=str(exc))
                await self.store.keep_consigned([k.key_id for k in batch], self.clock())


def keepers(store: Store, platforms: Mapping[str, Platform]) -> list[PoolKeeper]:
    """A keeper for every platform account with pools."""
    return [
        PoolKeeper(store, p)
        for p in platforms.values()
        if isinstance(p, PoolPlatform) and p.pool_bounds()
    ]
