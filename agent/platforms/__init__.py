"""Platform adapters, registered by kind.

`kind = "..."` in a `[platforms.<name>]` table picks a module from KINDS. Adding a platform is
one new module plus one line here. Each module provides:

- `parse_options(section: agent.config.Section) -> object | None`: reads and validates the
  keys only that kind has (the keys every kind shares are read by agent.config);
- `build(settings: PlatformSettings, secret: str, max_connections: int) -> Platform`.

Modules are named, not imported, here: adapters import agent.config for their settings types,
and agent.config reads this registry, so importing them eagerly would be circular.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.config import PlatformSettings, Section
    from agent.platforms.base import Platform

KINDS: dict[str, str] = {
    "http": "agent.platforms.http",
    "woocommerce": "agent.platforms.woocommerce",
    "kinguin": "agent.platforms.kinguin",
    "agiso": "agent.platforms.agiso",
    "eneba": "agent.platforms.eneba",
    "dujiao-next": "agent.platforms.dujiao",
}


class PlatformModule(Protocol):
    def parse_options(self, section: Section) -> object | None:
        """The kind's own settings, validated; None when it has none."""
        ...

    def build(self, settings: PlatformSettings, secret: str, max_connections: int) -> Platform:
        """A ready adapter (no I/O until the first call)."""
        ...


def kind_module(kind: str) -> PlatformModule:
    """The adapter module of `kind`; KeyError for a kind not in KINDS."""
    module: PlatformModule = importlib.import_module(KINDS[kind])
    return module
