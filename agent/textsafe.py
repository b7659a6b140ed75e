"""Text from outside (order ids, SKUs, buyer contacts, reasons) made safe to show on a terminal.

An order id is whatever a platform (or a buyer, through it) chose. Printed raw, an ESC
sequence in it clears the merchant's screen, retitles the window or moves the cursor and
overwrites other rows; a bidi override reorders the rest of the row (the Trojan Source
trick); an invisible character makes two different ids look the same.
"""

from __future__ import annotations

import unicodedata

# Control characters (C0, DEL, C1), format characters (bidi controls, zero-width ones),
# lone surrogates (which would also make print() raise) and the line/paragraph separators.
# Other non-printable characters, such as the ideographic space, are text and stay.
_ESCAPED = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` with each character a terminal would act on or not show written as a Python
    escape (ESC as \\x1b, a right-to-left override as \\u202e); every other character,
    any script's, as it is. Backslashes are left alone, so an id stays copyable."""
    if text.isprintable():  # nearly always: nothing to do
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _ESCAPED else c for c in text)
