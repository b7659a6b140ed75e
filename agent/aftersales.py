"""The merchant's actions on one order that involve its platform, shared by the CLI, the
console and the Telegram bot: retry a parked order (read anew from the platform and screened
as intake screens), replace a bad key on a delivered order, refund an order.

Each is bracketed like the engine's calls: the ledger's transaction first (the intent, with
its deterministic key), then the platform's call, then its result in the ledger.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from agent.config import Config
from agent.domain import AgentError, LineState, OrderLine, PlatformOrder, RejectedOrder
from agent.intake import screen_order
from agent.platforms.base import Platform
from agent.screening import Screening
from agent.store.base import Store

REPLACED_NOTICE = "key_replaced"


class ActionRefused(AgentError):
    """The action was not done; the message says why, for the merchant."""


def notice_key(line: OrderLine, kind: str, generation: int) -> str:
    """The Idempotency-Key of a buyer notice about one after-sales action."""
    name = f"{line.platform}\x1f{line.order_id}\x1f{line.line}\x1f{kind}\x1f{generation}"
    return f"kami-notice-{hashlib.sha256(name.encode()).hexdigest()[:24]}"


class AfterSales:
    def __init__(
        self,
        config: Config,
        store: Store,
        platform_for: Callable[[str], Platform | None],
        clock: Callable[[], float],
    ) -> None:
        """`platform_for(name)`: the adapter of a configured platform, or None."""
        self.config = config
        self.store = store
        self.platform_for = platform_for
        self.clock = clock
        self.screening = Screening(config.agent, config.skus, store)

    def _platform(self, line: OrderLine, what: str) -> Platform:
        platform = self.platform_for(line.platform)
        if platform is None:
            raise ActionRefused(
                f"platform {line.platform!r} of order {line.order_id} is not configured:"
                f" cannot {what}"
            )
        return platform

    # --- retry ----------------------------------------------------------------------------
    async def retry(self, line: OrderLine) -> OrderLine:
        """A parked line back to work. One that holds nothing yet (parked at intake, say for
        an unknown SKU) is read again from its platform first and screened as intake screens
        it: its SKU and quantity are the platform's now, and an order still refused stays
        parked with the new reason (ActionRefused says it). Others go on as they stand."""
        if line.state != LineState.NEEDS_ATTENTION:
            raise ActionRefused(
                f"order {line.order_id} is {line.state}; only needs_attention can be retried"
            )
        holds = line.delivery_key is not None or await self.store.bound_count(line.id) > 0
        if holds or await self.store.open_purchase(line.id) is not None:
            return await self.store.retry_line(line.id, self.clock())
        platform = self._platform(line, "read the order again")
        remote = await platform.get_order(line.order_id)
        if remote.status in ("cancelled", "refunded"):
            reason = f"platform reports {remote.status} (read again at retry)"
            await self.store.close_line(line.id, LineState(remote.status), reason, self.clock())
            raise ActionRefused(f"order {line.order_id}: {reason}; closed as {remote.status}")
        if remote.status != "paid":
            raise ActionRefused(
                f"order {line.order_id}: platform reports status {remote.status[:40]!r}, not paid"
            )
        order = remote.order
        if order is None:
            if line.quantity < 1:
                raise ActionRefused(
                    f"order {line.order_id}: its platform does not say what was ordered, and it"
                    " was parked before its quantity was known; deliver it by hand"
                )
            order = PlatformOrder(line.order_id, "paid", line.sku, line.quantity)
        screened = screen_order(order, self.config.skus)
        if isinstance(screened, PlatformOrder):
            (screened,) = await self.screening.screen(line.platform, [screened], self.clock())
        if isinstance(screened, RejectedOrder) or screened is None:
            reason = screened.reason if screened is not None else "not paid"
            sku = screened.sku if screened is not None else line.sku
            quantity = screened.quantity if screened is not None else 0
            if quantity >= 1:
                await self.store.revise_parked_line(line.id, sku, quantity, reason, self.clock())
            raise ActionRefused(f"order {line.order_id} stays parked: {reason}")
        return await self.store.revise_parked_line(
            line.id, screened.sku, screened.quantity, None, self.clock()
        )
