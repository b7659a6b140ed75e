"""A local fake of the Agiso (阿奇索) open platform gateway, built from its documentation and
written independently of the adapter (no imports from agent.platforms.agiso*), so the adapter
is checked against Agiso's documented behaviour, not against itself.

Sources (tomwptgb/agiso-open-platform-workspace, knowledge-base/docs and extracted pages; see
docs/platforms/agiso.md):
- guide: form POSTs to https://gw-api.agiso.com/{service}{path} with `Authorization: Bearer
  <token>` and `ApiVersion: 1`; `timestamp` within 10 minutes; `sign` = md5(AppSecret +
  sorted name+value + AppSecret); 20 calls a second per AppId (接口调用配额，20次/秒);
- errorCode.md: 1 无效AccessToken, 2 Api调用限制, 4 验签失败, 5 参数错误, 7 全部失败,
  9 交易不存在, 12 已经发过旺旺消息, 16 预存款余额不足, 18 业务站点未授权, 25 发送消息限制 ...;
- alds/api.md: TradeInfo, TradesBuyerPay, CreateOrderResult ("多次调用会生成多个发货结果，买家提取
  时只会提取到最后一个发货结果", CardPwdContent <= 5000), WwMsg/Send (<= 5000 characters, "一笔
  订单10天内 ... 可发送3次 ... 调用超过3次后会导致消息发不了，但仍会扣除接口费用"),
  LogisticsDummySend (ErrorInfos), QueryTradeCPSendLog (only cards Agiso's pools sent),
  CardPwd/Add (<= 1000 lines), CardPwdCategory/GetStorage, CardPwd/StockBack;
- aldsIdle/api.md: Order/Detail, Order/DummySend, ImMsg/SendMsg (<= 1000, 5 per order),
  Cpd/GetLastSentResult; aldsPdd/api.md: Trade/Detail, DummySend/CardPwdSend,
  Cpd/GetLastSentResult; aldsJd/api.md: Order/Detail, GameCard/CardSend; open/api.md:
  Bankroll/QueryDeposit;
- */push.md: the paid pushes (tradesuccess aopic 2, IdleTradePay 1, PddTradeConfirmed 1,
  JdGameCardTradePay 8), signed md5(AppSecret + "json" + json + "timestamp" + ts + AppSecret).

What the documents leave open is modelled the simple way and named here: a timestamp out of
the window is refused as 4 (验签失败); a call over the quota is refused with 2 and not
charged; every accepted call costs `price` from the AppId's deposit, and with too little left
the call is refused with 16; 拼多多's sent log shows the card of /DummySend/CardPwdSend; a
second card send, a second dummy send, a card send to a shipped 京东 order are refused
(AllowRetry false); the faults below are injected before or after the change as named.

Card pools (卡种): a pool keeps its cards sold as well as unsold, and refuses a card number it
has ever held when allowReplace is off (the kind 禁止重复卡号; whether Agiso refuses a card
already SOLD is not documented: modelled so, and named in docs/platforms/agiso.md). An item
linked to a pool (`link_pool`) is Agiso's own auto-delivery: `sell_from_pools` sends each paid
order of it its cards from the pool (oldest first), marks it shipped, and records the cards
for /Trade/QueryTradeCPSendLog (with the pool's CpcId), /Cpd/GetLastSentResult and the
"自动发货成功" push (aopic 2048); an order the pool cannot fill waits.

Also modelled from the documentation (knobs off by default): /Trade/LogisticsDummySend's
per-trade ErrorInfos (DummySendErrorInfo: -85 可重试 with AllowRetry true,
`faults.dummy_send_retryable`; -50 重复发货 for a shipped trade; -81 otherwise, as api.md's
example); 11 没有数据 for a read that finds nothing (`no_data_as_error`); TradesBuyerPay's Data
as one trade object, as its example shows (`single_trade_as_object`); 拼多多 refund_status
(`FakeOrder.refund_status`); amounts as each service writes them (闲鱼 payment in 分).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from tests.loopback import serve

QUOTA = 20  # calls a second per AppId
WINDOW = 600.0  # timestamp skew allowed
WW_CAP = 3
IM_CAP = 5
WW_CHARS = 5000
IM_CHARS = 1000
RESULT_CHARS = 5000
SERVICES = {"taobao": "alds", "xianyu": "aldsIdle", "pdd": "aldsPdd", "jd": "aldsJd"}
FROM_PLATFORM = {"taobao": "TbAlds", "xianyu": "AldsIdle", "pdd": "PddAlds", "jd": "AldsJd"}
WRITES = {
    "/Trade/CreateOrderResult",
    "/WwMsg/Send",
    "/Trade/LogisticsDummySend",
    "/Order/DummySend",
    "/ImMsg/SendMsg",
    "/DummySend/CardPwdSend",
    "/GameCard/CardSend",
    "/CardPwd/Add",
    "/CardPwd/StockBack",
}


def md5_sign(params: dict[str, str], secret: str) -> str:
    text = secret + "".join(k + params[k] for k in sorted(params) if k != "sign") + secret
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def beijing(ts: float) -> str:
    return (datetime.fromtimestamp(ts, UTC) + timedelta(hours=8)).strftime("%Y-%m-%d %H:%M:%S")


class ShiftedClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class AgisoFaults:
    allow_retry_rate: float = 0.0  # IsSuccess false, AllowRetry true, nothing done (writes)
    error_before_rate: float = 0.0  # HTTP 502, nothing done (any call)
    lose_after_change_rate: float = 0.0  # the change is made, the connection dropped (writes)
    error_after_change_rate: float = 0.0  # the change is made, HTTP 500 (writes)
    only: frozenset[str] = frozenset()  # restrict the faults to these paths (empty: all)
    # /Trade/LogisticsDummySend answers this many times 7 全部失败 with the items' ErrorInfos
    # ErrorCode -85 "可重试的错误", AllowRetry true (the envelope's AllowRetry null), nothing done.
    dummy_send_retryable: int = 0


@dataclass
class Shop:
    token: str
    channel: str
    app_id: str
    expired: bool = False


@dataclass
class FakeOrder:
    channel: str
    tid: str
    item: str  # the marketplace's item or SKU id
    quantity: int
    title: str
    status: str  # channel-native: a 淘宝 Status, 闲鱼 order_status, ...
    modified: float
    oid: str = ""
    results: list[list[dict[str, str]]] = field(default_factory=list)  # 淘宝 CreateOrderResult
    ww: list[str] = field(default_factory=list)  # 旺旺 messages delivered
    ww_calls: int = 0
    ww_lost_over_cap: int = 0
    im: list[str] = field(default_factory=list)  # 闲鱼 messages delivered
    cards: list[tuple[str, str]] = field(default_factory=list)  # 拼多多 / 京东 cards sent
    card_sends: int = 0
    pool_cards: list[tuple[str, str]] = field(default_factory=list)  # Agiso's own sends
    pool_id: str = ""  # the pool they came from
    refund_status: int = 1  # 拼多多 /Trade/Detail: 1 无售后, 2 售后处理中, 3 退款中, 4 退款成功


@dataclass
class Call:
    path: str
    outcome: str  # ok, refused:<code>, fault:<kind>


class FakeAgiso:
    def __init__(
        self,
        app_id: str,
        app_secret: str,
        *,
        seed: int = 1,
        clock: Callable[[], float] | None = None,
        deposit: float = 1000.0,
        price: float = 0.002,
    ) -> None:
        self.app_id = app_id
        self.app_secret = app_secret
        self.clock = clock or ShiftedClock()
        self.random = random.Random(seed)
        self.deposit = deposit
        self.price = price
        self.faults = AgisoFaults()
        self.shops: dict[str, Shop] = {}
        self.orders: dict[str, FakeOrder] = {}
        self.pools: dict[str, list[tuple[str, str]]] = {}  # unsold cards, oldest first
        self.sold: dict[str, list[tuple[str, str]]] = {}  # cards each pool sent
        self.linked: dict[str, str] = {}  # item -> the pool Agiso delivers it from
        self.sold_to: dict[tuple[str, str], str] = {}  # (pool, card) -> the order it went to
        self.closed_pools: set[str] = set()  # pools deleted in the back office
        # A read that finds nothing (a sent log without cards, an empty page of trades)
        # answers IsSuccess false, 11 没有数据 (errorCode.md) instead of an empty Data.
        self.no_data_as_error = False
        # /Trade/TradesBuyerPay's documented example shows Data as one trade object (the
        # TradeInfo sample); a public client reads a list. True: a page of one trade is
        # answered as that object.
        self.single_trade_as_object = False
        self.calls: list[Call] = []
        self._window: deque[float] = deque()
        self.quota_refusals = 0
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # --- set-up -------------------------------------------------------------------------------
    def add_shop(self, channel: str, token: str) -> Shop:
        shop = Shop(token, channel, self.app_id)
        self.shops[token] = shop
        return shop

    def add_order(self, channel: str, item: str, quantity: int = 1, title: str = "测试商品") -> str:
        n = next(self._ids)
        tid = {
            "taobao": f"{3_000_000_000_000 + n}",
            "xianyu": f"{4_000_000_000_000_000 + n}",
            "pdd": f"240101-{500_000_000_000 + n}",
            "jd": f"{290_000_000_000 + n}",
        }[channel]
        status = {"taobao": "WAIT_SELLER_SEND_GOODS", "xianyu": 2, "pdd": "1", "jd": "P"}[channel]
        self.orders[tid] = FakeOrder(
            channel, tid, item, quantity, title, str(status), self.clock(), oid=f"{tid}1"
        )
        return tid

    def close_order(self, tid: str) -> None:
        order = self.orders[tid]
        order.status = {"taobao": "TRADE_CLOSED", "xianyu": "6", "pdd": "cancel", "jd": "C"}[
            order.channel
        ]

    def link_pool(self, item: str, cpc_id: str) -> None:
        """Agiso's auto-delivery sends orders of `item` from pool `cpc_id`."""
        self.linked[item] = cpc_id
        self.pools.setdefault(cpc_id, [])

    def sell_from_pools(self, only: Collection[str] | None = None) -> list[str]:
        """Agiso's auto-delivery: every paid order of a linked item (of `only`, if given)
        that its pool can fill gets its cards and is marked shipped, oldest first; the orders
        sent."""
        sent = []
        for order in self.orders.values():
            if only is not None and order.tid not in only:
                continue
            cpc_id = self.linked.get(order.item)
            if cpc_id is None or order.pool_cards or order.status != self._paid(order.channel):
                continue
            pool = self.pools[cpc_id]
            if len(pool) < order.quantity:
                continue
            cards, pool[:] = pool[: order.quantity], pool[order.quantity :]
            for card in cards:
                assert (cpc_id, card[0]) not in self.sold_to, f"{card[0]} sold twice"
                self.sold_to[cpc_id, card[0]] = order.tid
            self.sold.setdefault(cpc_id, []).extend(cards)
            order.pool_cards, order.pool_id = list(cards), cpc_id
            order.status = {"taobao": "WAIT_BUYER_CONFIRM_GOODS", "xianyu": "3", "pdd": "shipped"}[
                order.channel
            ]
            sent.append(order.tid)
        return sent

    @staticmethod
    def _paid(channel: str) -> str:
        return {"taobao": "WAIT_SELLER_SEND_GOODS", "xianyu": "2", "pdd": "1", "jd": "P"}[channel]

    def shipped(self, tid: str) -> bool:
        order = self.orders[tid]
        return order.status in ("WAIT_BUYER_CONFIRM_GOODS", "3", "S", "shipped")

    # --- what the buyer sees ---------------------------------------------------------------------
    def buyer_texts(self, tid: str) -> list[str]:
        """Everything the buyer can read: the last delivery result's cards (淘宝), each
        message, each card sent (拼多多, 京东)."""
        order = self.orders[tid]
        texts = [f"{c}\t{p}" for c, p in order.cards]
        texts += order.ww + order.im
        if order.results:
            texts += [f"{card['c']}\t{card['p']}" for card in order.results[-1]]
        return texts

    # --- server ----------------------------------------------------------------------------------
    async def start(self) -> str:
        app = web.Application(client_max_size=2 * 1024 * 1024)
        app.router.add_post("/{service}/{path:.*}", self._handle)
        self._runner, self.base_url = await serve(app)
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def answer(data: Any = None, code: int = 0, msg: str = "", allow: bool | None = None) -> Any:
        return web.json_response(
            {
                "IsSuccess": code == 0,
                "Data": data,
                "Error_Code": code,
                "Error_Msg": msg,
                "AllowRetry": allow,
                "RequestId": "20240101000000001",
            }
        )

    def _quota(self) -> bool:
        now = time.monotonic()
        while self._window and self._window[0] <= now - 1.0:
            self._window.popleft()
        if len(self._window) >= QUOTA:
            self.quota_refusals += 1
            return False
        self._window.append(now)
        return True

    def _fault(self, path: str, kind: str) -> bool:
        if self.faults.only and path not in self.faults.only:
            return False
        return self.random.random() < getattr(self.faults, kind)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        service = request.match_info["service"]
        path = "/" + request.match_info["path"]
        form = {k: str(v) for k, v in (await request.post()).items()}
        refused = self._check(request, service, form)
        if refused is not None:
            code, msg = refused
            self.calls.append(Call(path, f"refused:{code}"))
            return self.answer(None, code, msg)
        write = path in WRITES
        if self._fault(path, "error_before_rate"):
            self.calls.append(Call(path, "fault:502"))
            return web.Response(status=502, text="Bad Gateway")
        if write and self._fault(path, "allow_retry_rate"):
            self.calls.append(Call(path, "fault:allow_retry"))
            return self.answer(None, 10, "调用淘宝接口失败 (injected)", True)
        handler = getattr(self, "_" + (service + path).replace("/", "_").lower(), None)
        if handler is None:
            self.calls.append(Call(path, "refused:404"))
            return web.Response(status=404, text="no such API")
        if service != "open":
            self.deposit -= self.price
        response: web.Response = handler(form)
        if write and self._fault(path, "lose_after_change_rate"):
            self.calls.append(Call(path, "fault:lost"))
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)
        if write and self._fault(path, "error_after_change_rate"):
            self.calls.append(Call(path, "fault:500_after"))
            return web.Response(status=500, text="Internal Server Error")
        self.calls.append(Call(path, "ok"))
        return response

    def _check(self, request: web.Request, service: str, form: dict[str, str]) -> Any:
        if request.headers.get("ApiVersion") != "1":
            return 5, "ApiVersion 缺失"
        ts = form.get("timestamp", "")
        if not ts.isdigit() or abs(int(ts) - self.clock()) > WINDOW:
            return 4, "时间戳超出10分钟"
        if form.get("sign", "").lower() != md5_sign(form, self.app_secret):
            return 4, "验签失败"
        if service == "open":
            if form.get("appId") != self.app_id:
                return 8, "授权失败"
        else:
            auth = request.headers.get("Authorization", "")
            shop = self.shops.get(auth.removeprefix("Bearer "))
            if not auth.startswith("Bearer ") or shop is None or shop.expired:
                return 1, "无效AccessToken"
            if SERVICES[shop.channel] != service:
                return 18, "业务站点未授权"
            tid = form.get("tid") or form.get("order_id") or form.get("tids", "").split(",")[0]
            order = self.orders.get(tid)
            if order is not None and order.channel != shop.channel:
                return 9, "交易不存在"
        if not self._quota():
            return 2, "Api调用限制"
        if service != "open" and self.deposit < self.price:
            return 16, "预存款余额不足了，限制接口调用"
        return None

    def _order(self, form: dict[str, str], channel: str, key: str = "tid") -> FakeOrder | None:
        order = self.orders.get(form.get(key, ""))
        return order if order is not None and order.channel == channel else None

    # --- 淘宝 (alds) ------------------------------------------------------------------------------
    def _taobao_json(self, order: FakeOrder) -> dict[str, Any]:
        return {
            "Tid": int(order.tid),
            "Status": order.status,
            "BuyerNick": "张**",
            "Created": beijing(order.modified),
            "PayTime": beijing(order.modified),
            "Payment": "3.00",
            "Orders": [
                {
                    "Num": order.quantity,
                    "NumIid": 45533870790,
                    "SkuId": order.item,
                    "Oid": int(order.oid),
                    "OuterIid": "ALDS1000",
                    "Title": order.title,
                    "Payment": "3.00",
                }
            ],
        }

    def _alds_trade_tradesbuyerpay(self, form: dict[str, str]) -> web.Response:
        try:
            since = datetime.strptime(form["modifyTimeStart"], "%Y-%m-%d %H:%M:%S")
            page, size = int(form.get("pageNo", "1")), int(form.get("pageSize", "20"))
        except (KeyError, ValueError):
            return self.answer(None, 5, "参数错误")
        if size > 100 or page < 1:
            return self.answer(None, 5, "参数错误")
        since_ts = (since - timedelta(hours=8)).replace(tzinfo=UTC).timestamp()
        waiting = [
            o
            for o in self.orders.values()
            if o.channel == "taobao" and o.status == "WAIT_SELLER_SEND_GOODS"
        ]
        waiting = [o for o in waiting if o.modified >= since_ts - 1]
        chunk = waiting[(page - 1) * size : page * size]
        if not chunk and self.no_data_as_error:
            return self.answer(None, 11, "没有数据")
        if len(chunk) == 1 and self.single_trade_as_object:
            return self.answer(self._taobao_json(chunk[0]))
        return self.answer([self._taobao_json(o) for o in chunk])

    def _alds_trade_tradeinfo(self, form: dict[str, str]) -> web.Response:
        order = self._order(form, "taobao")
        if order is None:
            return self.answer(None, 9, "交易不存在")
        return self.answer(self._taobao_json(order))

    def _alds_trade_createorderresult(self, form: dict[str, str]) -> web.Response:
        order = self._order(form, "taobao")
        if order is None:
            return self.answer(None, 9, "交易不存在")
        try:
            content = json.loads(form["content"])
            [entry] = content
            assert str(entry["Oid"]) == order.oid
            groups = entry.get("CardPwdContent") or []
            assert len(json.dumps(groups, ensure_ascii=False)) <= RESULT_CHARS
            cards = [dict(card) for group in groups for card in group["CardPwdArr"]]
        except (KeyError, ValueError, AssertionError, TypeError):
            return self.answer(None, 5, "参数错误")
        order.results.append(cards)
        return self.answer("")

    def _alds_wwmsg_send(self, form: dict[str, str]) -> web.Response:
        order = self._order(form, "taobao")
        if order is None:
            return self.answer(None, 9, "交易不存在")
        msg = form.get("msg", "")
        if not msg or len(msg) > WW_CHARS:
            return self.answer(None, 5, "参数错误")
        if msg in order.ww:
            return self.answer(None, 12, "已经发过旺旺消息")
        order.ww_calls += 1
        if order.ww_calls > WW_CAP:
            order.ww_lost_over_cap += 1  # charged, answered as sent, never delivered
        else:
            order.ww.append(msg)
        return self.answer(None)

    def _alds_trade_logisticsdummysend(self, form: dict[str, str]) -> web.Response:
        # DummySendErrorInfo: -85 可重试的错误, -50 重复发货, -86 不可重试, -90 授权失败; the
        # api.md example shows -81 (AllowRetry false) for orders that cannot be shipped.
        tids = form.get("tids", "").split(",")
        if self.faults.dummy_send_retryable > 0:
            self.faults.dummy_send_retryable -= 1
            errors = [
                {"Tid": int(t) if t.isdigit() else 0, "ErrorCode": -85, "AllowRetry": True}
                for t in tids
            ]
            return self.answer({"ErrorInfos": errors}, 7, "全部失败")
        errors = []
        for tid in tids:
            order = self.orders.get(tid)
            if order is None or order.status != "WAIT_SELLER_SEND_GOODS":
                shipped = order is not None and self.shipped(tid)
                code = -50 if shipped else -81
                errors.append({"Tid": int(tid) if tid.isdigit() else 0, "ErrorCode": code})
                errors[-1]["AllowRetry"] = False
                continue
            order.status = "WAIT_BUYER_CONFIRM_GOODS"
        if errors:
            return self.answer({"ErrorInfos": errors}, 7, "全部失败")
        return self.answer(None)

    def _alds_trade_querytradecpsendlog(self, form: dict[str, str]) -> web.Response:
        order = self._order(form, "taobao")
        if order is None:
            return self.answer(None, 9, "交易不存在")
        sent = [
            {"CpcId": int(order.pool_id or 1), "Title": "卡", "Cards": [{"Card": c, "Pwd": p}]}
            for c, p in order.pool_cards
        ]
        if not sent and self.no_data_as_error:
            return self.answer(None, 11, "没有数据")
        return self.answer({"Orders": [{"Oid": int(order.oid), "SendCards": sent}]})

    def _alds_cardpwd_add(self, form: dict[str, str]) -> web.Response:
        lines = [line for line in form.get("data", "").split("\n") if line]
        if not lines or len(lines) > 1000:
            return self.answer(None, 5, "参数错误")
        cpc_id = form.get("cpcId", "")
        if cpc_id in self.closed_pools:
            return self.answer(None, 5, "参数错误: 卡种不存在", False)
        pool = self.pools.setdefault(cpc_id, [])
        known = {c for c, _ in pool} | {c for c, _ in self.sold.get(cpc_id, [])}
        added = failed = 0
        for line in lines:
            card, _, pwd = line.partition(",")
            if card in known:
                failed += 1
                continue
            pool.append((card, pwd))
            known.add(card)
            added += 1
        data = {"AddSuccessCount": added, "AddFailCount": failed}
        data |= {"ReplaceUnSoldSuccessCount": 0, "ReplaceSoldSuccessCount": 0}
        return self.answer(data | {"ReplaceFailCount": 0})

    def _alds_cardpwdcategory_getstorage(self, form: dict[str, str]) -> web.Response:
        ids = [i for i in form.get("idNos", "").split(",") if i]
        return self.answer([{"IdNo": int(i), "Qty": len(self.pools.get(i, []))} for i in ids])

    def _alds_cardpwd_stockback(self, form: dict[str, str]) -> web.Response:
        pool = self.pools.get(form.get("cpcId", ""), [])
        back = [entry for entry in pool if entry[0] == form.get("cardNo")]
        for entry in back:
            pool.remove(entry)
        return self.answer({"StockBackSuccCount": len(back)})

    # --- 闲鱼 (aldsIdle) --------------------------------------------------------------------------
    def _aldsidle_order_detail(self, form: dict[str, str]) -> web.Response:
        order = self._order(form, "xianyu")
        if order is None:
            return self.answer(None, 9, "交易不存在")
        data = {
            "biz_order_id": int(order.tid),
            "buy_amount": order.quantity,
            "item": {"item_id": int(order.item), "title": order.title, "outer_id_sku": ""},
            "order_status": int(order.status),
            "pay_time": int(order.modified * 1000),  # 时间戳,毫秒
            "payment": 1990,  # 实付金额, 单位分: 19.90 元
            "sku": 0,
        }
        return self.answer(data)

    def _aldsidle_order_dummysend(self, form: dict[str, str]) -> web.Response:
        order = self._order(form, "xianyu")
        if order is None:
            return self.answer(None, 9, "交易不存在")
        if order.status != "2":
            return self.answer(None, 24, "更新订单状态失败", False)
        order.status = "3"
        return self.answer(None)

    def _aldsidle_immsg_sendmsg(self, form: dict[str, str]) -> web.Response:
        order = self._order(form, "xianyu")
        if order is None:
            return self.answer(None, 9, "交易不存在")
        msg = form.get("msg", "")
        if not msg or len(msg) > IM_CHARS:
            return self.answer(None, 5, "参数错误")
        if len(order.im) >= IM_CAP:
            return self.answer(None, 25, "发送消息限制")
        order.im.append(msg)
        return self.answer(None)

    def _last_sent(self, order: FakeOrder, own: bool) -> web.Response:
        cards = order.pool_cards + (order.cards if own else [])
        if not cards:
            return self.answer(None, 11, "没有数据") if self.no_data_as_error else self.answer([])
        return self.answer([{"title": "卡", "cardPwdArr": [{"c": c, "p": p} for c, p in cards]}])

    def _aldsidle_cpd_getlastsentresult(self, form: dict[str, str]) -> web.Response:
        order = self._order(form, "xianyu")
        return (
            self.answer(None, 9, "交易不存在") if order is None else self._last_sent(order, False)
        )

    # --- 拼多多 (aldsPdd) -------------------------------------------------------------------------
    def _aldspdd_trade_detail(self, form: dict[str, str]) -> web.Response:
        order = self._order(form, "pdd")
        if order is None:
            return self.answer(None, 9, "交易不存在")
        item = {"sku_id": order.item, "goods_id": "2557644875", "goods_count": order.quantity}
        data = {
            "confirm_status": 2 if order.status == "cancel" else 1,
            "refund_status": order.refund_status,
            "item_list": [item | {"goods_name": order.title}],
            "pay_time": beijing(order.modified),
            "pay_amount": 0.1,  # 支付金额（元）
        }
        return self.answer(data)

    def _aldspdd_dummysend_cardpwdsend(self, form: dict[str, str]) -> web.Response:
        order = self._order(form, "pdd")
        if order is None:
            return self.answer(None, 9, "交易不存在")
        if order.cards or order.status != "1":
            return self.answer(None, 26, "拼多多API请求错误: 订单状态不可发货", False)
        order.cards.append((form.get("cardNo", ""), form.get("password", "")))
        order.card_sends += 1
        order.status = "shipped"
        return self.answer(None)

    def _aldspdd_cpd_getlastsentresult(self, form: dict[str, str]) -> web.Response:
        order = self._order(form, "pdd")
        return self.answer(None, 9, "交易不存在") if order is None else self._last_sent(order, True)

    # --- 京东 (aldsJd) ----------------------------------------------------------------------------
    def _aldsjd_order_detail(self, form: dict[str, str]) -> web.Response:
        order = self._order(form, "jd", "order_id")
        if order is None:
            return self.answer(None, 9, "交易不存在")
        state = {"P": "WAIT_SELLER_STOCK_OUT", "S": "WAIT_GOODS_RECEIVE_CONFIRM"}.get(
            order.status, "TRADE_CANCELED"
        )
        item = {"skuId": order.item, "itemTotal": str(order.quantity), "skuName": order.title}
        return self.answer({"orderId": order.tid, "orderState": state, "itemInfoList": [item]})

    def _aldsjd_gamecard_cardsend(self, form: dict[str, str]) -> web.Response:
        order = self._order(form, "jd")
        if order is None:
            return self.answer(None, 9, "交易不存在")
        try:
            cards = [(c["cardno"], c["cardpass"]) for c in json.loads(form["cardJson"])]
        except (KeyError, ValueError, TypeError):
            return self.answer(None, 5, "参数错误")
        if order.status != "P":
            return self.answer(None, 27, "京东API请求错误: 订单状态不正确", False)
        order.cards += cards
        order.card_sends += 1
        order.status = "S"
        return self.answer(None)

    # --- the open platform ----------------------------------------------------------------------
    def _open_bankroll_querydeposit(self, form: dict[str, str]) -> web.Response:
        return self.answer(round(self.deposit, 3))

    # --- pushes ---------------------------------------------------------------------------------
    def autosend_push(self, tid: str) -> tuple[dict[str, str], dict[str, str]]:
        """淘宝's "自动发货成功推送（含出库卡券信息）" (aopic 2048) of an order sent from a pool."""
        order = self.orders[tid]
        body = self._taobao_json(order)
        sent = [{"CpcId": int(order.pool_id or 1), "Title": "卡", "Cards": []}]
        sent[0]["Cards"] = [{"Card": c, "Pwd": p} for c, p in order.pool_cards]
        body["Orders"][0]["SendCards"] = sent
        text = json.dumps(body, ensure_ascii=False)
        ts = str(int(self.clock()))
        sign = md5_sign({"json": text, "timestamp": ts}, self.app_secret)
        query = {"timestamp": ts, "aopic": "2048", "sign": sign, "fromPlatform": "TbAlds"}
        return query, {"json": text}

    def push(
        self, tid: str, *, timestamp: float | None = None
    ) -> tuple[dict[str, str], dict[str, str]]:
        """The paid push of an order, as Agiso sends it: (query, form)."""
        order = self.orders[tid]
        body: dict[str, Any]
        if order.channel == "taobao":
            aopic, body = 2, self._taobao_json(order) | {"Status": "WAIT_SELLER_SEND_GOODS"}
        elif order.channel == "xianyu":
            aopic = 1
            body = {"biz_order_id": int(tid), "item_id": int(order.item), "order_status": 2}
            body["seller_id"] = 1556356040640
        elif order.channel == "pdd":
            aopic = 1
            item = {"goods_id": "2557644875", "sku_id": order.item, "goods_count": order.quantity}
            body = {"MallId": "110770592823138", "Tid": tid, "OrderSn": tid, "ItemList": [item]}
            body["PayAmount"] = 0.1
        else:
            aopic = 8
            body = {"OrderId": int(tid), "OrderType": 2, "BuyNum": order.quantity}
            body |= {"SkuId": int(order.item), "PlatformShopId": 242781471563}
            body["TotalPrice"] = 12.36
        text = json.dumps(body, ensure_ascii=False)
        ts = str(int(self.clock() if timestamp is None else timestamp))
        sign = md5_sign({"json": text, "timestamp": ts}, self.app_secret)
        query = {"timestamp": ts, "aopic": str(aopic), "sign": sign}
        query["fromPlatform"] = FROM_PLATFORM[order.channel]
        return query, {"json": text}
