"""The merchant's actions on one order that involve its platform, shared by the CLI, the
console and the Telegram bot: retry a parked order (read anew from the platform and screened
as intake screens), replace a bad key on a delivered order, refund an order.

Each is bracketed like the engine's calls: the ledger's transaction first (the intent, with
its deterministic key), then the platform's call, then its result in the ledger.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from agent.config import Config
from agent.domain import (
    AgentError,
    CardItem,
    LineState,
    OrderLine,
    Permanent,
    PlatformOrder,
    RejectedOrder,
)
from agent.i18n import N_, Translator
from agent.intake import screen_order
from agent.phrased import Phrase, phrased, rephrased
from agent.platforms.agiso_messages import render
from agent.platforms.base import KeyReplacer, Platform
from agent.reasons import (
    NOT_PAID,
    PLATFORM_REPORTS_AT_RETRY,
    REFUND_REFUSED,
    REPLACEMENT_REFUSED,
    StoredReason,
    english,
)
from agent.replacement import tell_replaced
from agent.screening import Screening
from agent.store.base import Store, StoreError

T = TypeVar("T")


class ActionRefused(AgentError):
    """The action was not done; the message says why, for the merchant."""


async def operator_action(
    config: Config, store: Store, clock: Callable[[], float], action: str, line_id: int
) -> OrderLine:
    """`retry` or `resend` of one line, as the CLI, the console and the bot all do it: a
    retry goes through AfterSales.retry (a line parked at intake is read again from its
    platform and screened again: buyer limits, blacklist, SKU), a resend straight to the
    ledger."""
    if action == "resend":
        return await store.resend_line(line_id, clock())
    line = await store.get_line(line_id)
    if line is None:
        raise phrased(ActionRefused, N_("no order line #%(line)s"), line=line_id)
    return await with_platforms(config, store, clock, lambda a: a.retry(line))


async def with_platforms(
    config: Config,
    store: Store,
    clock: Callable[[], float],
    act: Callable[[AfterSales], Awaitable[T]],
) -> T:
    """`act` with the after-sales actions, each platform adapter they need built on first use
    and closed after (the CLI and the console share this)."""
    from agent.runtime import build_platform  # the runtime imports half the agent

    built: dict[str, Platform] = {}

    def platform_for(name: str) -> Platform | None:
        if name not in built:
            settings = next((p for p in config.platforms if p.name == name), None)
            if settings is None:
                return None
            built[name] = build_platform(settings)
        return built[name]

    try:
        return await act(AfterSales(config, store, platform_for, clock))
    finally:
        for platform in built.values():
            await platform.close()


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
        self._buyers = Translator(config.agent.buyers_language)  # what buyers read
        self.clock = clock
        self.screening = Screening(config.agent, config.skus, store)

    def _platform(self, line: OrderLine, what: Phrase) -> Platform:
        platform = self.platform_for(line.platform)
        if platform is None:
            raise phrased(
                ActionRefused,
                N_("platform %(platform)r of order %(order)s is not configured: cannot %(what)s"),
                platform=line.platform,
                order=line.order_id,
                what=what,
            )
        return platform

    # --- retry ----------------------------------------------------------------------------
    async def retry(self, line: OrderLine) -> OrderLine:
        """A parked line back to work. One that holds nothing yet (parked at intake, say for
        an unknown SKU) is read again from its platform first and screened as intake screens
        it: its SKU and quantity are the platform's now, and an order still refused stays
        parked with the new reason (ActionRefused says it). Others go on as they stand."""
        if line.state != LineState.NEEDS_ATTENTION:
            raise phrased(
                ActionRefused,
                N_("order %(order)s is %(state)s; only needs_attention can be retried"),
                order=line.order_id,
                state=line.state,
            )
        holds = line.delivery_key is not None or await self.store.bound_count(line.id) > 0
        if holds or await self.store.open_purchase(line.id) is not None:
            return await self.store.retry_line(line.id, self.clock())
        platform = self._platform(line, Phrase(N_("read the order again")))
        remote = await platform.get_order(line.order_id)
        if remote.status in ("cancelled", "refunded"):
            reason = PLATFORM_REPORTS_AT_RETRY[remote.status]
            await self.store.close_line(line.id, LineState(remote.status), reason, self.clock())
            raise phrased(
                ActionRefused,
                N_(
                    "order %(order)s: platform reports %(status)s (read again at retry); closed"
                    " as %(status)s"
                ),
                order=line.order_id,
                status=remote.status,
            )
        if remote.status != "paid":
            raise phrased(
                ActionRefused,
                N_("order %(order)s: platform reports status %(status)r, not paid"),
                order=line.order_id,
                status=remote.status[:40],
            )
        order = remote.order
        if order is None:
            if line.quantity < 1:
                raise phrased(
                    ActionRefused,
                    N_(
                        "order %(order)s: its platform does not say what was ordered, and it was"
                        " parked before its quantity was known; deliver it by hand"
                    ),
                    order=line.order_id,
                )
            order = PlatformOrder(line.order_id, "paid", line.sku, line.quantity)
        screened = screen_order(order, self.config.skus)
        if isinstance(screened, PlatformOrder):
            (screened,) = await self.screening.screen(line.platform, [screened], self.clock())
        if isinstance(screened, RejectedOrder) or screened is None:
            reason = screened.reason if screened is not None else NOT_PAID
            sku = screened.sku if screened is not None else line.sku
            quantity = screened.quantity if screened is not None else 0
            if quantity >= 1:
                await self.store.revise_parked_line(line.id, sku, quantity, reason, self.clock())
            raise phrased(
                ActionRefused,
                N_("order %(order)s stays parked: %(reason)s"),
                order=line.order_id,
                reason=StoredReason(reason),
            )
        return await self.store.revise_parked_line(
            line.id, screened.sku, screened.quantity, None, self.clock()
        )

    # --- refund ---------------------------------------------------------------------------
    async def refund(self, line: OrderLine, reason: str) -> OrderLine:
        """A refund the merchant asked for, through the platform's refund call: the line's
        deterministic refund key committed first (a crash or a lost answer repeats the same
        refund), then the call, then the line closed `refunded`; its keys stay bound (the
        buyer may have seen them). A platform that refuses refunds (Permanent) leaves the
        line as it stood; an unclear answer (Transient/Ambiguous) keeps the key, so running
        the command again asks the platform with the same key."""
        reason = reason.strip()
        if not reason:
            raise phrased(ActionRefused, N_("say why the order is refunded (--reason)"))
        platform = self._platform(line, Phrase(N_("refund")))
        try:
            line, key = await self.store.begin_merchant_refund(line.id, reason, self.clock())
        except StoreError as exc:
            raise rephrased(ActionRefused, exc) from None
        try:
            await platform.refund(line.order_id, key, reason)
        except Permanent as exc:
            await self.store.drop_refund(line.id, english(REFUND_REFUSED, error=exc), self.clock())
            raise phrased(
                ActionRefused,
                N_("order %(order)s not refunded: platform %(platform)s refused: %(why)s"),
                order=line.order_id,
                platform=line.platform,
                why=exc,
            ) from None
        except AgentError as exc:
            # Unclear: the key stays committed, so asking again repeats the same refund.
            raise phrased(
                ActionRefused,
                N_(
                    "order %(order)s: the refund's outcome is unknown (%(why)s); run the same"
                    " refund again: it is sent with the same key, so it refunds at most once"
                ),
                order=line.order_id,
                why=exc,
            ) from None
        await self.store.close_line(line.id, LineState.REFUNDED, reason, self.clock())
        closed = await self.store.get_line(line.id)
        assert closed is not None
        return closed

    # --- replace a bad key ----------------------------------------------------------------
    async def replace_key(self, line: OrderLine, reason: str, slot: int | None = None) -> OrderLine:
        """A bad key on a delivered line replaced by a fresh one, and the buyer told. Checked
        first (a platform that cannot replace delivered keys is refused with nothing
        changed), then one ledger transaction (old key void with the reason, naming its
        line; a fresh key in its slot; the line delivering with a new delivery generation),
        then the platform's replacement naming the delivery it replaces, then the line
        delivered and the buyer's notice (idempotent per generation). An unclear answer
        leaves the line delivering for the engine's reconciliation."""
        reason = reason.strip()
        if not reason:
            raise phrased(ActionRefused, N_("say why the key is replaced (--reason)"))
        platform = self._platform(line, Phrase(N_("replace a key")))
        if not isinstance(platform, KeyReplacer):
            raise phrased(
                ActionRefused,
                N_(
                    "platform %(platform)s cannot replace the keys of a delivered order; nothing"
                    " changed (void the key with `stock void` and deliver by hand)"
                ),
                platform=line.platform,
            )
        try:
            line, previous = await self.store.replace_key(line.id, slot, reason, self.clock())
            intent = await self.store.begin_delivery(line.id, self.clock())
        except StoreError as exc:
            raise rephrased(ActionRefused, exc) from None
        message = self._message(line, intent.items)
        try:
            await platform.replace_delivery(
                line.order_id, intent.idempotency_key, previous, intent.items, message
            )
        except Permanent as exc:
            # A definite no: the old key stays void (it is bad), the fresh one bound; the
            # merchant decides (a platform-http 1.0 platform answers so).
            why = english(REPLACEMENT_REFUSED, error=exc)
            await self.store.park(line.id, why, self.clock())
            raise phrased(
                ActionRefused,
                N_("order %(order)s: key replacement refused by the platform: %(why)s; parked"),
                order=line.order_id,
                why=exc,
            ) from None
        done = await self.store.mark_delivered(line.id, self.clock(), "replacement delivered")
        try:
            await tell_replaced(platform, self.store, intent, reason, self.clock, self._buyers)
        except AgentError as exc:
            # The keys are delivered; the message alone is missing: said, not undone.
            raise phrased(
                ActionRefused,
                N_(
                    "order %(order)s: the fresh key is delivered, but the buyer's notice failed"
                    " (%(why)s); tell the buyer by hand"
                ),
                order=line.order_id,
                why=exc,
            ) from None
        return done

    def _message(self, line: OrderLine, items: Sequence[CardItem]) -> str:
        """The delivery message as the engine writes it (agent/delivery.py)."""
        sku = self.config.skus.get(line.sku)
        template = sku.message if sku is not None and sku.message else None
        if template is None:
            template = self.config.agent.message_with_keys()
        if "{" not in template and "}" not in template:
            return template
        return render(template, line.order_id, line.sku, line.quantity, items, append_cards=False)
