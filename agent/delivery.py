"""Delivery of one order line: claim its keys, send them, reconcile, retry, park, close.

Every external call is bracketed by ledger transactions: the intent (with a deterministic
idempotency key) is committed before the call, the result after it. A line found in
`delivering` with an attempt already made is reconciled with the platform before anything
is sent again.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from agent.coalesce import Coalescer
from agent.config import AgentSettings, SkuSettings
from agent.consignment import ConsignedSales
from agent.crashpoints import crash_point
from agent.domain import (
    ACTIVE_STATES,
    AgentError,
    Ambiguous,
    CardItem,
    DeliveryConflict,
    DeliveryIntent,
    LineState,
    OrderClosed,
    OrderLine,
    Permanent,
    Transient,
    retry_delay,
)
from agent.engine_stats import EngineStats
from agent.i18n import Translator
from agent.logs import get_logger
from agent.platforms.agiso_messages import render
from agent.platforms.base import Platform
from agent.reasons import (
    CONFIRMED_BY_PLATFORM,
    NO_REASON_RECORDED,
    OTHER_KEYS,
    PLATFORM_CANNOT_SHOW,
    PLATFORM_NOT_CONFIGURED,
    PLATFORM_REPORTS,
    RECONCILE_FAILED,
    STILL_PAID_RESENDING,
    STILL_UNDELIVERED,
    UNEXPECTED_STATUS,
    english,
)
from agent.replacement import replace_delivery, tell_replaced
from agent.sourcing import Sourcing
from agent.store.base import Store, StoreError

log = get_logger("kami.engine")


def log_backordered(line: OrderLine) -> None:
    log.info("backordered", order_id=line.order_id, sku=line.sku, quantity=line.quantity)


def _same_items(a: Sequence[CardItem], b: Sequence[CardItem]) -> bool:
    return Counter((i.code, i.secret) for i in a) == Counter((i.code, i.secret) for i in b)


class Delivery:
    """Takes one line at a time through its states, up to delivered, closed or parked."""

    def __init__(
        self,
        settings: AgentSettings,
        skus: Mapping[str, SkuSettings],
        store: Store,
        platforms: Mapping[str, Platform],
        sourcing: Sourcing,
        stats: EngineStats,
        clock: Callable[[], float],
        consigned: ConsignedSales | None = None,
    ) -> None:
        """`consigned`: the lines a platform's own pool delivers (agent/consignment.py)."""
        self.settings = settings
        self._buyers = Translator(settings.buyers_language)  # what buyers read
        self.skus = skus
        self.store = store
        self.platforms = platforms
        self.sourcing = sourcing
        self.stats = stats
        self.clock = clock
        self.consigned = consigned
        # Deliveries finishing together are recorded in one ledger call (a flash sale).
        self._delivered: Coalescer[tuple[int, str]] = Coalescer(
            lambda batch: self.store.mark_many_delivered(batch, self.clock())
        )

    async def process(self, line_id: int) -> None:
        """Takes the line as far as it goes now: bought, claimed, delivered; or left for
        later (a retry due, a backorder) with the reason in the ledger."""
        # None when another agent sharing the store is working on the line right now.
        line = await self.store.take_line(line_id, self.clock())
        if line is not None and self.consigned is not None and self.consigned.covers(line):
            # The platform's pool delivers it: never a key of ours, only its record.
            if line.state in ACTIVE_STATES and line.next_attempt_at <= self.clock():
                await self.consigned.settle(line)
            return
        while line is not None and line.state in ACTIVE_STATES:
            waiting = line.next_attempt_at > self.clock()
            if line.state == LineState.BACKORDERED:
                # Stock may have arrived before the next supplier round is due.
                line = await self.sourcing.fill(line, suppliers=not waiting)
            elif waiting:
                return
            elif line.state == LineState.NEW and self.sourcing.local_only(line.sku):
                await self._claim_and_deliver(line)
                return
            elif line.state == LineState.NEW:
                line = await self.sourcing.fill(line)
            elif line.state == LineState.PURCHASING:
                line = await self.sourcing.resume(line)
            else:
                await self._deliver(line)
                return
            crash_point("after_allocate")
            if line.state != LineState.ALLOCATED:
                if line.state == LineState.BACKORDERED:
                    log_backordered(line)
                return

    async def _platform_for(self, line: OrderLine) -> Platform | None:
        """The line's platform, or None after parking a line whose platform left the config."""
        platform = self.platforms.get(line.platform)
        if platform is None:
            await self.park(line, english(PLATFORM_NOT_CONFIGURED, platform=line.platform))
        return platform

    async def _claim_and_deliver(self, line: OrderLine) -> None:
        """The common case in one ledger call: bind the keys and commit the delivery intent
        together (a flash sale is mostly this), then deliver."""
        platform = await self._platform_for(line)
        if platform is None:
            return
        claimed = await self.store.claim_for_delivery(line.id, self.clock())
        crash_point("after_allocate")
        if isinstance(claimed, DeliveryIntent):
            crash_point("after_intent")
            await self._send_recorded(platform, claimed.line, claimed)
        elif claimed.state == LineState.BACKORDERED:
            log_backordered(line)

    async def _deliver(self, line: OrderLine) -> None:
        platform = await self._platform_for(line)
        if platform is None:
            return
        needs_reconcile = line.state == LineState.DELIVERING and (
            line.attempts > 0 or line.ambiguous
        )
        if needs_reconcile and not await self._reconcile(line, platform):
            return
        if line.attempts >= self.settings.max_delivery_attempts:
            await self.park(
                line,
                english(
                    STILL_UNDELIVERED,
                    attempts=line.attempts,
                    reason=line.reason or NO_REASON_RECORDED,
                ),
            )
            return
        try:
            intent = await self.store.begin_delivery(line.id, self.clock())
        except StoreError as exc:
            current = await self.store.get_line(line.id)
            if current is not None and current.state not in ACTIVE_STATES:
                # Settled meanwhile (on a shared ledger, by another agent that took the line
                # up when our lease ran out): nothing left to do, and nothing to park.
                log.info("line_settled_meanwhile", order_id=line.order_id, state=current.state)
                return
            await self.park(line, str(exc))
            return
        crash_point("after_intent")
        await self._send_recorded(platform, line, intent)

    async def _send_recorded(
        self, platform: Platform, line: OrderLine, intent: DeliveryIntent
    ) -> None:
        recording = await self.send(platform, line, intent)
        if recording is not None:
            await recording

    async def send(
        self, platform: Platform, line: OrderLine, intent: DeliveryIntent
    ) -> asyncio.Future[None] | None:
        """The delivery call, its intent already committed; then its outcome committed. A
        failure is committed before returning (None); a delivery is returned as its
        recording in the ledger, under way, for the caller to wait for or hand off."""
        message = self._message_for(platform, line, intent.items)
        replaces = intent.line.replaces
        try:
            if replaces is None:
                await platform.deliver(line.order_id, intent.idempotency_key, intent.items, message)
            else:  # a key replacement whose caller died after its ledger step
                await replace_delivery(platform, line, intent, replaces, message)
        except DeliveryConflict as exc:
            await self.park(line, str(exc))
            return None
        except OrderClosed as exc:
            await self._close(line, exc.status, str(exc))
            return None
        except Permanent as exc:
            await self.park(line, str(exc))
            return None
        except Ambiguous as exc:
            await self._retry_later(
                intent.line, str(exc), ambiguous=True, retry_after=exc.retry_after
            )
            return None
        except Transient as exc:
            await self._retry_later(
                intent.line, str(exc), ambiguous=False, retry_after=exc.retry_after
            )
            return None
        crash_point("after_deliver_call")
        recording = self._delivered.enqueue((line.id, f"key {intent.idempotency_key}"))
        if replaces is not None:
            await self._tell_replaced(platform, intent)
        self.stats.delivered += 1
        self.stats.last_progress = self.clock()
        log.info(
            "delivered",
            order_id=line.order_id,
            sku=line.sku,
            quantity=line.quantity,
            attempt=intent.line.attempts,
            latency_ms=round((self.clock() - line.seen_at) * 1000, 1),
        )
        return recording

    async def _tell_replaced(self, platform: Platform, intent: DeliveryIntent) -> None:
        """The buyer's notice of a replacement the engine finished; best effort (the keys
        are delivered: a missing message is logged, not retried)."""
        try:
            await tell_replaced(platform, self.store, intent, None, self.clock, self._buyers)
        except AgentError as exc:
            log.warning("replacement_notice_failed", order_id=intent.line.order_id, error=str(exc))

    async def _reconcile(self, line: OrderLine, platform: Platform) -> bool:
        """Ask the platform what became of an earlier attempt; True = safe to send (again)."""
        try:
            remote = await platform.get_order(line.order_id)
        except Permanent as exc:
            await self.park(line, english(PLATFORM_CANNOT_SHOW, error=exc))
            return False
        except (Transient, Ambiguous) as exc:
            await self._retry_later(line, english(RECONCILE_FAILED, error=exc), ambiguous=True)
            return False
        now = self.clock()
        if remote.status == "delivered":
            ours = await self.store.bound_items(line.id)
            if line.replaces is not None and not _same_items(ours, remote.items):
                # The delivery being replaced is still the platform's: replace it now (the
                # platform refuses, DeliveryConflict, if its delivery is another one).
                return True
            if _same_items(ours, remote.items):
                await self.store.mark_delivered(line.id, now, CONFIRMED_BY_PLATFORM)
                self.stats.delivered += 1
                self.stats.last_progress = now
                log.info(
                    "delivered",
                    order_id=line.order_id,
                    sku=line.sku,
                    quantity=line.quantity,
                    confirmed=True,
                )
            else:
                await self.park(line, OTHER_KEYS)
            return False
        if remote.status in ("refunded", "cancelled"):
            await self._close(line, remote.status, PLATFORM_REPORTS[remote.status])
            return False
        if remote.status != "paid":
            await self.park(line, english(UNEXPECTED_STATUS, status=remote.status[:40]))
            return False
        await self.store.add_event(line.id, "reconciled", STILL_PAID_RESENDING, now)
        return True

    async def _retry_later(
        self, line: OrderLine, reason: str, *, ambiguous: bool, retry_after: float | None = None
    ) -> None:
        now = self.clock()
        backoff = retry_delay(line.attempts, self.settings.retry_base, self.settings.retry_cap)
        delay = max(backoff, retry_after or 0.0)
        await self.store.defer(line.id, now + delay, reason, ambiguous=ambiguous, now=now)
        self.stats.retries += 1
        log.warning(
            "delivery_retry_scheduled",
            order_id=line.order_id,
            reason=reason,
            ambiguous=ambiguous,
            delay_s=round(delay, 2),
        )

    async def _close(self, line: OrderLine, status: str, reason: str) -> None:
        """The platform closed the order (cancelled or refunded): so do we; its keys stay
        bound to the line, as for every line that may have reached the buyer."""
        await self.store.close_line(line.id, LineState(status), reason, self.clock())
        log.warning("order_closed_by_platform", order_id=line.order_id, status=status)

    async def park(self, line: OrderLine, reason: str) -> None:
        """Sets the line aside for the merchant with the reason (the needs-attention alert
        follows from the ledger)."""
        await self.store.park(line.id, reason, self.clock())
        self.stats.parked += 1
        log.error("needs_attention", order_id=line.order_id, sku=line.sku, reason=reason)

    def _message_for(self, platform: Platform, line: OrderLine, items: Sequence[CardItem]) -> str:
        """The SKU's message (else the shop's), its template filled in for this order. A
        platform that renders messages itself (Agiso: within its channels' limits) gets the
        template as it is."""
        settings = self.skus.get(line.sku)
        if settings is not None and settings.message:
            template = settings.message
        else:
            template = self.settings.message_with_keys()
        if ("{" not in template and "}" not in template) or getattr(
            platform, "renders_messages", False
        ):
            return template
        # The keys travel as the delivery's items: a template naming none gets none appended.
        return render(template, line.order_id, line.sku, line.quantity, items, append_cards=False)
