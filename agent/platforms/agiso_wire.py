"""What Agiso's answers and pushes carry, read into plain values: trades per channel, the cards
a sent log shows, and the statuses we act on. Pure functions, no I/O (docs/platforms/agiso.md
names the documentation page of every field read here).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from agent.domain import CardItem, PlatformOrder, RejectedOrder
from agent.storable import escaped, identifier

CHANNELS = ("taobao", "xianyu", "pdd", "jd")
SERVICES = {"taobao": "alds", "xianyu": "aldsIdle", "pdd": "aldsPdd", "jd": "aldsJd"}
CHANNEL_NAMES = {"taobao": "淘宝/天猫", "xianyu": "闲鱼", "pdd": "拼多多", "jd": "京东"}
# The `fromPlatform` of a push and of a token (guide: TbAlds, AldsIdle, PddAlds, AldsJd, ...).
FROM_PLATFORM = {"TbAlds": "taobao", "AldsIdle": "xianyu", "PddAlds": "pdd", "AldsJd": "jd"}
MAX_ID = 64
_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_-]{0,63}$")

PAID, SHIPPED, REFUNDED, CANCELLED, UNPAID = "paid", "shipped", "refunded", "cancelled", "unpaid"
# Every channel behind Agiso sells in yuan. The amounts come in three shapes: 淘宝 "3.00"
# (元, text), 拼多多 pay_amount 0.1 and 京东 TotalPrice 12.36 (元, numbers), 闲鱼 payment 1
# (分: "实付金额, 单位分", aldsIdle /Order/Detail). Times are China Standard Time without a
# zone ("2016-07-11 11:20:20"), or milliseconds since the epoch on 闲鱼 ("时间戳,毫秒"); ours
# are UTC ISO 8601.
CURRENCY = "CNY"
BEIJING = timedelta(hours=8)
MAX_YUAN = Decimal(100_000_000)

# 淘宝 trade statuses (Taobao's TradeStatus, as /Trade/TradeInfo and the pushes carry them).
TAOBAO_STATUS = {
    "WAIT_SELLER_SEND_GOODS": PAID,
    "SELLER_CONSIGNED_PART": SHIPPED,
    "WAIT_BUYER_CONFIRM_GOODS": SHIPPED,
    "TRADE_BUYER_SIGNED": SHIPPED,
    "TRADE_FINISHED": SHIPPED,
    "TRADE_CLOSED": REFUNDED,  # closed after a full refund
    "TRADE_CLOSED_BY_TAOBAO": CANCELLED,
    "WAIT_BUYER_PAY": UNPAID,
    "TRADE_NO_CREATE_PAY": UNPAID,
}
# 闲鱼 order_status (aldsIdle /Order/Detail): 0 未知 1 已创建 2 已付款 3 已发货 4 交易成功
# 5 已退款 6 交易关闭.
XIANYU_STATUS = {1: UNPAID, 2: PAID, 3: SHIPPED, 4: SHIPPED, 5: REFUNDED, 6: CANCELLED}
# 京东 orderState (aldsJd /Order/Detail).
JD_STATUS = {
    "WAIT_SELLER_STOCK_OUT": PAID,
    "WAIT_GOODS_RECEIVE_CONFIRM": SHIPPED,
    "FINISHED_L": SHIPPED,
    "TRADE_CANCELED": CANCELLED,
}


class WireError(ValueError):
    """An answer whose shape we cannot read."""


def text_id(value: Any) -> str | None:
    """An order, item or SKU id as text (Agiso writes them as numbers or strings; 拼多多's
    have a dash: 200624-0199468655650824); None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        value = str(value)
    if isinstance(value, str) and _ID.match(value) and identifier(value):
        return value
    return None


def _count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit() and len(value) < 7:
        value = int(value)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None


@dataclass(frozen=True, slots=True)
class TradeLine:
    """One sub-order: its ids (any of them may map to a SKU of ours, the most specific first)
    and how many units were bought."""

    ids: tuple[str, ...]
    quantity: int | None
    title: str = ""
    oid: str | None = None  # 淘宝's sub-order id (a delivery result names it)


@dataclass(frozen=True, slots=True)
class Trade:
    tid: str
    status: str  # PAID, SHIPPED, ... or "other:<what Agiso said>"
    lines: tuple[TradeLine, ...] = ()
    paid_at: str | None = None
    amount: str | None = None
    # A refund asked for and not settled yet (拼多多 refund_status 2 售后处理中, 3 退款中): the
    # order is still paid, but a key sent now may be refunded with it.
    refunding: bool = False


def _ids(entry: Mapping[str, Any], *names: str) -> tuple[str, ...]:
    found = []
    for name in names:
        value = text_id(entry.get(name))
        if value is not None and value != "0" and value not in found:
            found.append(value)
    return tuple(found)


def _text(value: Any, limit: int = 120) -> str:
    return escaped(" ".join(value.split()))[:limit] if isinstance(value, str) else ""


