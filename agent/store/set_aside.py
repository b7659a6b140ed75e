"""Defence in depth at intake: one order the ledger cannot store must not keep its chunk out.

The parsers already reject what no ledger can store (agent/storable.py), so this runs only
when a value slips past them. A chunk of orders is taken in by one ledger call; when that call
fails with a data error (a value the driver or the database refuses), its orders are taken in
again one by one, so only the bad one fails. That one is parked under its id with the reason
when its id can be stored, else left out and logged (the next listing offers it again; it is
logged once per process). A good chunk costs what it always did: this path runs only after a
failure.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from agent.domain import DeliveryIntent, OrderLine, PlatformOrder, RejectedOrder
from agent.logs import get_logger
from agent.once import FirstSeen
from agent.storable import escaped, identifier

log = get_logger("kami.store.intake")

TakeIn = Callable[
    [Sequence[PlatformOrder | RejectedOrder]], Awaitable[list[DeliveryIntent | OrderLine]]
]
_reported = FirstSeen()


def data_error(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The data error (one of `kinds`) behind `exc`, or None: the store boundary may have
    wrapped the driver's error (raise ... from it)."""
    current: BaseException | None = exc
    for _ in range(8):  # a chain of causes is short; a cycle must not hang us
        if current is None:
            return None
        if isinstance(current, kinds):
            return current
        current = current.__cause__ or current.__context__
    return None


async def take_in_one_by_one(
    platform: str,
    orders: Sequence[PlatformOrder | RejectedOrder],
    take_in: TakeIn,
    kinds: tuple[type[BaseException], ...],
) -> list[DeliveryIntent | OrderLine]:
    """`take_in` of each order on its own; an order failing with a data error is parked under
    its id, or left out when even that fails. Any other error is raised as it comes."""
    taken: list[DeliveryIntent | OrderLine] = []
    for order in orders:
        try:
            taken += await take_in([order])
            continue
        except Exception as exc:
            cause = data_error(exc, kinds)
            if cause is None:
                raise
        reason = escaped(f"the ledger cannot store this order: {type(cause).__name__}: {cause}")
        parked = RejectedOrder(
            order.order_id,
            reason[:300],
            sku=order.sku if identifier(order.sku) else "",
            quantity=order.quantity if isinstance(order, PlatformOrder) else 0,
        )
        try:
            await take_in([parked])
        except Exception as exc:
            if data_error(exc, kinds) is None:
                raise
            _report(platform, order, parked.reason, stored=False)
        else:
            _report(platform, order, parked.reason, stored=True)
    return taken


def _report(platform: str, order: PlatformOrder | RejectedOrder, reason: str, stored: bool) -> None:
    if _reported.first((platform, order.order_id)):
        # The id escaped: it may be what the ledger (and a log line) cannot hold.
        shown = repr(order.order_id[:80])
        if stored:
            log.error("order_parked_unstorable", platform=platform, order_id=shown, reason=reason)
        else:
            log.error("order_ignored_unstorable", platform=platform, order_id=shown, reason=reason)
