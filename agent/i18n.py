"""Merchant-facing text in Chinese and English: gettext catalogs, and tables aligned for CJK.

English is the source language (the msgids); zh-CN comes from agent/locale/zh_CN/LC_MESSAGES/
kami.mo. The runtime reads the compiled .mo files with the stdlib's gettext, so Babel is a
maintainer's tool only (extract, update, compile; see docs/console.md), never a dependency of
the daemon; tests/unit/test_i18n.py checks that the committed .mo is the .po compiled and that
every extracted message has a translation.

Text that mixes Chinese with Latin letters is aligned by display width, not by len(): a CJK
character takes two terminal cells, so `f"{sku:<20}"` leaves a table ragged.
"""

from __future__ import annotations

import gettext
import os
import unicodedata
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

DOMAIN = "kami"
LOCALE_DIR = Path(__file__).parent / "locale"
ENGLISH = "en"
CHINESE = "zh-CN"
LANGUAGES = (CHINESE, ENGLISH)
# What each language calls itself, for the switch on the page.
LANGUAGE_NAMES = {CHINESE: "中文", ENGLISH: "English"}
# gettext's directory names (POSIX locale names) for our language tags.
_CATALOG_NAMES = {CHINESE: "zh_CN", ENGLISH: "en"}


def normalise_language(value: str) -> str | None:
    """A language tag or locale name (zh-CN, zh_CN.UTF-8, zh, en_US) as one of LANGUAGES;
    None for a language we have no catalog for."""
    base = value.split(".", 1)[0].split("@", 1)[0].replace("_", "-").lower()
    if base.startswith("zh"):
        return CHINESE
    if base == "en" or base.startswith("en-") or base in ("c", "posix"):
        return ENGLISH
    return None


def language_from_environment(environ: Mapping[str, str] | None = None) -> str:
    """The language the environment asks for, the way gettext reads it (LANGUAGE, LC_ALL,
    LC_MESSAGES, LANG; the first one set wins); English when none names one of ours."""
    env = os.environ if environ is None else environ
    for variable in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        value = env.get(variable)
        if not value:
            continue
        for candidate in value.split(":"):  # LANGUAGE is a list of preferences
            found = normalise_language(candidate) if candidate else None
            if found is not None:
                return found
        return ENGLISH
    return ENGLISH


@cache
def translations(language: str) -> gettext.NullTranslations:
    """The catalog of one of LANGUAGES; English (the msgids themselves) for anything else."""
    if language == ENGLISH or language not in _CATALOG_NAMES:
        return gettext.NullTranslations()
    return gettext.translation(
        DOMAIN, localedir=str(LOCALE_DIR), languages=[_CATALOG_NAMES[language]], fallback=True
    )


class Translator:
    """gettext bound to one language; `_` in the modules that speak to merchants."""

    def __init__(self, language: str) -> None:
        self.switch(language)

    def switch(self, language: str) -> None:
        """Speaks `language` from now on (the CLI's translator: the locale's until the config
        is read)."""
        self.language = language if language in LANGUAGES else ENGLISH
        self._catalog = translations(self.language)

    def gettext(self, message: str) -> str:
        return self._catalog.gettext(message)

    def ngettext(self, singular: str, plural: str, count: int) -> str:
        return self._catalog.ngettext(singular, plural, count)

    __call__ = gettext


def N_(message: str) -> str:
    """Marks a message for extraction where it is defined; translated where it is shown."""
    return message


def duration(_: Translator, seconds: float | None) -> str:
    """A duration in the merchant's language ("–" for none: nothing sold, never empties)."""
    if seconds is None:
        return "–"
    if seconds < 1:
        return _("%(n)d ms") % {"n": round(seconds * 1000)}
    if seconds < 120:
        return _("%(n).1f s") % {"n": seconds}
    if seconds < 7200:
        return _("%(n)d min") % {"n": round(seconds / 60)}
    if seconds < 172800:
        return _("%(n).1f h") % {"n": seconds / 3600}
    return _("%(n).1f d") % {"n": seconds / 86400}


# --- display width --------------------------------------------------------------------------


def char_width(char: str) -> int:
    """Terminal cells one character takes: 2 for wide and fullwidth (CJK) characters, 0 for
    combining marks and other zero-width ones, 1 otherwise."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    if text.isascii():
        return len(text)
    return sum(char_width(c) for c in text)


def truncate(text: str, width: int) -> str:
    """`text` cut to at most `width` cells (with … when cut)."""
    if display_width(text) <= width:
        return text
    kept, used = [], 0
    for char in text:
        cells = char_width(char)
        if used + cells > width - 1:
            break
        kept.append(char)
        used += cells
    return "".join(kept) + "…"


def pad(text: str, width: int, align: str = "<") -> str:
    """`text` padded with spaces to `width` cells: "<" left, ">" right, "^" centre."""
    gap = max(0, width - display_width(text))
    if align == ">":
        return " " * gap + text
    if align == "^":
        return " " * (gap // 2) + text + " " * (gap - gap // 2)
    return text + " " * gap


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    aligns: str | None = None,
    max_widths: Sequence[int | None] | None = None,
) -> list[str]:
    """Lines of a table whose columns line up on a terminal whatever the script: widths by
    display cells. `aligns`: one of "<", ">", "^" per column (default left); `max_widths`:
    cells a column may take at most (longer text is cut with …), None for no limit."""
    columns = len(headers)
    aligns = aligns or "<" * columns
    limits = list(max_widths or [None] * columns)
    cells = [
        [
            truncate(str(value), limit) if limit is not None else str(value)
            for value, limit in zip(row, limits, strict=True)
        ]
        for row in [list(headers), *rows]
    ]
    widths = [max(display_width(row[i]) for row in cells) for i in range(columns)]
    return [
        "  ".join(pad(row[i], widths[i], aligns[i]) for i in range(columns)).rstrip()
        for row in cells
    ]
