"""Which strings the ledgers can store, which make a sound order id or SKU, and how a bad one
is shown in a reason or a log line.

JSON can carry what a ledger cannot: a lone UTF-16 surrogate ("\\ud800") has no UTF-8, so
neither SQLite nor PostgreSQL takes it (nor can a log line be written with it), and PostgreSQL
refuses NUL in text. An order holding one is rejected at the edge, with a reason showing the
value escaped, instead of failing the ledger call that takes in its whole page.
"""

from __future__ import annotations

import re

# What no ledger stores: NUL (PostgreSQL) and lone surrogates (neither).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# Not in an order id or SKU either: the other control characters (C0, DEL, C1), the line and
# paragraph separators, and the bidirectional marks and overrides, which rearrange what a
# terminal or a table shows around them.
_NOT_IN_IDENTIFIER = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)


def storable(text: str) -> bool:
    """True when both ledgers can store `text` (and a log line can carry it)."""
    # ASCII first: nearly every value is, and two C-level scans beat a regex search.
    return (text.isascii() and "\x00" not in text) or _UNSTORABLE.search(text) is None


def identifier(text: str) -> bool:
    """True when `text` is fit to be an order id or SKU: storable, no control characters."""
    return (text.isascii() and text.isprintable()) or _NOT_IN_IDENTIFIER.search(text) is None


def escaped(text: str) -> str:
    """`text` with every character no ledger can store written as its escape (\\x00,
    \\ud800): for free text from the other side (a failure message) that is kept, not
    rejected."""
    return _UNSTORABLE.sub(lambda m: repr(m.group())[1:-1], text)
