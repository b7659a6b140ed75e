"""The Platform port: where paid orders come from and where keys are delivered."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from agent.domain import CardItem, OrderPage, RemoteDelivery


class Platform(Protocol):
    name: str

    async def list_paid(self, cursor: str | None) -> OrderPage:
        """One page of paid orders after `cursor` (None = from the start)."""
        ...

    async def wait_for_orders(self, cursor: str | None, wait_seconds: float) -> OrderPage:
        """Long poll: returns as soon as paid orders after `cursor` exist (or the wait ends).
        Raises Permanent when the platform does not offer it."""
        ...

    async def get_order(self, order_id: str) -> RemoteDelivery:
        """The platform's view of one order, used to reconcile after an ambiguous call."""
        ...

    async def deliver(
        self, order_id: str, idempotency_key: str, items: Sequence[CardItem], message: str
    ) -> None:
        """Raises Transient, Ambiguous, Permanent or DeliveryConflict; returns when delivered."""
        ...

    async def notice(self, order_id: str, message: str, idempotency_key: str | None = None) -> None:
        """A message to the buyer (e.g. waiting for stock, with an ETA). `idempotency_key`,
        deterministic per line and kind of notice: a platform that honours it sends the
        buyer one message however often the call is repeated after a lost answer."""
        ...

    async def refund(self, order_id: str, idempotency_key: str, reason: str) -> None:
        """Idempotent by key; returns when the platform reports the order refunded."""
        ...

    async def ping(self) -> None:
        """A cheap authenticated call for `kami-agent check`."""
        ...

    async def close(self) -> None:
        """Lets go of the adapter's connections; called once, when the daemon stops."""


@runtime_checkable
class KeyReplacer(Protocol):
    """Optional port of a platform that can replace the keys of a delivered order
    (platform-http v1.1 `replaces`). A platform without it cannot take a fresh key for a bad
    one: the after-sales action is refused before anything changes."""

    name: str

    async def replace_delivery(
        self,
        order_id: str,
        idempotency_key: str,
        replaces: str,
        items: Sequence[CardItem],
        message: str,
    ) -> None:
        """The delivered order's keys become `items`, replacing the delivery made with
        idempotency key `replaces`; idempotent by `idempotency_key`. Raises Transient,
        Ambiguous, Permanent (the platform refuses, e.g. a 1.0 platform) or
        DeliveryConflict (the order's delivery is no longer the one replaced)."""
        ...


@runtime_checkable
class StockPublisher(Protocol):
    """Optional port of a platform that sells only the stock we declare (Kinguin's declared
    stock, platform-http v1.1's stock endpoint). The stock sync publishes to every platform
    adapter that has it (agent/stocksync.py) and skips the others."""

    name: str

    async def publish_stock(self, sku: str, available: int) -> None:
        """The platform may sell `available` more keys of `sku` from now on (absolute, so a
        repeat is harmless). Raises StockNotOffered when the platform takes no stock at all or
        not for this SKU (the sync stops publishing there), else Transient/Ambiguous/Permanent
        (retried later)."""
        ...


@runtime_checkable
class WatermarkedStockPublisher(StockPublisher, Protocol):
    """A StockPublisher whose platform counts sales against a watermark (platform-http v1.1):
    the count published accounts for every order listed before the cursor `as_of`, and the
    platform itself subtracts the sales after it. Without a watermark, an absolute count
    races with the sales the agent has not listed yet (docs/protocol/platform-http.md)."""

    async def publish_stock_as_of(self, sku: str, available: int, as_of: str) -> None:
        """Like publish_stock, `available` accounting for every paid order the listing
        returned before cursor `as_of` (a next_cursor this platform gave us)."""
        ...
