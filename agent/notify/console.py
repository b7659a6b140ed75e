"""Alerts on standard error, for a first setup or a terminal session."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from agent.domain import AlertMessage


class ConsoleNotifier:
    def __init__(self, name: str, stream: TextIO | None = None) -> None:
        self.name = name
        self.stream = stream or sys.stderr
        self.started = time.time()

    async def send(self, message: AlertMessage) -> None:
        print(message.text, file=self.stream, flush=True)

    async def close(self) -> None:
        return None
