"""The Platform port: where paid orders come from and where keys are delivered."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

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

    async def notice(self, order_id: str, message: str) -> None:
        """A message to the buyer (e.g. waiting for stock, with an ETA)."""
        ...

    async def refund(self, order_id: str, idempotency_key: str, reason: str) -> None:
        """Idempotent by key; returns when the platform reports the order refunded."""
        ...

    async def ping(self) -> None:
        """A cheap authenticated call for `kami-agent check`."""
        ...

    async def close(self) -> None: ...
