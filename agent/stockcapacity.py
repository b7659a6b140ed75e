"""How many keys of each SKU the agent can surely fill: the count the stock sync publishes.

Pure functions over what the ledger and the suppliers said. Every rule errs low: a count
published too high is a buyer who pays for a key nobody can deliver; one too low is a sale
the next publication makes.

The keys of a SKU come from bins, in the order of its sources: the free local keys, and per
supplier what it still sells within `max_price`. An order line is filled from one bin (local
stock is allocated all or nothing, a purchase buys the line's whole quantity from one
supplier), so a count that fits the bins in total can still strand an order whose quantity no
single bin holds any more; `fillable` takes that into account. Suppliers' money is shared by
the SKUs bought from them: `capacities` gives each SKU a share of each balance and counts no
purchase beyond it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal

from agent.config import LOCAL_SOURCE, SkuSettings
from agent.domain import StockPosition
from agent.suppliers.base import SupplierProduct


def fillable(bins: Sequence[int], max_quantity: int) -> int:
    """Units any sequence of orders of 1..max_quantity units each can take from `bins`, each
    order from one bin that holds all of it.

    An order of q units is stranded only when every bin holds less than q, i.e. at most
    sum(min(b, q - 1)) units are left: the orders before it took at least
    total - sum(min(b, q - 1)), and with it, g(q) = total - sum(min(b, q - 1)) + q. Any
    count below the least g(q) therefore strands nobody. g is convex and piecewise linear in
    q, bending only where q - 1 passes a bin's size, so the least value is at q = 1, at
    q = max_quantity, or at some b + 1.
    """
    total = sum(b for b in bins if b > 0)
    if total == 0:
        return 0
    most = max(1, max_quantity)
    candidates = {1, most} | {b + 1 for b in bins if 0 < b + 1 <= most}
    least = min(total - sum(min(max(b, 0), q - 1) for b in bins) + q for q in candidates)
    return max(0, min(total, least - 1))


def supplier_units(sku: SkuSettings, offer: SupplierProduct | None, bought_since_offer: int) -> int:
    """What one supplier still sells of a SKU within its max_price, by its last word, less
    what we bought there since. Nothing when it does not say (no offer, `available` null),
    or the SKU has no max_price (a purchase could cost anything), or the price is above it."""
    if offer is None or offer.available is None or sku.max_price is None:
        return 0
    if offer.price > sku.max_price:
        return 0
    return max(0, offer.available - bought_since_offer)


def money_left(
    balance: Decimal | None, bought_since: Mapping[str, int], skus: Mapping[str, SkuSettings]
) -> Decimal:
    """A supplier's balance as last read, less what we bought there since (each unit at its
    SKU's max_price, the most it can have cost). Nothing when the balance is unknown, or a
    purchase since may have cost anything (a SKU without max_price)."""
    if balance is None:
        return Decimal(0)
    spent = Decimal(0)
    for sku, units in bought_since.items():
        settings = skus.get(sku)
        if settings is None or settings.max_price is None:
            return Decimal(0)
        spent += settings.max_price * units
    return max(Decimal(0), balance - spent)


def share_out(money: Decimal, needs: Mapping[str, Decimal]) -> dict[str, Decimal]:
    """Splits `money` between claimants, none getting more than it needs: the smallest needs
    are met in full, the rest split evenly (water filling). The shares never add up to more
    than `money`."""
    shares: dict[str, Decimal] = {}
    left = money
    waiting = sorted(needs, key=lambda name: (needs[name], name))
    while waiting:
        even = left / len(waiting)
        name = waiting.pop(0)
        shares[name] = min(needs[name], even)
        left -= shares[name]
    return shares


def capacities(
    skus: Mapping[str, SkuSettings],
    position: StockPosition,
    offers: Mapping[tuple[str, str], SupplierProduct],
    balances: Mapping[str, Decimal],
) -> dict[str, int]:
    """Per SKU, how many more keys buyers may be sold: what the bins can fill (local keys and
    suppliers, money shared out), less the units of lines already waiting for keys.

    `offers`: (supplier, SKU) -> the supplier's last word on its product for that SKU;
    `balances`: supplier -> balance, both read before `position.bought` began counting."""
    bins: dict[str, list[tuple[str, int]]] = {}
    fill: dict[str, int] = {}
    local_floor: dict[str, int] = {}
    for name, sku in skus.items():
        free = position.free.get(name, 0)
        own: list[tuple[str, int]] = []
        for source in sku.sources:
            if source == LOCAL_SOURCE:
                own.append((source, free))
            else:
                bought = position.bought.get((source, name), 0)
                own.append((source, supplier_units(sku, offers.get((source, name)), bought)))
        bins[name] = own
        fill[name] = fillable([units for _, units in own], sku.max_quantity)
        # Local stock comes first: an order is bought upstream only when the local keys
        # cannot hold it, so at least all but max_quantity - 1 of them go before any purchase.
        first_local = bool(sku.sources) and sku.sources[0] == LOCAL_SOURCE
        local_floor[name] = max(0, free - (sku.max_quantity - 1)) if first_local else 0

    # Every purchase of a SKU may land at any of its suppliers: each must be able to pay for
    # all of them, out of the share of its balance given to that SKU.
    most_bought = {name: max(0, fill[name] - local_floor[name]) for name in skus}
    affordable: dict[tuple[str, str], int] = {}
    for supplier in sorted({s for own in bins.values() for s, units in own if units > 0}):
        if supplier == LOCAL_SOURCE:
            continue
        claimants = {
            name: skus[name].max_price or Decimal(0)
            for name, own in bins.items()
            if any(s == supplier and units > 0 for s, units in own)
        }
        bought_here = {sku: n for (s, sku), n in position.bought.items() if s == supplier}
        money = money_left(balances.get(supplier), bought_here, skus)
        shares = share_out(money, {n: price * most_bought[n] for n, price in claimants.items()})
        for name, price in claimants.items():
            affordable[supplier, name] = int(shares[name] // price) if price > 0 else 0

    result: dict[str, int] = {}
    for name, sku in skus.items():
        # A supplier the SKU's share of money cannot pay holds nothing for it.
        sized = [
            units if s == LOCAL_SOURCE else min(units, affordable.get((s, name), 0))
            for s, units in bins[name]
        ]
        paying = [
            affordable[s, name]
            for (s, _), units in zip(bins[name], sized, strict=True)
            if s != LOCAL_SOURCE and units > 0
        ]
        total = fillable(sized, sku.max_quantity)
        if paying:
            total = min(total, local_floor[name] + min(paying))
        result[name] = max(0, total - position.waiting.get(name, 0))
    return result
