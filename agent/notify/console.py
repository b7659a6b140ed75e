"""Alerts on standard error, for a first setup or a terminal session."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from agent.domain import AlertMessage

if TYPE_CHECKING:
    from agent.config import Section


class ConsoleNotifier:
    def __init__(self, name: str, stream: TextIO | None = None) -> None:
        self.name = name
        self.stream = stream or sys.stderr
        self.started = time.time()

    async def send(self, message: AlertMessage) -> None:
        print(message.text, file=self.stream, flush=True)

    async def close(self) -> None:
        return None


# --- the channel's settings (agent.notify.KINDS) ----------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """The console channel has no keys of its own."""


def parse_options(section: Section) -> Options:
    """Nothing to read."""
    return Options()


def build(
    name: str, options: Options, secret: Callable[[str], str], timeout: float | None
) -> ConsoleNotifier:
    """Alerts on the daemon's standard error."""
    return ConsoleNotifier(name)