def yuan(value: Any, *, fen: bool = False) -> str | None:
    """An amount as yuan text with two decimals ("3.00"); `fen`: the value counts 分 (闲鱼).
    None when it is not a non-negative amount."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    try:
        amount = Decimal(str(value).strip()) if isinstance(value, str | float) else Decimal(value)
    except InvalidOperation:
        return None
    if not amount.is_finite():
        return None
    if fen:
        amount /= 100
    if not 0 <= amount < MAX_YUAN:
        return None
    return str(amount.quantize(Decimal("0.01")))


def beijing_time(value: Any) -> str | None:
    """ "2016-07-11 11:20:20" (or with a T), China Standard Time, as UTC ISO 8601; None for
    anything else, and for JD's "0001-01-01 00:00:00" (no payment time)."""
    if not isinstance(value, str):
        return None
    try:
        local = datetime.strptime(value.strip()[:19].replace("T", " "), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None
    if local.year < 2000:
        return None
    return (local - BEIJING).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch_ms_time(value: Any) -> str | None:
    """Milliseconds since the epoch (闲鱼's pay_time) as UTC ISO 8601."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 10**14:
        return None
    return datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(table: Mapping[Any, str], raw: Any) -> str:
    return table.get(raw) or f"other:{escaped(str(raw))[:40]}"


def taobao_trade(data: Any) -> Trade:
    """A 淘宝 trade (/Trade/TradeInfo, /Trade/TradesBuyerPay entries, the tradesuccess push):
    Tid, Status, PayTime, Payment, Orders[] of {Oid, NumIid, SkuId, OuterSkuId, OuterIid,
    Num, Title}."""
    if not isinstance(data, dict):
        raise WireError("a 淘宝 trade is not an object")
    tid = text_id(data.get("Tid"))
    if tid is None:
        raise WireError("a 淘宝 trade without Tid")
    lines = []
    for entry in data.get("Orders") or ():
        if isinstance(entry, dict):
            ids = _ids(entry, "SkuId", "OuterSkuId", "NumIid", "OuterIid")
            quantity, title = _count(entry.get("Num")), _text(entry.get("Title"))
            lines.append(TradeLine(ids, quantity, title, text_id(entry.get("Oid"))))
    return Trade(
        tid,
        _status(TAOBAO_STATUS, data.get("Status")),
        tuple(lines),
        beijing_time(data.get("PayTime")),
        yuan(data.get("Payment")),
    )


def xianyu_trade(data: Any) -> Trade:
    """A 闲鱼 order (aldsIdle /Order/Detail): biz_order_id, order_status, buy_amount, item
    {item_id, outer_id_sku, outer_id_spu, title}, sku ("skuId|属性..."), pay_time (ms)."""
    if not isinstance(data, dict):
        raise WireError("a 闲鱼 order is not an object")
    tid = text_id(data.get("biz_order_id"))
    if tid is None:
        raise WireError("a 闲鱼 order without biz_order_id")
    raw_item = data.get("item")
    item: dict[str, Any] = raw_item if isinstance(raw_item, dict) else {}
    sku = data.get("sku")
    sku_id = sku.split("|", 1)[0] if isinstance(sku, str) else None
    ids = _ids({"sku": sku_id, **item}, "sku", "outer_id_sku", "item_id", "outer_id_spu")
    line = TradeLine(ids, _count(data.get("buy_amount")), _text(item.get("title")))
    return Trade(
        tid,
        _status(XIANYU_STATUS, data.get("order_status")),
        (line,),
        epoch_ms_time(data.get("pay_time")),
        yuan(data.get("payment"), fen=True),
    )


def pdd_trade(tid: str, data: Any) -> Trade:
    """A 拼多多 order (aldsPdd /Trade/Detail): confirm_status (0 未成交 1 已成交 2 已取消),
    refund_status (1 无售后或售后关闭, 2 售后处理中, 3 退款中, 4 退款成功), item_list[] of
    {goods_id, sku_id, outer_id,
    outer_goods_id, goods_count, goods_name}. It carries no shipping state: whether our card
    went out is read from the sent log (/Cpd/GetLastSentResult)."""
    if not isinstance(data, dict):
        raise WireError("a 拼多多 order is not an object")
    confirm, refund = data.get("confirm_status"), data.get("refund_status")
    if refund == 4:
        status = REFUNDED
    elif confirm == 2:
        status = CANCELLED
    elif confirm == 1:
        status = PAID
    else:
        status = UNPAID if confirm == 0 else f"other:{escaped(str(confirm))[:40]}"
    return Trade(
        tid,
        status,
        pdd_lines(data.get("item_list")),
        beijing_time(data.get("pay_time")),
        yuan(data.get("pay_amount")),
        refunding=refund in (2, 3),
    )


def pdd_lines(items: Any) -> tuple[TradeLine, ...]:
    lines = []
    for entry in items or ():
        if isinstance(entry, dict):
            ids = _ids(entry, "sku_id", "outer_id", "goods_id", "outer_goods_id")
            lines.append(
                TradeLine(ids, _count(entry.get("goods_count")), _text(entry.get("goods_name")))
            )
    return tuple(lines)


def jd_trade(tid: str, data: Any) -> Trade:
    """A 京东 order (aldsJd /Order/Detail): orderState, itemInfoList[] of {skuId, outerSkuId,
    wareId, itemTotal, skuName}."""
    if not isinstance(data, dict):
        raise WireError("a 京东 order is not an object")
    lines = []
    for entry in data.get("itemInfoList") or ():
        if isinstance(entry, dict):
            ids = _ids(entry, "skuId", "outerSkuId", "wareId")
            lines.append(
                TradeLine(ids, _count(entry.get("itemTotal")), _text(entry.get("skuName")))
            )
    state = _status(JD_STATUS, data.get("orderState"))
    return Trade(tid, state, tuple(lines), beijing_time(data.get("paymentConfirmTime")))


def our_lines(trade: Trade, products: Mapping[str, str]) -> list[tuple[str, TradeLine]]:
    """The trade's sub-orders of ours, with their SKUs."""
    ours = []
    for line in trade.lines:
        sku = next((products[i] for i in line.ids if i in products), None)
        if sku is not None:
            ours.append((sku, line))
    return ours


def orders_of(
    trade: Trade, products: Mapping[str, str], *, one_card_each: bool = False
) -> list[PlatformOrder | RejectedOrder]:
    """The trade as the engine's orders: one per trade, for its one sub-order of ours (a
    sub-order whose ids are not in `products` is the merchant's other business, left alone).
    Several sub-orders of ours in one trade are refused: a 淘宝 delivery result is per trade
    (the buyer sees the last one), so they cannot be delivered one line at a time.
    `one_card_each`: the channel's delivery call takes one card (拼多多)."""
    ours = our_lines(trade, products)
    if not ours:
        return []
    if len(ours) > 1:
        reason = (
            f"trade {trade.tid} holds {len(ours)} items of ours (一单多个商品): deliver it by"
            " hand; an Agiso delivery covers a whole trade"
        )
        return [RejectedOrder(trade.tid, reason)]
    sku, line = ours[0]
    if line.quantity is None:
        return [RejectedOrder(trade.tid, "no readable quantity (数量)", sku)]
    if one_card_each and line.quantity != 1:
        reason = (
            f"拼多多 /DummySend/CardPwdSend carries one card number and password; this order"
            f" wants {line.quantity} (数量): deliver it by hand"
        )
        return [RejectedOrder(trade.tid, reason, sku, line.quantity)]
    return [
        PlatformOrder(
            order_id=trade.tid,
            status="paid",
            sku=sku,
            quantity=line.quantity,
            paid_at=trade.paid_at,
            amount=trade.amount,
            currency=CURRENCY if trade.amount is not None else None,
        )
    ]


# --- sent logs -----------------------------------------------------------------------------------
def _card(entry: Any, code: str, secret: str) -> CardItem | None:
    if not isinstance(entry, dict):
        return None
    c, p = entry.get(code), entry.get(secret)
    c = c if isinstance(c, str) else ""
    p = p if isinstance(p, str) else ""
    if not c and not p:
        return None
    # A card with a number only is a key whose secret is that number (our CardItem's secret
    # is never empty); the same rule as pool_lines in reverse.
    return CardItem(c, p) if p else CardItem("", c)


def last_sent_cards(data: Any) -> tuple[CardItem, ...]:
    """/Cpd/GetLastSentResult: [{title, cardPwdArr: [{c, p}]}] (闲鱼, 拼多多)."""
    cards: list[CardItem] = []
    for group in data if isinstance(data, list) else ():
        if isinstance(group, dict):
            for entry in group.get("cardPwdArr") or ():
                card = _card(entry, "c", "p")
                if card is not None:
                    cards.append(card)
    return tuple(cards)


def taobao_sent_cards(data: Any) -> tuple[CardItem, ...]:
    """/Trade/QueryTradeCPSendLog: {Orders: [{Oid, SendCards: [{CpcId, Cards: [{Card, Pwd}]}]}]}
    ("仅支持查询淘宝本地仓出库的订单": cards Agiso's own pools sent)."""
    cards: list[CardItem] = []
    orders = data.get("Orders") if isinstance(data, dict) else None
    for order in orders if isinstance(orders, list) else ():
        for group in order.get("SendCards") or () if isinstance(order, dict) else ():
            for entry in group.get("Cards") or () if isinstance(group, dict) else ():
                card = _card(entry, "Card", "Pwd")
                if card is not None:
                    cards.append(card)
    return tuple(cards)


def same_cards(a: Sequence[CardItem], b: Sequence[CardItem]) -> bool:
    return sorted((i.code, i.secret) for i in a) == sorted((i.code, i.secret) for i in b)
