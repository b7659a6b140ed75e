"""Delivery on each channel behind Agiso, made safe to repeat although no call is idempotent.

Every channel reads the order first and acts only on a paid, unshipped order. A call whose
answer is lost (or a 5xx) is settled by reading the order's state or sent log again in the
same delivery: a state that moved from paid to shipped between our two reads moved because of
our call. Marking the order shipped comes BEFORE any message to the buyer, so a shipped order
whose delivery this process did not see through is never sent a message again (it may already
hold the keys): it is parked for a human, with the reason. What a process saw is kept in
`Progress`, so a delivery stopped half-way by a rate limit, an expired token or a deposit that
ran out resumes where it stopped once calls flow again; after a restart it is parked instead.

- 淘宝: /Trade/CreateOrderResult (each call adds a result, the buyer sees the last: repeating
  the same content is harmless), /Trade/LogisticsDummySend, then /WwMsg/Send (at most 3 per
  order in 10 days; calls beyond still charged, not sent; code 12 = already sent). The keys are
  in the result; the message tells the buyer. A message whose outcome is unknown is not sent
  again.
- 闲鱼: /Order/DummySend, then /ImMsg/SendMsg (at most 1000 characters, 5 per order): the
  message carries the keys, so one whose outcome is unknown parks the order.
- 拼多多: /DummySend/CardPwdSend {tid, cardNo, password}: one card; settled by the sent log
  /Cpd/GetLastSentResult.
- 京东: /GameCard/CardSend {tid, cardJson}: settled by /Order/Detail's orderState.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from agent.domain import (
    AgentError,
    Ambiguous,
    AuthFailed,
    BadResponse,
    CardItem,
    DeliveryConflict,
    OrderClosed,
    Permanent,
    RemoteDelivery,
    Transient,
)
from agent.logs import get_logger
from agent.platforms.agiso_client import AgisoClient, AlreadySent, MessageLimit
from agent.platforms.agiso_messages import Limits
from agent.platforms.agiso_wire import (
    CANCELLED,
    CHANNEL_NAMES,
    PAID,
    REFUNDED,
    SERVICES,
    SHIPPED,
    Trade,
    TradeLine,
    WireError,
    jd_trade,
    last_sent_cards,
    pdd_trade,
    same_cards,
    taobao_sent_cards,
    taobao_trade,
    xianyu_trade,
)

log = get_logger("kami.agiso")

# Per channel: a message's characters and the messages an order may receive (淘宝 /WwMsg/Send
# "最大长度5000字", "一笔订单10天内 ... 可发送3次"; 闲鱼 /ImMsg/SendMsg "长度限制1000，一笔订单
# 限制5条"). 拼多多 and 京东 deliver the card through the order itself, no message.
MESSAGE_LIMITS = {"taobao": Limits(5000, 3), "xianyu": Limits(1000, 5)}
RESULT_CARDS_CHARS = 5000  # CreateOrderResult: "CardPwdContent ... 长度不能超过5000字符"
IN_CALL_TRIES = 3  # a definite failure after the order is marked shipped: tried again now
ALDS_PAID = 1  # aldsType 1: 付款后发货


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery: the keys, what the buyer reads, and what this process saw of it."""

    items: tuple[CardItem, ...]
    title: str
    parts: tuple[str, ...]
    progress: Progress


@dataclass
class Progress:
    """What this process saw of one order's delivery."""

    items: tuple[CardItem, ...]
    parts: int = 0  # messages to send
    shipped: bool = False  # marked shipped by us (or seen to move because of our call)
    sent: int = 0  # messages confirmed sent
    unknown: str | None = None  # a message whose outcome is unknown: never sent again

    @property
    def done(self) -> bool:
        return self.shipped and (self.sent >= self.parts or self.unknown is not None)


def _closed(trade: Trade) -> OrderClosed | None:
    if trade.status in (REFUNDED, CANCELLED):
        return OrderClosed(f"order {trade.tid} {trade.status} before our delivery", trade.status)
    return None


async def _again(call: Callable[[], Awaitable[object]], what: str) -> None:
    """A call after the order is marked shipped, which must be seen through in this delivery:
    a definite failure (nothing happened) is tried again a few times, briefly. Refusals (an
    AgisoRefused) and unknown outcomes go to the caller."""
    for attempt in range(1, IN_CALL_TRIES + 1):
        try:
            await call()
            return
        except AuthFailed:
            raise
        except Transient as exc:
            if attempt == IN_CALL_TRIES:
                raise
            log.warning("agiso_retry_in_call", what=what, attempt=attempt, error=str(exc))
            await asyncio.sleep(min(exc.retry_after or 0.2 * attempt, 2.0))


