"""A bad key's replacement on a delivered order, the part both its callers share: the
after-sales action (agent/aftersales.py), which replaces at once, and the engine
(agent/delivery.py), which finishes a replacement whose caller died after the ledger step
(the line is left `delivering` with `replaces` naming the delivery it replaces)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from agent.domain import DeliveryIntent, OrderLine, Permanent
from agent.i18n import N_, Translator
from agent.platforms.base import KeyReplacer, Platform
from agent.reasons import CANNOT_REPLACE, english
from agent.store.base import Store

REPLACED_NOTICE = "key_replaced"


def notice_key(line: OrderLine, kind: str, generation: int) -> str:
    """The Idempotency-Key of a buyer notice about one after-sales action."""
    name = f"{line.platform}\x1f{line.order_id}\x1f{line.line}\x1f{kind}\x1f{generation}"
    return f"kami-notice-{hashlib.sha256(name.encode()).hexdigest()[:24]}"


def generation_of(intent: DeliveryIntent) -> int:
    """The delivery generation an idempotency key was made for (its last field)."""
    return int(intent.idempotency_key.rsplit("-", 1)[1])


REPLACED = N_(
    "Order %(order)s: a key you received was replaced with a fresh one. The new key has been"
    " delivered to your order."
)
REPLACED_BECAUSE = N_(
    "Order %(order)s: a key you received was replaced with a fresh one (%(reason)s). The new"
    " key has been delivered to your order."
)


def replaced_notice(order_id: str, reason: str | None, _: Translator) -> str:
    """What the buyer is told once the fresh key is delivered, in the buyers' language
    (agent.buyers_language); `reason`, the merchant's words, as typed."""
    if reason:
        return _(REPLACED_BECAUSE) % {"order": order_id, "reason": reason}
    return _(REPLACED) % {"order": order_id}


async def replace_delivery(
    platform: Platform, line: OrderLine, intent: DeliveryIntent, replaces: str, message: str
) -> None:
    """The platform's replacement of the delivery `replaces` by the intent's items. Permanent
    when the platform cannot replace delivered keys."""
    if not isinstance(platform, KeyReplacer):
        raise Permanent(english(CANNOT_REPLACE, platform=line.platform))
    await platform.replace_delivery(
        line.order_id, intent.idempotency_key, replaces, intent.items, message
    )


async def tell_replaced(
    platform: Platform,
    store: Store,
    intent: DeliveryIntent,
    reason: str | None,
    clock: Callable[[], float],
    buyers: Translator,
) -> None:
    """The buyer told that a key of the order was replaced (the notice's Idempotency-Key is
    one per delivery generation, so telling again never says it twice), then the notice
    recorded in the line's timeline. Raises the platform's AgentError: the keys are
    delivered by then, so each caller decides how a missing message is said."""
    line = intent.line
    notice = replaced_notice(line.order_id, reason, buyers)
    key = notice_key(line, REPLACED_NOTICE, generation_of(intent))
    await platform.notice(line.order_id, notice, key)
    await store.add_event(line.id, "buyer_notice", notice[:200], clock())
