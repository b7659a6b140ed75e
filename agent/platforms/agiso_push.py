"""Agiso pushes (推送), as pure functions for the inbound listener: the signature checked before
the body is read, the paid-order pushes of each channel read into trades, and the key pushes
are deduplicated on (Agiso: "推送时，有可能消息重复推送 ... 主要依据是订单编号Tid和订单状态").

A push is `POST <your url>?timestamp=..&aopic=..&sign=..&fromPlatform=..` with the form field
`json`; sign = md5(AppSecret + "json" + json + "timestamp" + timestamp + AppSecret), compared
without case (knowledge-base/docs/alds/push.md, alds/signDemo.md, alds/faq.md).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent import safejson
from agent.once import FirstSeen
from agent.platforms.agiso_client import sign
from agent.platforms.agiso_wire import (
    FROM_PLATFORM,
    PAID,
    Trade,
    TradeLine,
    WireError,
    pdd_lines,
    taobao_trade,
    text_id,
    yuan,
)
from agent.storable import escaped

MAX_PUSH_BYTES = 256 * 1024  # a trade with its sub-orders is a few kilobytes
# Agiso documents no window for a push's timestamp; the API's own is 10 minutes. A push
# replayed later is harmless anyway (deduplicated), so the listener may widen this.
PUSH_MAX_SKEW = 600.0
# aopic of a paid order, per channel (alds/push.md tradesuccess 2 and tradeBuyerPaySimple
# 2097152; aldsIdle IdleTradePay 1; aldsPdd PddTradeConfirmed 1 "拼团成功/付完尾款";
# aldsJd JdGameCardTradePay 8).
PAID_AOPICS = {"taobao": (2, 2097152), "xianyu": (1,), "pdd": (1,), "jd": (8,)}
JD_CARD_ORDER = 2  # JdGameCardTradePay OrderType: 1 直充 (no card), 2 点卡


class PushRejected(ValueError):
    """A push we do not take: the reason is safe to log (no body, no signature)."""


@dataclass(frozen=True, slots=True)
class Push:
    channel: str
    aopic: int
    timestamp: int
    body: Any  # the `json` field, parsed


@dataclass(frozen=True, slots=True)
class PushEvent:
    channel: str
    tid: str
    paid: bool
    dedupe_key: str
    trade: Trade | None  # None: the push does not say what was bought; read the order


def push_signature_ok(app_secret: str, json_text: str, timestamp: str, signature: str) -> bool:
    """md5(AppSecret + "json" + json + "timestamp" + timestamp + AppSecret), compared in
    constant time, without case."""
    expected = sign({"json": json_text, "timestamp": timestamp}, app_secret)
    return hmac.compare_digest(expected.encode(), signature.strip().lower().encode("utf-8"))


def verify_push(
    app_secret: str,
    query: Mapping[str, str],
    form: Mapping[str, str],
    *,
    now: float,
    channel: str,
    max_skew: float | None = PUSH_MAX_SKEW,
) -> Push:
    """The push, once its signature holds; PushRejected otherwise. Nothing of the body is
    parsed before the signature is checked. `channel`: the shop's (a push from another
    platform is refused)."""
    json_text, timestamp = form.get("json"), query.get("timestamp")
    signature = query.get("sign")
    if not isinstance(json_text, str) or not timestamp or not signature:
        raise PushRejected("push without json, timestamp or sign")
    if len(json_text.encode("utf-8", "surrogatepass")) > MAX_PUSH_BYTES:
        raise PushRejected("push body too large")
    if not push_signature_ok(app_secret, json_text, timestamp, signature):
        raise PushRejected("push signature does not match (check the AppSecret)")
    if not timestamp.isdigit() or len(timestamp) > 13:
        raise PushRejected("push timestamp is not a number")
    seconds = int(timestamp) / 1000 if len(timestamp) > 11 else int(timestamp)  # s or ms
    if max_skew is not None and abs(now - seconds) > max_skew:
        raise PushRejected(f"push timestamp {timestamp} is more than {max_skew:.0f}s off")
    source = FROM_PLATFORM.get(query.get("fromPlatform", ""))
    if source is not None and source != channel:
        raise PushRejected(
            f"push from {escaped(query.get('fromPlatform', ''))[:20]}, not {channel}"
        )
    aopic = query.get("aopic", "")
    if not aopic.isdigit() or len(aopic) > 12:
        raise PushRejected("push without a numeric aopic")
    try:
        body = safejson.loads(json_text)
    except safejson.JsonError:
        raise PushRejected("push json is not JSON") from None
    return Push(channel, int(aopic), int(seconds), body)


def _status_word(value: Any) -> str:
    return escaped(str(value))[:40] if isinstance(value, str | int) else ""


def read_push(push: Push) -> PushEvent:
    """The order a push is about, whether it says the order is paid, its dedupe key (Tid and
    status; the push type where the push carries no status) and, when the push says what was
    bought, the trade. PushRejected when it names no order."""
    body, channel, aopic = push.body, push.channel, push.aopic
    if not isinstance(body, dict):
        raise PushRejected("push json is not an object")
    paid = aopic in PAID_AOPICS[channel]
    trade: Trade | None = None
    if channel == "taobao":
        tid = text_id(body.get("Tid"))
        status = _status_word(body.get("Status")) or f"aopic{aopic}"
        if paid and body.get("Orders"):
            try:
                trade = taobao_trade({**body, "Status": "WAIT_SELLER_SEND_GOODS"})
            except WireError as exc:
                raise PushRejected(str(exc)) from None
    elif channel == "xianyu":
        tid = text_id(body.get("biz_order_id"))
        status = _status_word(body.get("order_status")) or f"aopic{aopic}"
        # IdleTradePay names the order only: what was bought is read from /Order/Detail.
    elif channel == "pdd":
        tid = text_id(body.get("Tid") or body.get("OrderSn"))
        status = f"aopic{aopic}"  # "以Tid组合为唯一标识": one push per order and type
        if paid and tid is not None:
            trade = Trade(
                tid, PAID, pdd_lines(body.get("ItemList")), None, yuan(body.get("PayAmount"))
            )
    else:
        tid = text_id(body.get("OrderId") or body.get("orderId"))
        status = _status_word(body.get("orderStatus")) or f"aopic{aopic}"
        if paid and tid is not None:
            paid = body.get("OrderType") == JD_CARD_ORDER
            sku, count = text_id(body.get("SkuId")), body.get("BuyNum")
            quantity = count if isinstance(count, int) and 0 < count < 1_000_000 else None
            line = TradeLine((sku,) if sku else (), quantity)
            trade = Trade(tid, PAID, (line,), None, yuan(body.get("TotalPrice")))
    if tid is None:
        raise PushRejected("push names no order id")
    return PushEvent(channel, tid, paid, f"{channel}:{tid}:{status}", trade)


class PushDedupe:
    """The pushes already taken, by their dedupe key, in memory and bounded (the listener that
    commits pushes to the ledger keeps its own durable record; this one spares it the work of
    a push Agiso repeats within the process's life)."""

    def __init__(self, size: int = 100_000) -> None:
        self._seen = FirstSeen(size)

    def first(self, event: PushEvent) -> bool:
        """True the first time this order is pushed with this status."""
        return self._seen.first(event.dedupe_key)
