"""Supplier adapters, registered by kind.

`kind = "..."` in a `[suppliers.<name>]` table picks a module from KINDS. Adding a supplier is
one new module plus one line here. Each module provides:

- `parse_options(section: agent.config.Section) -> object | None`: reads and checks the keys
  only that kind has (the keys every kind shares are read by agent.config);
- `build(settings: SupplierSettings, secret: str) -> Supplier`.

Modules are named, not imported, here: adapters import agent.config for their settings types,
and agent.config reads this registry, so importing them eagerly would be circular.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.config import Section, SupplierSettings
    from agent.suppliers.base import Supplier

KINDS: dict[str, str] = {
    "http": "agent.suppliers.http",
    "fulu": "agent.suppliers.fulu",
}


class SupplierModule(Protocol):
    def parse_options(self, section: Section) -> object | None:
        """The kind's own settings, checked; None when it has none."""
        ...

    def build(self, settings: SupplierSettings, secret: str) -> Supplier:
        """A ready adapter (no I/O until the first call)."""
        ...


def kind_module(kind: str) -> SupplierModule:
    """The adapter module of `kind`; KeyError for a kind not in KINDS."""
    module: SupplierModule = importlib.import_module(KINDS[kind])
    return module
