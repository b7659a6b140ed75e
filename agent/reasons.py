"""The reasons the agent writes with an order line (why it is parked, backordered, waiting,
closed) and in its timeline, each written once here: stored in English, said in the viewer's
language where they are shown.

The ledger keeps the English text: old ledgers hold it already, and agents of merchants who
read different languages may share one ledger. Where a reason is written, `english(TEMPLATE,
**values)` fills a template of this catalogue (the English, byte for byte what the code wrote
before); where it is shown (`kami-agent orders`, the console, the bot), `say_reason(text, _)`
matches the stored text against the templates (each compiled once to an anchored pattern that
captures its values) and says the matching one through the translator, its values as they
were stored. Text no template matches (a platform's or a supplier's own words, a free text
of an older version) is shown as stored.

Values are put back as captured, never formatted again: a SKU holding `%`, regex
metacharacters or a newline is shown as it came. A value named `reason` is one of our reasons
in turn (a park that quotes why the last delivery failed) and is said the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from agent.i18n import N_
from agent.phrased import Phrase

# --- intake: the order as the platform lists it (agent/intake.py, agent/screening.py,
# agent/platforms/parsing.py) ------------------------------------------------------------
UNKNOWN_SKU = N_("unknown SKU %(sku)r (not in config [skus])")
OVER_MAX_QUANTITY = N_("quantity %(quantity)s exceeds max_quantity %(max)s for %(sku)s")
QUANTITY_BELOW_ONE = N_("quantity must be at least 1, got %(quantity)s")
INVALID_QUANTITY = N_("invalid quantity %(quantity)s")
QUANTITY_ABSURD = N_("absurd quantity %(quantity)s")
QUANTITY_OUT_OF_RANGE = N_("quantity out of range: %(quantity)s")  # WooCommerce's listing
INVALID_SKU = N_("invalid sku %(sku)s")
INVALID_STATUS = N_("invalid status %(status)s")
ORDER_ID_CONTROL = N_("order id %(id)s holds control characters")
SKU_UNSTORABLE = N_("sku %(sku)s holds control characters or characters no ledger can store")
FIELD_UNSTORABLE = N_("%(field)s %(value)s holds characters no ledger can store")
BLOCKED_BUYER = N_("the buyer's contact is blocked (%(where)s): not delivered")
BUYER_LIMIT_SKU = N_(
    "buyer limit: this buyer already has %(bought)s key(s) of %(sku)s from the last %(hours)s h;"
    " %(quantity)s more exceed [skus.%(sku)s] buyer_limit %(limit)s"
)
BUYER_LIMIT = N_(
    "buyer limit: this buyer already has %(bought)s key(s) from the last %(hours)s h;"
    " %(quantity)s more exceed [agent] buyer_limit %(limit)s"
)
CHANGED_ORDER = N_(
    "platform reported order again with different content"
    " (sku %(old_sku)r->%(new_sku)r, quantity %(old_quantity)s->%(new_quantity)s)"
)
NOT_PAID = N_("not paid")  # an order read again at a retry, no longer paid
STILL_PAID = N_(
    "the platform still lists this order as paid after our ledger recorded it"
    " delivered: the buyer may not have the keys; check the order on the platform,"
    " then `kami-agent orders retry` it"
)

# --- stock and suppliers (agent/sourcing.py, agent/store/ledger/*) ---------------------------
NEED_FREE = N_("need %(needed)s, free %(free)s")
BOUGHT_TOO_FEW = N_("bought too few keys; need %(needed)s")
LOCAL_STOCK_SHORT = N_("local stock short")
# The summary of a line no source could fill: the suppliers' own failures follow as they said
# them ("supplier: code: message"), joined by "; ".
LOCAL_STOCK_SHORT_AND = N_("local stock short; %(reason)s")
NO_SOURCE = N_("no source")
BOUGHT_FEWER = N_("bought fewer keys than ordered")
OPEN_PURCHASE_UNCONFIGURED = N_(
    "open purchase at %(supplier)r, which is no longer configured (merchant_ref %(ref)s)"
)
COMPLETED_WITHOUT_KEYS = N_("%(supplier)s reports purchase %(purchase)s completed without keys")
CHECK_WITH_SUPPLIER = N_("%(reason)s; check with the supplier (possibly charged)")
PURCHASE_UNKNOWN_TOO_LONG = N_(
    "purchase at %(supplier)s (merchant_ref %(ref)s) has had an unknown outcome for over"
    " %(seconds)s s; ask the supplier before retrying — no second purchase was made"
)
PURCHASE_OPEN = N_("purchase %(ref)s open")
QUERY_FAILED = N_("query failed: %(error)s")

# --- delivery (agent/delivery.py, agent/replacement.py, and the platforms' refusals) ---------
PLATFORM_NOT_CONFIGURED = N_("platform %(platform)r is not configured")
STILL_UNDELIVERED = N_("still undelivered after %(attempts)s attempts: %(reason)s")
NO_REASON_RECORDED = N_("no reason recorded")
PLATFORM_CANNOT_SHOW = N_("platform cannot show the order: %(error)s")
RECONCILE_FAILED = N_("reconcile failed: %(error)s")
OTHER_KEYS = N_("platform shows a delivery with other keys")
UNEXPECTED_STATUS = N_("platform reports unexpected status %(status)r")
STILL_PAID_RESENDING = N_("platform: still paid, re-sending")
CONFIRMED_BY_PLATFORM = N_("confirmed by platform")
SAME_KEYS_AGAIN = N_("same keys, new delivery")
# The order closed by its platform, by the status it reports (cancelled or refunded).
PLATFORM_REPORTS = {
    "cancelled": N_("platform reports cancelled"),
    "refunded": N_("platform reports refunded"),
}
PLATFORM_REPORTS_AT_RETRY = {
    "cancelled": N_("platform reports cancelled (read again at retry)"),
    "refunded": N_("platform reports refunded (read again at retry)"),
}
# What our protocol's platforms answer (agent/platforms/http.py): the order closed before our
# delivery landed, or delivered already with other keys.
CLOSED_BEFORE_DELIVERY = {
    "cancelled": N_("platform: order cancelled before delivery"),
    "refunded": N_("platform: order refunded before delivery"),
}
DELIVERED_WITH_OTHER_ITEMS = N_("order already delivered with other items: %(error)s")
CANNOT_REPLACE = N_(
    "platform %(platform)s cannot replace the keys of a delivered order (void the"
    " key with `stock void` and deliver by hand)"
)

# --- after-sales (agent/aftersales.py) ---------------------------------------------------
REPLACEMENT_REFUSED = N_("key replacement refused by the platform: %(error)s")
REFUND_REFUSED = N_("platform refused: %(error)s")

# --- consignment pools (agent/consignment.py, agent/store/ledger/pools.py) ------------------
POOL_AFTER_BOUND_KEYS = N_(
    "the SKU is sold from an Agiso pool on this shop now, but"
    " the agent had bound keys to this order before: check it"
)
POOL_LOG_UNREADABLE = N_("the pool's send log cannot be read: %(error)s")
POOL_LOG_NOT_READ = N_("pool send log not read: %(error)s")
POOL_WAITING = N_("waiting for the Agiso pool to send the keys")
POOL_MISMATCH = N_(
    "the platform's pool sent %(sent)s keys for %(ordered)s ordered: %(bound)s bound here,"
    " %(unknown)s not in this ledger (added to the pool by hand?), %(conflicts)s bound to"
    " another order or voided here: check the order"
)

# --- operator actions (agent/store/ledger/orders.py) ---------------------------------------
READ_AGAIN = N_("read again (%(content)s): %(reason)s")

# Every template above, in the order written: the names in capitals, and the tables.
CATALOGUE: tuple[str, ...] = (
    *(text for name, text in list(globals().items()) if name.isupper() and isinstance(text, str)),
    *PLATFORM_REPORTS.values(),
    *PLATFORM_REPORTS_AT_RETRY.values(),
    *CLOSED_BEFORE_DELIVERY.values(),
)

# Values that are our own reasons in turn, said in the same language.
NESTED = frozenset({"reason"})
# Longer stored text is shown as it is: no reason of ours comes near, and a pattern with
# several open values must not be matched against an unbounded text.
MAX_MATCHED = 2000
MAX_DEPTH = 3

_PLACEHOLDER = re.compile(r"%\((\w+)\)([sdr])|%%")


def english(template: str, **values: Any) -> str:
    """The reason as the ledger stores it: `template` (one of this catalogue) filled with
    `values`, in English."""
    return template % values


def _pattern(template: str) -> re.Pattern[str]:
    parts: list[str] = []
    seen: set[str] = set()
    at = 0
    for match in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[at : match.start()]))
        at = match.end()
        name, kind = match.group(1), match.group(2)
        if name is None:
            parts.append("%")
        elif name in seen:
            parts.append(f"(?P={name})")
        else:
            seen.add(name)
            parts.append(f"(?P<{name}>-?[0-9]+)" if kind == "d" else f"(?P<{name}>.*?)")
    parts.append(re.escape(template[at:]))
    return re.compile("".join(parts), re.DOTALL)


def _specificity(template: str) -> tuple[int, int]:
    opening = _PLACEHOLDER.search(template)
    return (opening.start() if opening else len(template)), len(_PLACEHOLDER.sub("", template))


# The most specific template first: the longest fixed opening (a stored reason begins with
# our words; a value from outside, which may hold any words, comes after them), then the most
# fixed text, so that a template never takes another's text into one of its open values.
_COMPILED = tuple(
    (template, _pattern(template))
    for template in sorted(dict.fromkeys(CATALOGUE), key=_specificity, reverse=True)
)


@lru_cache(maxsize=4096)
def match_reason(text: str) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """The template `text` was written from and the values in it, or None."""
    if len(text) > MAX_MATCHED:
        return None
    for template, pattern in _COMPILED:
        found = pattern.fullmatch(text)
        if found is not None:
            return template, tuple(found.groupdict().items())
    return None


def say_reason(text: str | None, gettext: Callable[[str], str], depth: int = 0) -> str:
    """A stored reason (or timeline detail) in the language of `gettext`: the template it was
    written from translated, its values as stored; any other text as it is."""
    if not text:
        return ""
    found = match_reason(text) if depth < MAX_DEPTH else None
    if found is None:
        return text
    template, captured = found
    values = dict(captured)

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "%"
        if name in NESTED:
            return say_reason(values[name], gettext, depth + 1)
        return values[name]

    return _PLACEHOLDER.sub(value, gettext(template))


class StoredReason(Phrase):
    """A stored reason quoted by a phrased message (agent/phrased.py: "order X stays parked:
    <reason>"): its English as stored, said through say_reason."""

    def __init__(self, text: str) -> None:
        super().__init__(text, {})

    def __str__(self) -> str:
        return self.template

    def say(self, gettext: Callable[[str], str]) -> str:
        return say_reason(self.template, gettext)
