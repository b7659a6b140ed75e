"""Keeping the buyer informed: a notice with an ETA for orders waiting on stock, and the
optional automatic refund once a SKU's deadline has passed (idempotent, bracketed like a
delivery: the refund key is committed first, so a crash re-sends the same refund)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping

from agent.alerts import MAX_ACTIVE_LINES
from agent.config import Config
from agent.domain import AgentError, LineState, OrderLine
from agent.i18n import Translator
from agent.logs import get_logger
from agent.platforms.base import Platform
from agent.store.base import Store

log = get_logger("kami.buyer")

ETA_NOTICE = "eta"


def notice_idempotency_key(line: OrderLine, kind: str) -> str:
    """Deterministic per line and kind of notice, so the same notice sent again after a lost
    answer (or by another agent sharing the ledger) carries the same key and the platform
    sends the buyer one message (platform-http v1.1)."""
    name = f"{line.platform}\x1f{line.order_id}\x1f{line.line}\x1f{kind}"
    return f"kami-notice-{hashlib.sha256(name.encode()).hexdigest()[:24]}"


class BuyerCare:
    def __init__(
        self,
        config: Config,
        store: Store,
        platforms: Mapping[str, Platform],
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.store = store
        self.platforms = platforms
        self.clock = clock
        # What buyers read (agent.buyer_language, else the merchant's language).
        self._ = Translator(config.agent.buyers_language)

    def eta_message(self, line: OrderLine) -> str:
        sku = self.config.skus.get(line.sku)
        wait = sku.promise if sku else 600.0
        if sku and any(s != "local" for s in sku.sources):
            wait = max(wait, self.config.agent.supplier_retry_interval)
        minutes = max(1, math.ceil(wait / 60))
        return self._.ngettext(
            "Your order %(order)s is waiting for new stock. We expect to deliver it within"
            " about %(n)d minute and will send it automatically.",
            "Your order %(order)s is waiting for new stock. We expect to deliver it within"
            " about %(n)d minutes and will send it automatically.",
            minutes,
        ) % {"order": line.order_id, "n": minutes}

    def refund_reason(self, line: OrderLine) -> str:
        """Sent with the refund (the platform may show it to the buyer) and kept in the
        ledger as the line's reason."""
        return self._("%(sku)s out of stock past the delivery deadline") % {"sku": line.sku}

    async def run(self) -> None:
        await self.send_notices()
        await self.refund_overdue()

    async def send_notices(self) -> int:
        now = self.clock()
        sent = 0
        for line in await self.store.lines_needing_notice(
            now - self.config.alerts.buyer_notice_after, 200
        ):
            platform = self.platforms.get(line.platform)
            if platform is None:
                continue
            message = self.eta_message(line)
            key = notice_idempotency_key(line, ETA_NOTICE)
            try:
                await platform.notice(line.order_id, message, key)
            except AgentError as exc:
                log.warning("buyer_notice_failed", order_id=line.order_id, error=str(exc))
                continue
            # A crash or a lost answer right here sends the notice again with the same key: a
            # platform that honours it (v1.1) does not message the buyer twice.
            await self.store.mark_notice_sent(line.id, message, self.clock())
            sent += 1
        return sent

    async def refund_overdue(self) -> int:
        now = self.clock()
        refunded = 0
        refunding = any(sku.refund_after is not None for sku in self.config.skus.values())
        # Most shops never auto-refund: then there is nothing to scan for.
        waiting = await self.store.active_lines(MAX_ACTIVE_LINES) if refunding else []
        for line in waiting:
            sku = self.config.skus.get(line.sku)
            if (
                sku is None
                or sku.refund_after is None
                or line.state != LineState.BACKORDERED
                or now - line.seen_at < sku.refund_after
            ):
                continue
            await self.store.begin_refund(line.id, now)
        for line, key in await self.store.refunds_in_flight():
            platform = self.platforms.get(line.platform)
            if platform is None:
                continue
            reason = self.refund_reason(line)
            try:
                await platform.refund(line.order_id, key, reason)
            except AgentError as exc:
                log.warning("refund_failed", order_id=line.order_id, error=str(exc))
                continue
            await self.store.close_line(line.id, LineState.REFUNDED, reason, self.clock())
            log.warning("refunded", order_id=line.order_id, sku=line.sku)
            refunded += 1
        return refunded
