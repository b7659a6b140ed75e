"""Names shown to the merchant for the ledger's codes (states, alert kinds, severities), marked
for translation here and translated where they are shown."""

from __future__ import annotations

from agent.domain import LineState
from agent.i18n import N_, Translator
from agent.i18n import duration as i18n_duration

STATE_LABELS = {
    LineState.NEW: N_("new"),
    LineState.BACKORDERED: N_("waiting for stock"),
    LineState.PURCHASING: N_("buying from supplier"),
    LineState.ALLOCATED: N_("keys reserved"),
    LineState.DELIVERING: N_("delivering"),
    LineState.DELIVERED: N_("delivered"),
    LineState.NEEDS_ATTENTION: N_("needs attention"),
    LineState.REFUNDED: N_("refunded"),
    LineState.CANCELLED: N_("cancelled"),
    LineState.RESERVED: N_("reserved for the platform"),
    LineState.PROVIDED: N_("keys handed to the platform"),
}

ALERT_KINDS = {
    "low_stock": N_("low stock"),
    "supplier_balance": N_("supplier balance low"),
    "platform_auth": N_("platform refuses our credentials"),
    "platform_unpaid": N_("platform's prepaid calls ran out"),
    "platform_unreachable": N_("platform unreachable"),
    "stuck_orders": N_("orders stuck"),
    "deadline_near": N_("delivery deadline near"),
    "needs_attention": N_("orders need attention"),
    "ledger_lost": N_("ledger lost"),
}

SEVERITIES = {"critical": N_("critical"), "warning": N_("warning"), "info": N_("info")}

# Every event kind of the transition table (agent/lifecycle.py, its notes included): the
# console's timeline and `kami-agent orders show` say them; a test keeps the table complete.
EVENT_KINDS = {
    "intake": N_("order taken in"),
    "allocated": N_("keys reserved"),
    "backordered": N_("waiting for stock"),
    "purchase_intent": N_("buying from supplier"),
    "delivery_intent": N_("delivery started"),
    "delivered": N_("delivered"),
    "retry_scheduled": N_("will try again"),
    "reconciled": N_("checked with the platform"),
    "parked": N_("parked for the merchant"),
    "rejected": N_("refused at intake"),
    "buyer_notice": N_("buyer notified"),
    "refund_intent": N_("refund started"),
    "refund_refused": N_("refund refused by the platform"),
    "keys_revealed": N_("keys shown to the merchant"),
    "operator_retry": N_("retried by the merchant"),
    "operator_resend": N_("resent by the merchant"),
    "key_replaced": N_("bad key replaced by the merchant"),
    "refunded": N_("refunded"),
    "cancelled": N_("cancelled"),
    # Responder platforms (agent/listener.py)
    "reserved": N_("reserved for the platform"),
    "provided": N_("keys handed to the platform"),
    "released": N_("keys released back to stock"),
    "keys_voided": N_("keys voided"),
    "callback_sent": N_("platform told by callback"),
    # A purchase from a supplier, recorded on the line it is for
    "purchase_unknown": N_("purchase outcome unclear"),
    "purchase_processing": N_("supplier still processing the purchase"),
    "purchase_failed": N_("purchase failed"),
    "purchase_completed": N_("purchase completed"),
    # Card keys and adds to a platform's own pool (consignment)
    "imported": N_("imported"),
    "voided": N_("voided"),
    "unvoided": N_("returned to stock"),
    "replaced": N_("replaced"),
    "sold_from_pool": N_("sold from the platform's pool"),
    "stock_back": N_("given back by the platform's pool"),
    "pool_add_intent": N_("adding to the platform's pool"),
    "pool_add_unknown": N_("add to the platform's pool unclear"),
    "pool_added": N_("added to the platform's pool"),
    "pool_add_partial": N_("partly added to the platform's pool"),
    "pool_add_failed": N_("add to the platform's pool failed"),
}


def state_label(_: Translator, state: str) -> str:
    try:
        return _(STATE_LABELS[LineState(state)])
    except (ValueError, KeyError):  # a state newer than this table: its code, never an error
        return state


def alert_kind_label(_: Translator, kind: str) -> str:
    return _(ALERT_KINDS[kind]) if kind in ALERT_KINDS else kind


def severity_label(_: Translator, severity: str) -> str:
    return _(SEVERITIES[severity]) if severity in SEVERITIES else severity


def event_label(_: Translator, kind: str) -> str:
    return _(EVENT_KINDS[kind]) if kind in EVENT_KINDS else kind


def duration(_: Translator, seconds: float | None) -> str:
    """A duration in the merchant's language ("–" for none: nothing sold, never empties)."""
    return i18n_duration(_, seconds)
