"""Alert channels, registered by kind.

`kind = "..."` in a `[notify.<name>]` table picks a module from KINDS. Adding a channel is one
new module plus one line here. Each module provides:

- `Options`: a frozen dataclass of the channel's own keys, each declared with
  agent.settings.setting (default, range, help: the README table is generated from them);
- `parse_options(section: agent.config.Section) -> Options`: reads and checks them;
- `build(name: str, options: Options, secret: Callable[[str], str], timeout: float | None)
  -> Notifier`: the channel, its secrets resolved through `secret` (`timeout`: seconds per
  send, when not the channel's own default).

Modules are named, not imported, here: channel modules import agent.config for Section, and
agent.config reads this registry, so importing them eagerly would be circular.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.config import Section
    from agent.notify.base import Notifier

KINDS: dict[str, str] = {
    "email": "agent.notify.email",
    "webhook": "agent.notify.webhook",
    "telegram": "agent.notify.telegram",
    "dingtalk": "agent.notify.dingtalk",
    "wecom": "agent.notify.wecom",
    "feishu": "agent.notify.feishu",
    "console": "agent.notify.console",
    "apprise": "agent.notify.apprise_channel",
}


class ChannelModule(Protocol):
    Options: type[Any]

    def parse_options(self, section: Section) -> Any:
        """The channel's own settings, checked (an instance of Options)."""
        ...

    def build(
        self, name: str, options: Any, secret: Callable[[str], str], timeout: float | None
    ) -> Notifier:
        """A ready channel (no I/O until the first send)."""
        ...


def kind_module(kind: str) -> ChannelModule:
    """The channel module of `kind`; KeyError for a kind not in KINDS."""
    module: ChannelModule = importlib.import_module(KINDS[kind])
    return module
