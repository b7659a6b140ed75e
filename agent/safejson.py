"""JSON decoding for bodies from the other side (platforms, suppliers), bounded so that one
hostile value stays one bad value instead of failing its whole page.

Python's decoder refuses a whole document for a single integer longer than int's digit limit
(ValueError, 4,300 digits by default) and raises RecursionError for nesting about a thousand
deep. Here such an integer becomes a `HugeInteger` and anything nested deeper than
`MAX_DEPTH` a `TooDeep`: values no parser accepts where it expects a string or a number, so
the parser rejects that field (and its order) with a reason, and the rest of the page is read
as usual.

The C decoder does the work; only a document it refuses for one of those two reasons is read
again by the iterative decoder below (slower, but only ever for hostile bodies, which the HTTP
client caps in size).
"""

from __future__ import annotations

import json
import re
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

# Deeper than anything our protocols nest (an order's field sits at depth 3, a delivered
# item's at 4), shallow enough for any recursive code that handles the value afterwards.
MAX_DEPTH = 32


class JsonError(ValueError):
    """The body is not JSON; the message says where or why."""


class HugeInteger:
    """An integer too long for int() (past sys.get_int_max_str_digits())."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


class TooDeep:
    """A value nested deeper than MAX_DEPTH, left unread."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<value nested deeper than {MAX_DEPTH} levels>"


def loads(data: bytes | str) -> Any:
    """The JSON value in `data`; JsonError if it is not JSON. Never RecursionError, never a
    ValueError for a long number (see the module docstring)."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise JsonError(str(exc)) from None
    except UnicodeDecodeError:
        raise JsonError(_NOT_TEXT) from None
    except RecursionError:
        pass
    except ValueError:  # an integer past int's digit limit
        try:
            return json.loads(data, parse_int=_int_or_huge)
        except json.JSONDecodeError as exc:
            raise JsonError(str(exc)) from None
        except RecursionError:
            pass
    try:
        text = (
            data
            if isinstance(data, str)
            else data.decode(json.detect_encoding(data), "surrogatepass")
        )
    except UnicodeDecodeError:
        raise JsonError(_NOT_TEXT) from None
    return _BoundedDecoder(text).document()


_NOT_TEXT = "the body is not UTF-8, UTF-16 or UTF-32 text"


def _int_or_huge(digits: str) -> int | HugeInteger:
    try:
        return int(digits)
    except ValueError:
        return HugeInteger(len(digits.lstrip("-")))


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"(-?(?:0|[1-9][0-9]*))(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_CONSTANTS: dict[str, Any] = {
    "null": None,
    "true": True,
    "false": False,
    # Python's json accepts these; so does this decoder, for the same result either way.
    "NaN": float("nan"),
    "Infinity": float("inf"),
    "-Infinity": float("-inf"),
}
_OPEN = {"[": "]", "{": "}"}
_CLOSE_BRACE = ord("}")


class _BoundedDecoder:
    """An iterative decoder (an explicit stack, no recursion): containers up to MAX_DEPTH deep
    are built; one deeper is read through and becomes a TooDeep in its parent."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> JsonError:
        return JsonError(f"{what} at char {self.pos}")

    def skip_ws(self) -> str:
        self.pos = _WHITESPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]
        return self.text[self.pos : self.pos + 1]

    def key(self) -> str:
        if self.skip_ws() != '"':
            raise self.fail("expected a property name in double quotes")
        key, self.pos = self.string()
        if self.skip_ws() != ":":
            raise self.fail("expected ':'")
        self.pos += 1
        return key

    def string(self) -> tuple[str, int]:
        try:
            value, end = scanstring(self.text, self.pos + 1, True)
        except json.JSONDecodeError as exc:
            raise JsonError(str(exc)) from None
        return value, end

    def scalar(self) -> Any:
        text, pos = self.text, self.pos
        if text.startswith('"', pos):
            value, self.pos = self.string()
            return value
        number = _NUMBER.match(text, pos)
        if number is not None:
            integer, fraction, exponent = number.groups()
            self.pos = number.end()
            if fraction or exponent:
                return float(number.group())
            return _int_or_huge(integer)
        for literal, value in _CONSTANTS.items():
            if text.startswith(literal, pos):
                self.pos = pos + len(literal)
                return value
        raise self.fail("expected a value")

    def document(self) -> Any:
        # Open containers, each with its closing bracket; an object's next value goes under
        # the last of `keys`.
        stack: list[tuple[list[Any] | dict[str, Any], str]] = []
        keys: list[str] = []
        while True:
            opener = self.skip_ws()
            if opener in _OPEN and len(stack) == MAX_DEPTH:
                self.skip_container()
                value: Any = TooDeep()
            elif opener in _OPEN:
                self.pos += 1
                closer = _OPEN[opener]
                container: list[Any] | dict[str, Any] = [] if opener == "[" else {}
                if self.skip_ws() != closer:
                    stack.append((container, closer))
                    if opener == "{":
                        keys.append(self.key())
                    continue  # its first value comes next
                self.pos += 1
                value = container
            else:
                value = self.scalar()
            # The value is complete: into its container; then close every container that
            # ends here, until one goes on after a comma (or the document ends).
            while stack:
                container, closer = stack[-1]
                if closer == "]":
                    container.append(value)  # type: ignore[union-attr]
                else:
                    container[keys[-1]] = value  # type: ignore[call-overload]
                char = self.skip_ws()
                self.pos += 1
                if char == ",":
                    if closer == "}":
                        keys[-1] = self.key()
                    break
                if char != closer:
                    self.pos -= 1
                    raise self.fail(f"expected ',' or '{closer}'")
                stack.pop()
                if closer == "}":
                    keys.pop()
                value = container
            else:
                if self.skip_ws():
                    raise self.fail("extra data")
                return value

    def skip_container(self) -> None:
        """Reads through the array or object here, however deep, building nothing; its
        open brackets are kept as bytes (a hostile body may open millions)."""
        closers = bytearray()
        while True:
            opener = self.skip_ws()
            if opener in _OPEN:
                self.pos += 1
                closer = _OPEN[opener]
                if self.skip_ws() != closer:
                    closers.append(ord(closer))
                    if opener == "{":
                        self.key()
                    continue
                self.pos += 1
            else:
                self.scalar()
            while closers:
                char = self.skip_ws()
                self.pos += 1
                if char == ",":
                    if closers[-1] == _CLOSE_BRACE:
                        self.key()
                    break
                if char != chr(closers[-1]):
                    self.pos -= 1
                    raise self.fail(f"expected ',' or '{chr(closers[-1])}'")
                closers.pop()
            else:
                return