class Channel:
    """What every channel shares; each subclass speaks one marketplace."""

    key = ""
    one_card_each = False

    def __init__(self, client: AgisoClient) -> None:
        self.client = client
        self.service = SERVICES[self.key]
        self.label = CHANNEL_NAMES[self.key]

    async def trade(self, tid: str) -> Trade:
        """The order as the marketplace shows it now."""
        raise NotImplementedError

    async def deliver(self, trade: Trade, line: TradeLine, delivery: Delivery) -> None:
        """Delivers the keys (and the message) to `line` of the paid order `trade`."""
        raise NotImplementedError

    async def delivered(self, trade: Trade, progress: Progress | None) -> RemoteDelivery:
        """What a shipped order holds, for the engine to compare with the keys it bound."""
        if progress is not None and progress.done:
            return RemoteDelivery("delivered", progress.items)
        if progress is not None and progress.shipped and progress.unknown is None:
            return RemoteDelivery("paid")  # shipped by us, messages still to send: resume
        raise Permanent(
            f"{self.label}订单 {trade.tid} 已发货，但阿奇索没有接口读回发给买家的卡密，无法确认是否"
            f"为本程序所发：请在后台核对 (the order shows shipped and Agiso offers no way to read"
            f" back what the buyer got: check it by hand)"
        )

    async def remote(self, tid: str, progress: Progress | None) -> RemoteDelivery:
        """The order as the engine knows orders (get_order)."""
        trade = await self.trade(tid)
        if trade.status in (REFUNDED, CANCELLED):
            return RemoteDelivery(trade.status)
        if trade.status == SHIPPED:
            return await self.delivered(trade, progress)
        if trade.status == PAID:
            return RemoteDelivery("paid")
        return RemoteDelivery(trade.status.removeprefix("other:")[:40])

    def _check_open(self, trade: Trade, progress: Progress) -> None:
        closed = _closed(trade)
        if closed is not None:
            raise closed
        if trade.status == SHIPPED and not progress.shipped:
            raise Permanent(
                f"{self.label}订单 {trade.tid} 已经发货，不是本程序在这次运行中发的：买家可能已收到"
                f"卡密，请在后台核对 (already shipped, not by this run of the agent: check it)"
            )
        if trade.status not in (PAID, SHIPPED):
            raise Permanent(f"{self.label}订单 {trade.tid} 状态 {trade.status}: not paid")

    async def _ship(self, tid: str, call: Callable[[], Awaitable[object]]) -> None:
        """Marks the paid order shipped; an unknown or failed outcome is settled by reading
        the order again (shipped now: our call did it; still paid: nothing happened)."""
        for attempt in (1, 2):
            try:
                await call()
                return
            except AuthFailed:
                raise
            except (Transient, Ambiguous, Permanent) as exc:
                failure: AgentError = exc
            trade = await self.trade(tid)
            if trade.status == SHIPPED:
                log.info("agiso_ship_confirmed", channel=self.key, tid=tid, after=str(failure))
                return
            closed = _closed(trade)
            if closed is not None:
                raise closed from None
            if attempt == 2 or isinstance(failure, Permanent):
                raise failure
        raise AssertionError("unreachable")

    async def _messages(
        self, tid: str, parts: Sequence[str], progress: Progress, send: str, field: str
    ) -> None:
        """Sends the message parts not yet confirmed, each once."""
        for index in range(progress.sent, len(parts)):
            text = parts[index]

            async def one(text: str = text) -> None:
                await self.client.write(self.service, send, {"tid": tid, field: text})

            try:
                await _again(one, f"{self.service}{send}")
            except AlreadySent:
                log.info("agiso_message_already_sent", channel=self.key, tid=tid, part=index + 1)
            except Ambiguous as exc:
                progress.unknown = str(exc)
                raise
            progress.sent = index + 1


