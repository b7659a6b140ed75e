"""Which orders are delivered: the rules intake applies to every order before it enters the
ledger, and that `orders retry` applies again to a parked order read anew from its platform.

Pure rules first (agent/intake.py: screen_order: paid, a known SKU, a sane quantity), then the
buyer's: a blocked contact, and the purchase limits per buyer (all SKUs within a window, and
per SKU). The limits read the buyer's recent lines from the ledger, once per page and only
when a limit is configured; orders of one page count against each other in their order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from agent.config import AgentSettings, SkuSettings
from agent.domain import PlatformOrder, RejectedOrder
from agent.reasons import BLOCKED_BUYER, BUYER_LIMIT, BUYER_LIMIT_SKU, english
from agent.store.base import Store

Screened = PlatformOrder | RejectedOrder


def contact_key(contact: str) -> str:
    """How contacts are compared: any case, surrounding blanks ignored."""
    return contact.strip().casefold()


class Screening:
    """The buyer rules of one shop's config (see the module docstring)."""

    def __init__(
        self, settings: AgentSettings, skus: Mapping[str, SkuSettings], store: Store
    ) -> None:
        self.settings = settings
        self.skus = skus
        self.store = store
        self._blocked = frozenset(contact_key(c) for c in settings.blocked_buyers)
        self._blocked_per_sku = {
            sku: frozenset(contact_key(c) for c in s.blocked_buyers)
            for sku, s in skus.items()
            if s.blocked_buyers
        }
        self._limited = settings.buyer_limit > 0 or any(s.buyer_limit for s in skus.values())

    def blocked(self, order: PlatformOrder) -> RejectedOrder | None:
        """The order parked with the reason when its buyer is blocked, else None."""
        if order.buyer_contact is None:
            return None
        who = contact_key(order.buyer_contact)
        if who in self._blocked:
            where = "[agent] blocked_buyers"
        elif who in self._blocked_per_sku.get(order.sku, ()):
            where = f"[skus.{order.sku}] blocked_buyers"
        else:
            return None
        return _rejected(order, english(BLOCKED_BUYER, where=where))

    async def screen(self, platform: str, orders: Sequence[Screened], now: float) -> list[Screened]:
        """The orders as intake takes them in: each one as it is, or rejected with the reason
        (those already rejected stay so). Orders of `platform` already in the ledger are not
        counted twice against a limit (a re-listing sees them again)."""
        out: list[Screened] = []
        for order in orders:
            if isinstance(order, PlatformOrder) and (refused := self.blocked(order)):
                out.append(refused)
            else:
                out.append(order)
        if not self._limited:
            return out
        return await self._limit(platform, out, now)

    async def _limit(self, platform: str, orders: list[Screened], now: float) -> list[Screened]:
        contacts = sorted(
            {o.buyer_contact for o in orders if isinstance(o, PlatformOrder) and o.buyer_contact}
        )
        if not contacts:
            return orders
        since = now - self.settings.buyer_limit_window
        listed = {o.order_id for o in orders}
        total: Counter[str] = Counter()
        per_sku: Counter[tuple[str, str]] = Counter()
        for row in await self.store.buyer_lines(contacts, since):
            line_platform, order_id, contact, sku, quantity = row
            if line_platform == platform and order_id in listed:
                continue  # this very order, taken in before: counted below
            total[contact_key(contact)] += quantity
            per_sku[(contact_key(contact), sku)] += quantity
        out: list[Screened] = []
        for order in orders:
            if not isinstance(order, PlatformOrder) or not order.buyer_contact:
                out.append(order)
                continue
            who = contact_key(order.buyer_contact)
            reason = self._over_limit(order, total[who], per_sku[(who, order.sku)])
            if reason is not None:
                out.append(_rejected(order, reason))
                continue
            total[who] += order.quantity
            per_sku[(who, order.sku)] += order.quantity
            out.append(order)
        return out

    def _over_limit(self, order: PlatformOrder, bought: int, bought_sku: int) -> str | None:
        hours = f"{self.settings.buyer_limit_window / 3600:g}"
        sku = self.skus.get(order.sku)
        if sku is not None and sku.buyer_limit and bought_sku + order.quantity > sku.buyer_limit:
            return english(
                BUYER_LIMIT_SKU,
                bought=bought_sku,
                sku=order.sku,
                hours=hours,
                quantity=order.quantity,
                limit=sku.buyer_limit,
            )
        limit = self.settings.buyer_limit
        if limit and bought + order.quantity > limit:
            return english(
                BUYER_LIMIT, bought=bought, hours=hours, quantity=order.quantity, limit=limit
            )
        return None


def _rejected(order: PlatformOrder, reason: str) -> RejectedOrder:
    return RejectedOrder(order.order_id, reason, sku=order.sku, quantity=order.quantity)
