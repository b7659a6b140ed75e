"""The WooCommerce delivery note: the text the buyer is e-mailed, and how the adapter finds it
again among the order's notes.

A note carries a reference marker, `[kami:<ref> item <line item id>]`, where `ref` is derived
from the delivery's idempotency key. Notes are appended every time they are POSTed, so the
marker is the only way to know a delivery already went out; it names the line item so that
reconciliation, which knows only the line, finds it without the key.

Each key sits in `<code>...</code>`, HTML-escaped. WooCommerce e-mails a customer note through
`wpautop(wptexturize(make_clickable(note)))` (templates/emails/customer-note.php), and
wptexturize would turn `--` into a dash or `"` into curly quotes anywhere but inside `<code>`;
the note itself is stored and returned as written (`comment_content`), so parsing it back gives
the exact keys. A backslash is written as `&#92;` because WordPress unslashes comment content
on insert (wp_insert_comment).
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass

from agent.domain import CardItem

_MARKER = re.compile(r"^\[kami:(?P<ref>[0-9a-f]{12}) item (?P<item>\d+)\]", re.MULTILINE)
_ENTRY = re.compile(r"^(?P<kind>Card|Key) (?P<n>\d+): <code>(?P<value>.*)</code>$")


def delivery_ref(idempotency_key: str) -> str:
    """Twelve hex digits of the key's hash: stable across retries and restarts (the key is),
    new for a deliberate resend (a new generation, a new key)."""
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:12]


def marker(ref: str, item_id: int) -> str:
    return f"[kami:{ref} item {item_id}]"


def unsendable(items: Sequence[CardItem]) -> str | None:
    """Why these keys cannot be carried in a note, or None. A line break would end the key's
    line: what the buyer read and what the adapter parses back would differ."""
    for item in items:
        for value in (item.code, item.secret):
            if "\n" in value or "\r" in value:
                return "a key or card number contains a line break"
    return None


def _escape(value: str) -> str:
    return html.escape(value, quote=False).replace("\\", "&#92;")


def note_text(
    message: str, sku: str, quantity: int, items: Sequence[CardItem], ref: str, item_id: int
) -> str:
    """The buyer-facing note: the SKU's message, then the marker line and one line per key."""
    lines = [message.strip(), "", f"{marker(ref, item_id)} {sku} x {quantity}"]
    for number, item in enumerate(items, 1):
        if item.code:
            lines.append(f"Card {number}: <code>{_escape(item.code)}</code>")
        lines.append(f"Key {number}: <code>{_escape(item.secret)}</code>")
    return "\n".join(lines).strip()


@dataclass(frozen=True, slots=True)
class NoteView:
    """One order note as the REST API returns it (only what the adapter reads)."""

    id: int
    text: str
    customer: bool


@dataclass(frozen=True, slots=True)
class FoundDelivery:
    note_id: int
    ref: str
    items: tuple[CardItem, ...] | None  # None: the marker is there but the keys do not parse


def _parse_items(text: str, start: int) -> tuple[CardItem, ...] | None:
    codes: dict[int, str] = {}
    secrets: dict[int, str] = {}
    for line in text[start:].splitlines()[1:]:
        match = _ENTRY.match(line.rstrip("\r"))
        if match is None:
            break
        target = codes if match["kind"] == "Card" else secrets
        target[int(match["n"])] = html.unescape(match["value"])
    if not secrets or sorted(secrets) != list(range(1, len(secrets) + 1)):
        return None
    if any(n not in secrets for n in codes):
        return None
    return tuple(CardItem(code=codes.get(n, ""), secret=secrets[n]) for n in sorted(secrets))


def deliveries_for(notes: Sequence[NoteView], item_id: int) -> list[FoundDelivery]:
    """Our customer notes for one line item, newest first (notes come newest first)."""
    found = []
    for note in sorted(notes, key=lambda n: n.id, reverse=True):
        if not note.customer:
            continue  # a private note never reached the buyer
        for match in _MARKER.finditer(note.text):
            if int(match["item"]) == item_id:
                found.append(
                    FoundDelivery(note.id, match["ref"], _parse_items(note.text, match.start()))
                )
    return found


def delivered_items(notes: Sequence[NoteView]) -> set[int]:
    """The line items that have one of our customer notes."""
    return {
        int(match["item"])
        for note in notes
        if note.customer
        for match in _MARKER.finditer(note.text)
    }
