"""Errors raised where the merchant's language is not known (the ledger and the after-sales
actions run without it), said in it where they are shown: the error keeps its English message
(logs, str()) and carries the msgid with its values, which the CLI, the console and the bot
translate with `say(exc, their_gettext)`.

The phrase rides on the exception instance (`phrased(StoreError, ...)` still makes a plain
StoreError), so the error classes and their place in the AgentError tree stay what the engine
acts on."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.store.base import LedgerError

E = TypeVar("E", bound=BaseException)

# The attribute the phrase rides on: not declared by the error classes, so it is set and read
# through setattr/getattr, and an error raised without one is said as its English text.
_PHRASE = "kami_phrase"


@dataclass(frozen=True)
class Phrase:
    """A catalog msgid (marked with N_ where raised) and the values it is formatted with. A
    value that is itself a Phrase, or an exception carrying one, is said in the same
    language; str() is the English."""

    template: str
    values: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.template % self.values

    def say(self, gettext: Callable[[str], str]) -> str:
        """The message in the language of `gettext`."""
        return gettext(self.template) % {
            name: _said(value, gettext) for name, value in self.values.items()
        }


def _said(value: Any, gettext: Callable[[str], str]) -> Any:
    # A value that is a phrase, or an error carrying one, speaks the same language.
    if isinstance(value, Phrase):
        return value.say(gettext)
    return say(value, gettext) if isinstance(value, BaseException) else value


def phrased(cls: type[E], template: str, **values: Any) -> E:
    """An instance of `cls` whose message is `template % values` in English, carrying the
    phrase so it can be said in the merchant's language."""
    error = cls(template % values)
    setattr(error, _PHRASE, Phrase(template, values))
    return error


def rephrased(cls: type[E], cause: BaseException) -> E:
    """An instance of `cls` saying what `cause` says (its phrase too, when it has one)."""
    error = cls(str(cause))
    phrase = getattr(cause, _PHRASE, None)
    if isinstance(phrase, Phrase):
        setattr(error, _PHRASE, phrase)
    return error


def say(error: BaseException, gettext: Callable[[str], str]) -> str:
    """The error's message in the language of `gettext`: its phrase translated, or its
    English text when it was raised without one."""
    phrase = getattr(error, _PHRASE, None)
    return phrase.say(gettext) if isinstance(phrase, Phrase) else str(error)


class PhrasedLedgerError(LedgerError):
    """A LedgerError whose message is a catalog msgid (marked with N_ where raised) and its
    values."""

    def __init__(self, template: str, **values: Any) -> None:
        super().__init__(template % values)
        self.template = template
        self.values = values
        setattr(self, _PHRASE, Phrase(template, values))

    def say(self, gettext: Callable[[str], str]) -> str:
        """The message in the language of `gettext`."""
        return say(self, gettext)
