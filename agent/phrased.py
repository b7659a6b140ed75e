"""Errors raised where the merchant's language is not known (the ledger checks run inside the
store), said in it where they are shown: the error keeps its English message (logs, str())
and the msgid with its values, which the CLI translates (agent/cli/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.store.base import LedgerError


class PhrasedLedgerError(LedgerError):
    """A LedgerError whose message is a catalog msgid (marked with N_ where raised) and its
    values."""

    def __init__(self, template: str, **values: Any) -> None:
        super().__init__(template % values)
        self.template = template
        self.values = values

    def say(self, gettext: Callable[[str], str]) -> str:
        """The message in the language of `gettext`."""
        return gettext(self.template) % self.values
