"""Filling an order line: local stock and/or purchases from suppliers, in the SKU's order.

A purchase is bracketed like a delivery: the intent with its deterministic merchant_ref is
committed before the request; an unclear outcome is resolved by asking the supplier about that
reference, never by buying again. Only a definite failure moves on to a new reference or to
the next supplier. Keys bought are bound to the line in the transaction that records them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping

from agent.config import LOCAL_SOURCE, AgentSettings, SkuSettings, SupplierSettings
from agent.crashpoints import crash_point
from agent.domain import (
    ACTIVE_STATES,
    AgentError,
    Ambiguous,
    LineState,
    OrderLine,
    Permanent,
    Purchase,
    PurchaseResult,
    PurchaseState,
    Transient,
    retry_delay,
)
from agent.logs import get_logger
from agent.reasons import (
    BOUGHT_FEWER,
    CHECK_WITH_SUPPLIER,
    COMPLETED_WITHOUT_KEYS,
    LOCAL_STOCK_SHORT,
    NO_SOURCE,
    OPEN_PURCHASE_UNCONFIGURED,
    PURCHASE_OPEN,
    PURCHASE_UNKNOWN_TOO_LONG,
    QUERY_FAILED,
    english,
)
from agent.store.base import Store, StoreError
from agent.suppliers.base import Supplier

log = get_logger("kami.sourcing")


class Outcome(enum.Enum):
    FILLED = "filled"  # keys bound, the line is allocated
    WAITING = "waiting"  # purchase open (processing or unknown); look again later
    FAILED = "failed"  # definite failure: try the next source


class Sourcing:
    def __init__(
        self,
        settings: AgentSettings,
        skus: Mapping[str, SkuSettings],
        store: Store,
        suppliers: Mapping[str, Supplier],
        supplier_settings: Mapping[str, SupplierSettings],
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.skus = skus
        self.store = store
        self.suppliers = suppliers
        self.supplier_settings = supplier_settings
        self.clock = clock

    def sources(self, sku: str) -> tuple[str, ...]:
        settings = self.skus.get(sku)
        return settings.sources if settings is not None else (LOCAL_SOURCE,)

    def local_only(self, sku: str) -> bool:
        return self.sources(sku) == (LOCAL_SOURCE,)

    def buys(self, sku: str) -> bool:
        return any(source != LOCAL_SOURCE for source in self.sources(sku))

    async def fill(
        self, line: OrderLine, *, start_after: str | None = None, suppliers: bool = True
    ) -> OrderLine:
        """Tries each source in order; returns the line allocated, purchasing or backordered."""
        sources = self.sources(line.sku)
        if start_after in sources:
            sources = sources[sources.index(start_after) + 1 :]
        buys = self.buys(line.sku)
        failures: list[str] = []
        for source in sources:
            if source == LOCAL_SOURCE:
                # With suppliers behind it, a short stock is not yet a backorder.
                line = await self.store.allocate(line.id, self.clock(), backorder=not buys)
                if line.state not in ACTIVE_STATES:
                    _log_settled(line)
                    return line
                if line.state == LineState.ALLOCATED or not buys:
                    return line
                failures.append(LOCAL_STOCK_SHORT)
                continue
            if not suppliers:
                continue
            outcome, reason = await self._buy(line, source)
            if outcome is not Outcome.FAILED:
                return await self._reload(line)
            failures.append(f"{source}: {reason}")
        if buys and suppliers:
            now = self.clock()
            reason = "; ".join(failures) or NO_SOURCE
            await self.store.backorder(
                line.id, now + self.settings.supplier_retry_interval, reason[:500], now
            )
            log.warning(
                "no_source_could_fill", order_id=line.order_id, sku=line.sku, reasons=reason[:500]
            )
        return await self._reload(line)

    async def resume(self, line: OrderLine) -> OrderLine:
        """A line in `purchasing`: find out what became of its open purchase."""
        purchase = await self.store.open_purchase(line.id)
        if purchase is None:
            # The last attempt failed for sure (we crashed before moving on): next source.
            history = await self.store.purchases_for(line.id)
            last = history[-1].supplier if history else None
            return await self.fill(line, start_after=last)
        supplier = self.suppliers.get(purchase.supplier)
        if supplier is None:
            await self._park(
                line,
                english(
                    OPEN_PURCHASE_UNCONFIGURED,
                    supplier=purchase.supplier,
                    ref=purchase.merchant_ref,
                ),
            )
            return await self._reload(line)
        try:
            if purchase.state == PurchaseState.PROCESSING and purchase.purchase_id:
                result: PurchaseResult | None = await supplier.get_purchase(
                    purchase.purchase_id, purchase.merchant_ref
                )
            else:
                result = await supplier.find_purchase(purchase.merchant_ref)
        except AgentError as exc:
            await self._still_open(line, purchase, english(QUERY_FAILED, error=exc))
            return await self._reload(line)
        if result is None:
            outcome = await self._never_seen(line, purchase)
        else:
            outcome, _ = await self._apply(line, purchase, result)
        if outcome is Outcome.FAILED:
            return await self.fill(await self._reload(line), start_after=purchase.supplier)
        return await self._reload(line)

    # --- one purchase ------------------------------------------------------------------------
    async def _buy(self, line: OrderLine, supplier_name: str) -> tuple[Outcome, str]:
        try:
            purchase = await self.store.begin_purchase(line.id, supplier_name, self.clock())
        except StoreError:
            current = await self.store.get_line(line.id)
            if current is None or current.state in ACTIVE_STATES:
                raise
            # Settled meanwhile (on a shared ledger, by another agent that took the line up
            # when our lease ran out during a freeze): nothing to buy, and nothing to park.
            _log_settled(current)
            return Outcome.WAITING, "settled meanwhile"
        crash_point("after_purchase_intent")
        return await self._send(line, purchase)

    async def _send(self, line: OrderLine, purchase: Purchase) -> tuple[Outcome, str]:
        supplier = self.suppliers[purchase.supplier]
        sku = self.skus.get(line.sku)
        product = sku.supplier_sku(purchase.supplier) if sku else line.sku
        max_price = sku.max_price if sku else None
        try:
            result = await supplier.purchase(
                purchase.merchant_ref, product, purchase.quantity, max_price
            )
        except Ambiguous as exc:
            await self.store.purchase_unknown(purchase, str(exc), self.clock())
            await self._look_again(line, purchase, self._settings(purchase).query_grace)
            log.warning(
                "purchase_outcome_unknown",
                order_id=line.order_id,
                supplier=purchase.supplier,
                merchant_ref=purchase.merchant_ref,
                error=str(exc),
            )
            return Outcome.WAITING, str(exc)
        except (Transient, Permanent) as exc:
            # Refused before anything was bought (connect error, 4xx, 429, auth).
            await self.store.purchase_failed(purchase, str(exc), self.clock())
            log.warning(
                "purchase_refused",
                order_id=line.order_id,
                supplier=purchase.supplier,
                error=str(exc),
            )
            return Outcome.FAILED, str(exc)
        crash_point("after_purchase_call")
        return await self._apply(line, purchase, result)

    async def _apply(
        self, line: OrderLine, purchase: Purchase, result: PurchaseResult
    ) -> tuple[Outcome, str]:
        now = self.clock()
        if result.status == "completed":
            if not result.items:
                reason = english(
                    COMPLETED_WITHOUT_KEYS,
                    supplier=purchase.supplier,
                    purchase=result.purchase_id,
                )
                await self.store.purchase_failed(purchase, reason, now)
                await self._park(line, english(CHECK_WITH_SUPPLIER, reason=reason))
                return Outcome.WAITING, reason
            filled = await self.store.complete_purchase(
                purchase, result.purchase_id, result.items, now
            )
            log.info(
                "purchased",
                order_id=line.order_id,
                supplier=purchase.supplier,
                keys=len(result.items),
                state=str(filled.state),
            )
            if filled.state == LineState.ALLOCATED:
                return Outcome.FILLED, ""
            return Outcome.FAILED, BOUGHT_FEWER
        if result.status == "processing":
            await self.store.purchase_processing(purchase, result.purchase_id, now)
            await self._look_again(line, purchase, self._settings(purchase).processing_poll)
            return Outcome.WAITING, "processing"
        reason = f"{result.failure_code or 'failed'}: {result.failure_message or ''}".strip()
        await self.store.purchase_failed(purchase, reason, now)
        log.warning(
            "purchase_failed", order_id=line.order_id, supplier=purchase.supplier, failure=reason
        )
        return Outcome.FAILED, reason

    async def _never_seen(self, line: OrderLine, purchase: Purchase) -> Outcome:
        """The supplier has no purchase with our reference."""
        settings = self._settings(purchase)
        age = self.clock() - (purchase.unknown_since or purchase.created_at)
        if purchase.state == PurchaseState.UNKNOWN and age < settings.query_grace:
            # A request still in flight may land in a moment; don't race it.
            await self._look_again(line, purchase, settings.query_grace - age)
            return Outcome.WAITING
        # Sending again with the *same* merchant_ref cannot buy twice: the supplier
        # answers a repeated reference with the existing purchase.
        outcome, _ = await self._send(line, purchase)
        return outcome

    async def _still_open(self, line: OrderLine, purchase: Purchase, reason: str) -> None:
        settings = self._settings(purchase)
        if purchase.state != PurchaseState.PROCESSING:
            purchase = await self.store.purchase_unknown(purchase, reason, self.clock())
        since = purchase.unknown_since or purchase.created_at
        if self.clock() - since > settings.unknown_window:
            await self._park(
                line,
                english(
                    PURCHASE_UNKNOWN_TOO_LONG,
                    supplier=purchase.supplier,
                    ref=purchase.merchant_ref,
                    seconds=f"{settings.unknown_window:.0f}",
                ),
            )
            return
        await self._look_again(
            line, purchase, retry_delay(2, self.settings.retry_base, self.settings.retry_cap)
        )

    async def _look_again(self, line: OrderLine, purchase: Purchase, delay: float) -> None:
        now = self.clock()
        await self.store.defer(
            line.id,
            now + max(delay, 0.0),
            english(PURCHASE_OPEN, ref=purchase.merchant_ref),
            ambiguous=False,
            now=now,
        )

    async def _park(self, line: OrderLine, reason: str) -> None:
        await self.store.park(line.id, reason, self.clock())
        log.error("needs_attention", order_id=line.order_id, sku=line.sku, reason=reason)

    def _settings(self, purchase: Purchase) -> SupplierSettings:
        return self.supplier_settings[purchase.supplier]

    async def _reload(self, line: OrderLine) -> OrderLine:
        fresh = await self.store.get_line(line.id)
        assert fresh is not None
        return fresh


def _log_settled(line: OrderLine) -> None:
    log.info("line_settled_meanwhile", order_id=line.order_id, state=str(line.state))