class TaobaoChannel(Channel):
    key = "taobao"

    async def trade(self, tid: str) -> Trade:
        envelope = await self.client.read(self.service, "/Trade/TradeInfo", {"tid": tid})
        try:
            return taobao_trade(envelope.data)
        except WireError as exc:
            raise BadResponse(f"淘宝 /Trade/TradeInfo {tid}: {exc}") from None

    @staticmethod
    def result_content(oid: str, title: str, items: Sequence[CardItem]) -> str:
        cards = [
            {"c": i.code, "p": i.secret, "d": ""} if i.code else {"c": i.secret, "p": "", "d": ""}
            for i in items
        ]
        group = {"CardNoShowType": 0, "PwdShowType": 0, "Title": title, "CardPwdArr": cards}
        if len(json.dumps([group], ensure_ascii=False)) > RESULT_CARDS_CHARS:
            raise Permanent(
                f"淘宝发货结果的卡密超过 {RESULT_CARDS_CHARS} 字 (the keys exceed the"
                f" {RESULT_CARDS_CHARS}-character delivery result): deliver by hand"
            )
        entry = {"Oid": int(oid) if oid.isdigit() else oid, "CardPwdContent": [group]}
        return json.dumps([entry], ensure_ascii=False, separators=(",", ":"))

    async def deliver(self, trade: Trade, line: TradeLine, delivery: Delivery) -> None:
        """The result (the keys), the order marked shipped, then the message."""
        progress, parts = delivery.progress, delivery.parts
        self._check_open(trade, progress)
        tid = trade.tid
        if line.oid is None:
            raise Permanent(f"淘宝订单 {tid}: the sub-order has no Oid")
        if not progress.shipped:
            content = self.result_content(line.oid, delivery.title, delivery.items)
            params: dict[str, str | int] = {"tid": tid, "aldsType": ALDS_PAID, "content": content}

            async def result() -> None:
                await self.client.write(self.service, "/Trade/CreateOrderResult", params)

            try:
                await _again(result, "alds/Trade/CreateOrderResult")
            except Ambiguous:
                # The same content again: at worst a second, identical result (the buyer sees
                # the last one, so the same keys).
                await _again(result, "alds/Trade/CreateOrderResult")

            async def ship() -> None:
                await self.client.write(self.service, "/Trade/LogisticsDummySend", {"tids": tid})

            await self._ship(tid, ship)
            progress.shipped = True
        try:
            await self._messages(tid, parts, progress, "/WwMsg/Send", "msg")
        except Ambiguous as exc:
            # The keys are in the delivery result already: the message is not sent again.
            log.warning("taobao_message_unconfirmed", tid=tid, error=str(exc))
        except MessageLimit as exc:
            progress.unknown = str(exc)
            log.warning("taobao_message_limit", tid=tid, error=str(exc))

    async def delivered(self, trade: Trade, progress: Progress | None) -> RemoteDelivery:
        if progress is None:
            envelope = await self.client.read(
                self.service, "/Trade/QueryTradeCPSendLog", {"tid": trade.tid}, empty_ok=True
            )
            cards = taobao_sent_cards(envelope.data)
            if cards:  # Agiso's own pools sent these: the engine compares them with ours
                return RemoteDelivery("delivered", cards)
        return await super().delivered(trade, progress)


class XianyuChannel(Channel):
    key = "xianyu"

    async def trade(self, tid: str) -> Trade:
        envelope = await self.client.read(self.service, "/Order/Detail", {"tid": tid})
        try:
            return xianyu_trade(envelope.data)
        except WireError as exc:
            raise BadResponse(f"闲鱼 /Order/Detail {tid}: {exc}") from None

    async def deliver(self, trade: Trade, line: TradeLine, delivery: Delivery) -> None:
        """Marked shipped, then the message with the keys (each part once, ever)."""
        progress, parts = delivery.progress, delivery.parts
        if progress.unknown is not None:
            raise Permanent(self._unknown_reason(trade.tid, progress.unknown))
        self._check_open(trade, progress)
        tid = trade.tid
        if not progress.shipped:

            async def ship() -> None:
                await self.client.write(self.service, "/Order/DummySend", {"tid": tid})

            await self._ship(tid, ship)
            progress.shipped = True
        try:
            await self._messages(tid, parts, progress, "/ImMsg/SendMsg", "msg")
        except Ambiguous as exc:
            raise Permanent(self._unknown_reason(tid, str(exc))) from None
        except MessageLimit as exc:
            raise Permanent(
                f"闲鱼订单 {tid} 已标记发货，但消息条数已达上限，卡密未发出：请手动发给买家"
                f" (marked shipped, the message cap is used up: send the keys by hand): {exc}"
            ) from None

    @staticmethod
    def _unknown_reason(tid: str, error: str) -> str:
        return (
            f"闲鱼订单 {tid} 的卡密消息是否送达未知（接口无法读回）："
            f"请在闲鱼聊天中核对，未收到再手动发送 (whether the buyer got the message is"
            f" unknown and cannot be read back: check the chat): {error}"
        )

    async def delivered(self, trade: Trade, progress: Progress | None) -> RemoteDelivery:
        if progress is None:
            envelope = await self.client.read(
                self.service,
                "/Cpd/GetLastSentResult",
                {"tid": trade.tid, "aldsType": ALDS_PAID},
                empty_ok=True,
            )
            cards = last_sent_cards(envelope.data)
            if cards:  # Agiso's own auto-delivery sent these
                return RemoteDelivery("delivered", cards)
        return await super().delivered(trade, progress)


