"""Sales rate and time to empty, per SKU. Pure functions over ledger rows.

The rate is an exponentially weighted count of keys sold: each sale counts
exp(-age / tau), and for a steady stream of `r` keys per second the sum settles at `r * tau`.
So rate = sum / tau, which reacts within a fraction of the half-life to a sales spike and
forgets a quiet night without a fixed window's cliff.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SkuForecast:
    sku: str
    free: int  # local keys ready to deliver
    supplier_keys: int  # keys the suppliers' balances can still buy at max_price
    rate_per_hour: float  # keys per hour, exponentially weighted
    time_to_empty: float | None  # seconds until local + supplier capacity is gone; None = no sales
    pending: int  # order lines not yet delivered
    # Keys handed to platform pools (consignment), still sold there: stock, though not the
    # agent's to deliver.
    consigned: int = 0


def tau_for(half_life: float) -> float:
    return half_life / math.log(2)


def ewma_rate(sales: Iterable[tuple[float, int]], now: float, half_life: float) -> float:
    """Keys per second from (time, quantity) sales."""
    tau = tau_for(half_life)
    total = sum(q * math.exp(-(now - t) / tau) for t, q in sales if t <= now)
    return total / tau


def time_to_empty(capacity: int, rate_per_second: float) -> float | None:
    if rate_per_second <= 0:
        return None
    return max(0, capacity) / rate_per_second


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
