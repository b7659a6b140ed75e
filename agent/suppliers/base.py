"""The Supplier port: where keys are bought when local stock cannot fill an order."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol, runtime_checkable

from agent.domain import PurchaseResult


@dataclass(frozen=True, slots=True)
class Balance:
    amount: Decimal
    currency: str


class Supplier(Protocol):
    name: str

    async def purchase(
        self, merchant_ref: str, sku: str, quantity: int, max_price: Decimal | None
    ) -> PurchaseResult:
        """Raises Transient/Permanent when surely nothing was bought, Ambiguous when unknown."""
        ...

    async def find_purchase(self, merchant_ref: str) -> PurchaseResult | None:
        """The purchase made with this reference, or None if the supplier never saw it."""
        ...

    async def get_purchase(self, purchase_id: str, merchant_ref: str) -> PurchaseResult:
        """A purchase still processing (by the supplier's id, or our reference)."""
        ...

    async def balance(self) -> Balance:
        """The account's balance with the supplier now (for the balance alert and the
        console); Transient/Permanent when it cannot be read."""

    async def close(self) -> None:
        """Lets go of the adapter's connections; called once, when the daemon stops."""


@dataclass(frozen=True, slots=True)
class SupplierProduct:
    """What a supplier says it sells of one product right now."""

    price: Decimal
    currency: str
    available: int | None  # None: the supplier does not say


@runtime_checkable
class ProductCatalog(Protocol):
    """Optional port of a supplier that can say what it still sells (stock sync). A supplier
    without it counts for nothing in the stock published to the platforms."""

    async def product(self, sku: str) -> SupplierProduct:
        """Price and availability of the supplier's product `sku` (its own id). Raises
        Transient/Permanent when it cannot say (unknown product, outage)."""
        ...
