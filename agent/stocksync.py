"""Keeps the stock shown on the platforms true: publishes, per SKU and platform, what the agent
can surely fill (agent/stockcapacity.py), within seconds of a change, without flooding.

A monotonic-clock loop recomputes from the ledger every TICK seconds (a few indexed counts,
cheap) and publishes only what changed, to every platform adapter with a `publish_stock`
(agent.platforms.base.StockPublisher). Coalesced per SKU and platform: a lower count goes out
at most every DECREASE_SPACING seconds, a higher one every INCREASE_SPACING, the latest value
winning. Publishing too high is the danger, so an increase is what waits.

Oversell 0 (docs/protocol/platform-http.md, v1.1): each count is published with the listing
cursor `as_of` read BEFORE the ledger is counted. Every paid order listed before that cursor is
in the ledger (the cursor is stored only after its page is committed), so the count accounts
for it: its keys are bound, or its line is counted as waiting. The platform subtracts the sales
after `as_of` itself, so a sale the agent has not listed yet is never sold twice.

One SKU on several platforms: the count is shared out (the platforms each sell their share),
and a platform's count may only rise as far as the others' last counts leave room for: the sum
of what the platforms may still sell never exceeds what can be filled.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from agent.config import LOCAL_SOURCE, SkuSettings
from agent.domain import AgentError, Ambiguous, Held, StockNotOffered, Transient, retry_delay
from agent.logs import get_logger
from agent.platforms.base import Platform, StockPublisher, WatermarkedStockPublisher
from agent.stockcapacity import capacities
from agent.store.base import Store
from agent.suppliers.base import ProductCatalog, Supplier, SupplierProduct

log = get_logger("kami.stocksync")

TICK = 0.5  # seconds between recounts
DECREASE_SPACING = 0.5  # a lower count goes out at most this often per SKU and platform
INCREASE_SPACING = 2.0  # a higher count waits this long after the last publication
REPUBLISH_EVERY = 300.0  # an unchanged count is published again (a platform may forget)
SUPPLIER_REFRESH = 5.0  # seconds between reads of the suppliers' products and balances
# Purchases are counted from a little before the suppliers were read: agents sharing a
# ledger stamp them with their own clocks.
CLOCK_MARGIN = 10.0
LEADER_RETRY = 5.0  # another agent sharing the ledger publishes; look again this often
RETRY_BASE, RETRY_CAP = 1.0, 60.0
PUBLISH_CONCURRENCY = 8
UNKNOWN = math.inf  # what a platform may still sell when we do not know what it holds


@dataclass
class Outlet:
    """One SKU on one platform, as far as this agent knows."""

    value: int | None = None  # the count the platform surely holds from us; None: unsure
    as_of: str | None = None  # the watermark it holds with `value`
    # The most the platform may still sell on our counts (a count we sent, or might have:
    # it only falls as the platform sells); None: unknown (a count from before our start).
    exposure: int | None = None
    sent_at: float = -math.inf  # monotonic time of the last publication tried
    retry_at: float = -math.inf
    failures: int = 0
    off: bool = False  # the platform sells no such SKU

    def due(self, count: int, now: float, as_of: str | None = None) -> bool:
        """Whether `count` as of cursor `as_of` should go out now (coalescing; the latest count
        wins). The same count as of a later cursor is a rise: the platform holds it less the
        sales since the earlier one."""
        if self.off or now < self.retry_at:
            return False
        since = now - self.sent_at
        if self.value is None or count < self.value:
            return since >= DECREASE_SPACING
        if count > self.value or as_of != self.as_of:
            return since >= INCREASE_SPACING
        return since >= REPUBLISH_EVERY


@dataclass(frozen=True, slots=True)
class SupplierView:
    """The suppliers' last word: products per (supplier, SKU) and balances, read from
    `read_at` (wall clock, like the ledger's purchase times)."""

    read_at: float
    offers: Mapping[tuple[str, str], SupplierProduct] = field(default_factory=dict)
    balances: Mapping[str, Decimal] = field(default_factory=dict)


def _buys_upstream(sku: SkuSettings) -> bool:
    return sku.max_price is not None and any(s != LOCAL_SOURCE for s in sku.sources)


class SupplierWatch:
    """Reads, every SUPPLIER_REFRESH seconds, what each supplier still sells of the SKUs
    bought from it within max_price, and its balance. A supplier that cannot say (an error,
    no ProductCatalog port) is left out: it counts for nothing until it answers again."""

    def __init__(
        self,
        skus: Mapping[str, SkuSettings],
        suppliers: Mapping[str, Supplier],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.skus = skus
        self.suppliers = suppliers
        self.clock = clock
        self.view = SupplierView(read_at=clock())
        self._silent: set[tuple[str, str | None]] = set()  # failing, already logged
        self.wanted = {
            (source, name)
            for name, sku in skus.items()
            if _buys_upstream(sku)
            for source in sku.sources
            if source != LOCAL_SOURCE and source in suppliers
        }

    async def refresh(self) -> None:
        read_at = self.clock()
        names = sorted({supplier for supplier, _ in self.wanted})
        balances = await asyncio.gather(*(self._balance(name) for name in names))
        keys = sorted(self.wanted)
        products = await asyncio.gather(*(self._product(s, sku) for s, sku in keys))
        self.view = SupplierView(
            read_at=read_at,
            offers={key: p for key, p in zip(keys, products, strict=True) if p is not None},
            balances={n: b for n, b in zip(names, balances, strict=True) if b is not None},
        )

    async def run(self) -> None:
        if not self.wanted:
            return  # no SKU is bought upstream within a max_price
        while True:
            try:
                await self.refresh()
            except Exception:
                _stop_if_cancelled()
                log.exception("supplier_watch_failed")
            _stop_if_cancelled()
            await asyncio.sleep(SUPPLIER_REFRESH)

    async def _balance(self, name: str) -> Decimal | None:
        try:
            amount = (await self.suppliers[name].balance()).amount
        except AgentError as exc:
            self._unknown((name, None), str(exc))
            return None
        self._known((name, None))
        return amount

    async def _product(self, name: str, sku: str) -> SupplierProduct | None:
        supplier = self.suppliers[name]
        if not isinstance(supplier, ProductCatalog):
            self._unknown((name, sku), "this kind of supplier cannot say what it sells")
            return None
        product = self.skus[sku].supplier_sku(name)
        try:
            offer = await supplier.product(product)
        except AgentError as exc:
            self._unknown((name, sku), str(exc))
            return None
        self._known((name, sku))
        return offer

    def _unknown(self, what: tuple[str, str | None], error: str) -> None:
        """Logged once until the supplier answers again: it is read every few seconds."""
        if what not in self._silent:
            self._silent.add(what)
            supplier, sku = what
            log.warning(
                "stock_supplier_unknown",
                supplier=supplier,
                sku=sku,
                what="product" if sku else "balance",
                error=error,
                counted=0,
            )

    def _known(self, what: tuple[str, str | None]) -> None:
        if what in self._silent:
            self._silent.discard(what)
            log.info("stock_supplier_known", supplier=what[0], sku=what[1])


def _stop_if_cancelled() -> None:
    """A cancel that reached a ledger call mid-query can come out as the driver's error (a
    PostgreSQL connection broken off): the task is still being cancelled, so stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class StockSync:
    def __init__(
        self,
        skus: Mapping[str, SkuSettings],
        store: Store,
        platforms: Mapping[str, Platform],
        suppliers: Mapping[str, Supplier],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.skus = skus
        self.store = store
        self.publishers: dict[str, StockPublisher] = {
            name: p for name, p in platforms.items() if isinstance(p, StockPublisher)
        }
        self.watch = SupplierWatch(skus, suppliers, clock)
        self.outlets = {(p, sku): Outlet() for p in self.publishers for sku in skus}
        self.published = 0  # publications that reached the platform
        self._waiting_for_cursor: set[str] = set()
        self._limit = asyncio.Semaphore(PUBLISH_CONCURRENCY)

    async def run(self) -> None:
        """Runs until cancelled, on one agent at a time among those sharing the ledger: what
        each platform may still sell is known only to the agent that published it."""
        if not self.publishers or not self.skus:
            return
        while True:
            try:
                async with self.store.singleton("stocksync") as ours:
                    if ours:
                        await self._lead()
            except Exception as exc:
                _stop_if_cancelled()
                log.warning("stock_sync_failed", error=str(exc), kind=type(exc).__name__)
            await asyncio.sleep(LEADER_RETRY)

    async def _lead(self) -> None:
        watch = asyncio.create_task(self.watch.run(), name="stock-sync-suppliers")
        failing = False
        try:
            while True:
                started = time.monotonic()
                try:
                    await self.step()
                except Exception as exc:  # e.g. the ledger does not answer: try again
                    _stop_if_cancelled()
                    if not failing:  # once per outage, not twice a second
                        log.warning("stock_sync_failed", error=str(exc), kind=type(exc).__name__)
                    failing = True
                else:
                    if failing:
                        log.info("stock_sync_recovered")
                    failing = False
                _stop_if_cancelled()  # also when a publication swallowed it
                await asyncio.sleep(max(0.0, TICK - (time.monotonic() - started)))
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def step(self) -> None:
        """One recount, and the publications it makes due."""
        # The cursors first: every order listed before them is in the ledger counted next.
        cursors: dict[str, str | None] = {}
        for name, publisher in self.publishers.items():
            if isinstance(publisher, WatermarkedStockPublisher):
                cursor = await self.store.get_cursor(name)
                if cursor is None:
                    if name not in self._waiting_for_cursor:
                        self._waiting_for_cursor.add(name)
                        log.info("stock_waits_for_first_listing", platform=name)
                    continue
                cursors[name] = cursor
            else:
                cursors[name] = None
        view = self.watch.view
        buying = any(_buys_upstream(sku) for sku in self.skus.values())
        position = await self.store.stock_position(view.read_at - CLOCK_MARGIN if buying else None)
        fillable = capacities(self.skus, position, view.offers, view.balances)
        now = time.monotonic()
        # Lower counts first, and all of them through, before any count rises: the room a
        # platform's count may rise into is what the others' counts leave.
        lower = [
            (name, sku, count)
            for sku in self.skus
            for name, count in self._counts(sku, fillable[sku], cursors).items()
            if self._lowers(self.outlets[name, sku], count)
            and self.outlets[name, sku].due(count, now, cursors[name])
        ]
        await self._publish_all(lower, cursors)
        higher: list[tuple[str, str, int]] = []
        for sku in self.skus:
            for name, count in self._counts(sku, fillable[sku], cursors).items():
                outlet = self.outlets[name, sku]
                if self._lowers(outlet, count) or not outlet.due(count, now, cursors[name]):
                    continue
                # Reserved before it is sent, so the next platform's room already excludes it.
                outlet.exposure = max(outlet.exposure or 0, count)
                higher.append((name, sku, count))
        await self._publish_all(higher, cursors)

    @staticmethod
    def _lowers(outlet: Outlet, count: int) -> bool:
        return outlet.value is None or count < outlet.value

    def _counts(self, sku: str, fillable: int, cursors: Mapping[str, str | None]) -> dict[str, int]:
        """The count for each platform that sells `sku` and can be published to now: its
        share of `fillable`, at most the room the other platforms' counts leave."""
        selling = sorted(
            name for name in self.publishers if not self.outlets[name, sku].off and name in cursors
        )
        others = [
            name
            for name in self.publishers
            if not self.outlets[name, sku].off and name not in cursors
        ]
        everyone = selling + others
        share, extra = divmod(max(0, fillable), max(1, len(everyone)))
        counts: dict[str, int] = {}
        for index, name in enumerate(selling):
            rest = sum(self._exposure(other, sku) for other in everyone if other != name)
            room = fillable - rest
            target = share + (1 if index < extra else 0)
            counts[name] = int(max(0, min(target, room)))
        return counts

    def _exposure(self, name: str, sku: str) -> float:
        exposure = self.outlets[name, sku].exposure
        return UNKNOWN if exposure is None else exposure

    async def _publish_all(
        self, plan: list[tuple[str, str, int]], cursors: Mapping[str, str | None]
    ) -> None:
        if plan:
            await asyncio.gather(
                *(self._publish(name, sku, count, cursors[name]) for name, sku, count in plan)
            )

    async def _publish(self, name: str, sku: str, count: int, as_of: str | None) -> None:
        outlet = self.outlets[name, sku]
        publisher = self.publishers.get(name)
        if publisher is None or outlet.off:
            return  # the platform turned the endpoint down meanwhile
        async with self._limit:
            outlet.sent_at = time.monotonic()
            try:
                if as_of is not None and isinstance(publisher, WatermarkedStockPublisher):
                    await publisher.publish_stock_as_of(sku, count, as_of)
                else:
                    await publisher.publish_stock(sku, count)
            except StockNotOffered as exc:
                self._not_offered(name, sku, exc)
                return
            except Held as exc:
                # Not a failure: the adapter keeps the platform's spacing; the latest count
                # goes out when it allows (no back-off, no warning every spacing).
                outlet.retry_at = time.monotonic() + exc.retry_after
                log.info(
                    "stock_publish_held",
                    platform=name,
                    sku=sku,
                    available=count,
                    retry_in_s=round(exc.retry_after, 1),
                )
                return
            except Exception as exc:
                self._failed(name, sku, outlet, count, exc)
                return
        outlet.value = outlet.exposure = count
        outlet.as_of = as_of
        outlet.failures = 0
        self.published += 1
        log.info("stock_published", platform=name, sku=sku, available=count, as_of=as_of)

    def _not_offered(self, name: str, sku: str, exc: StockNotOffered) -> None:
        if exc.sku is None:
            # No stock endpoint: this platform sells without our counts. Logged once.
            self.publishers.pop(name, None)
            for (platform, _), outlet in self.outlets.items():
                if platform == name:
                    outlet.off, outlet.exposure = True, 0
            log.warning("stock_not_offered", platform=name, error=str(exc))
            return
        outlet = self.outlets[name, sku]
        outlet.off, outlet.exposure = True, 0
        log.warning("stock_not_offered", platform=name, sku=sku, error=str(exc))

    def _failed(self, name: str, sku: str, outlet: Outlet, count: int, exc: Exception) -> None:
        outlet.failures += 1
        delay = retry_delay(outlet.failures, RETRY_BASE, RETRY_CAP)
        if isinstance(exc, Transient) and exc.retry_after:
            delay = max(delay, exc.retry_after)
        outlet.retry_at = time.monotonic() + delay
        if not isinstance(exc, AgentError) or isinstance(exc, Ambiguous):
            # It may have been applied: the platform holds this count or the one before.
            outlet.value = None
            outlet.exposure = None if outlet.exposure is None else max(outlet.exposure, count)
        if isinstance(exc, AgentError):
            log.warning(
                "stock_publish_failed",
                platform=name,
                sku=sku,
                available=count,
                error=str(exc),
                kind=type(exc).__name__,
                retry_in_s=round(delay, 1),
            )
        else:
            log.error("stock_publish_failed", platform=name, sku=sku, exc_info=exc)
