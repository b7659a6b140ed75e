"""What an import of card keys keeps and what it refuses, decided once for both ledgers.

A key is unique across all SKUs. A key the ledger already holds under the SKU imported is a
duplicate (an import run again skips it); one it holds under another SKU is refused (sold
under both, it would go to two buyers); one it has already bound to an order is refused and
counted apart, whatever the SKU: it was delivered, and the merchant should hear that a file
of keys already sold is being imported again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agent.domain import ImportReport


def merge_skus(first: Iterable[str], then: Iterable[str]) -> tuple[str, ...]:
    """The SKUs of both, each once, in the order first met."""
    return tuple(dict.fromkeys([*first, *then]))


@dataclass
class Sorted:
    """One batch of key rows, sorted: `fresh` are to be inserted, the rest counted."""

    fresh: list[tuple[Any, ...]] = field(default_factory=list)
    duplicates: int = 0
    already_bound: int = 0
    other_sku: int = 0
    other_skus: dict[str, None] = field(default_factory=dict)  # the other SKUs, in order
    added: int = 0  # set once the fresh rows are inserted

    def add_to(self, report: ImportReport) -> ImportReport:
        return replace(
            report,
            added=report.added + self.added,
            # a fresh row not inserted after all: the same key twice in the batch
            duplicates=report.duplicates + self.duplicates + len(self.fresh) - self.added,
            already_bound=report.already_bound + self.already_bound,
            other_sku=report.other_sku + self.other_sku,
            other_skus=merge_skus(report.other_skus, self.other_skus),
        )


def sort_known(
    sku: str, rows: Sequence[tuple[Any, ...]], known: Mapping[bytes, tuple[str, str]]
) -> Sorted:
    """Rows of (sku, key_id, sealed, secret_hash, ...) against `known`, the secret hash ->
    (sku, state) of the keys the ledger holds among them (bound wins over any other row)."""
    result = Sorted()
    for row in rows:
        found = known.get(bytes(row[3]))
        if found is None:
            result.fresh.append(row)
        elif found[1] == "bound":
            result.already_bound += 1
        elif found[0] != sku:
            result.other_sku += 1
            result.other_skus[found[0]] = None
        else:
            result.duplicates += 1
    return result