class PddChannel(Channel):
    key = "pdd"
    one_card_each = True

    async def trade(self, tid: str) -> Trade:
        envelope = await self.client.read(self.service, "/Trade/Detail", {"tid": tid})
        try:
            return pdd_trade(tid, envelope.data)
        except WireError as exc:
            raise BadResponse(f"拼多多 /Trade/Detail {tid}: {exc}") from None

    async def sent(self, tid: str) -> tuple[CardItem, ...]:
        envelope = await self.client.read(
            self.service,
            "/Cpd/GetLastSentResult",
            {"tid": tid, "aldsType": ALDS_PAID},
            empty_ok=True,
        )
        return last_sent_cards(envelope.data)

    async def remote(self, tid: str, progress: Progress | None) -> RemoteDelivery:
        trade = await self.trade(tid)
        if trade.status in (REFUNDED, CANCELLED):
            return RemoteDelivery(trade.status)
        cards = await self.sent(tid)
        if cards:
            return RemoteDelivery("delivered", cards)
        if trade.status == PAID:
            return RemoteDelivery("paid")
        return RemoteDelivery(trade.status.removeprefix("other:")[:40])

    async def deliver(self, trade: Trade, line: TradeLine, delivery: Delivery) -> None:
        """One card; the sent log says whether it (or another) is on the order."""
        items = delivery.items
        if len(items) != 1:
            raise Permanent(f"拼多多 takes one card per order, got {len(items)}")
        closed = _closed(trade)
        if closed is not None:
            raise closed
        item = items[0]
        number, password = (item.code, item.secret) if item.code else (item.secret, "")
        params = {"tid": trade.tid, "cardNo": number, "password": password}
        for attempt in (1, 2):
            cards = await self.sent(trade.tid)
            if cards:
                if same_cards(cards, items):
                    return
                raise DeliveryConflict(f"拼多多订单 {trade.tid} 已有其他卡密 (holds another card)")
            if attempt == 2:
                break
            if trade.refunding:
                # 售后处理中/退款中: the buyer asked for the money back; a card sent now could
                # go with the refund. Wait: a refused refund shows 1 again, a granted one 4.
                raise Transient(
                    f"拼多多订单 {trade.tid} 售后处理中/退款中，暂不发卡 (a refund is pending:"
                    " the card waits until it is settled)",
                    retry_after=300.0,
                )
            try:
                await self.client.write(self.service, "/DummySend/CardPwdSend", params)
                return
            except AuthFailed:
                raise
            except (Ambiguous, Transient) as exc:
                log.warning("pdd_card_send_unclear", tid=trade.tid, error=str(exc))
                failure: AgentError = exc
        raise failure


class JdChannel(Channel):
    key = "jd"

    async def trade(self, tid: str) -> Trade:
        envelope = await self.client.read(self.service, "/Order/Detail", {"order_id": tid})
        try:
            return jd_trade(tid, envelope.data)
        except WireError as exc:
            raise BadResponse(f"京东 /Order/Detail {tid}: {exc}") from None

    async def deliver(self, trade: Trade, line: TradeLine, delivery: Delivery) -> None:
        """/GameCard/CardSend with every card; settled by the order's state."""
        progress, items = delivery.progress, delivery.items
        self._check_open(trade, progress)
        if progress.shipped:
            return
        cards = [{"cardno": i.code, "cardpass": i.secret} for i in items]
        params = {"tid": trade.tid, "cardJson": json.dumps(cards, ensure_ascii=False)}

        async def send() -> None:
            await self.client.write(self.service, "/GameCard/CardSend", params)

        await self._ship(trade.tid, send)
        progress.shipped = True


CHANNEL_TYPES: dict[str, type[Channel]] = {
    "taobao": TaobaoChannel,
    "xianyu": XianyuChannel,
    "pdd": PddChannel,
    "jd": JdChannel,
}
