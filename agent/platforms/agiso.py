"""Adapter for shops on 淘宝/天猫, 闲鱼, 拼多多 and 京东 through the Agiso (阿奇索) open platform
(`kind = "agiso"`, docs/platforms/agiso.md; the set-up in Chinese is there too).

One `[platforms.<name>]` table is one shop on one channel: `api_key` is the AppId, `secret`
names the secret holding the AppSecret (shared by the AppId's shops), `access_token` names the
secret holding the shop's AccessToken. Intake: paid orders come by Agiso push (the inbound
listener, agent/platforms/agiso_listener.py, commits them before it answers) and, for 淘宝, by
polling /Trade/TradesBuyerPay as a backstop; the other channels have no list call, so their
only intake is the push. Delivery per channel: agent/platforms/agiso_channels.py. Consignment
(`[platforms.<name>.pools]`): a SKU sold from an Agiso card pool the agent keeps topped up
(agent/consignment.py); its orders are Agiso's to deliver, the agent only records which keys
the pool sent.
"""

from __future__ import annotations

import ipaddress
import itertools
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlparse

from agent.config import PlatformSettings, Section
from agent.domain import (
    BadResponse,
    CardItem,
    OrderPage,
    Permanent,
    PlatformOrder,
    RejectedOrder,
    RemoteDelivery,
)
from agent.listener_routes import ListenerContext, Mount
from agent.logs import get_logger
from agent.platforms.agiso_cardpwd import (
    MAX_LINES,
    add_to_pool,
    pool_levels,
    pool_sent_cards,
    take_back,
)
from agent.platforms.agiso_channels import (
    CHANNEL_TYPES,
    MESSAGE_LIMITS,
    Channel,
    Delivery,
    Progress,
    TaobaoChannel,
)
from agent.platforms.agiso_client import (
    DEFAULT_CALLS_PER_SECOND,
    DEFAULT_PROBE_INTERVAL,
    MAX_CALLS_PER_SECOND,
    AgisoClient,
    AgisoRefused,
)
from agent.platforms.agiso_messages import (
    DEFAULT_TEMPLATE,
    Limits,
    TemplateError,
    TooLong,
    check_template,
    render,
    split,
)
from agent.platforms.agiso_push import (
    Push,
    PushDedupe,
    PushEvent,
    PushRejected,
    read_push,
    verify_push,
)
from agent.platforms.agiso_wire import (
    CANCELLED,
    CHANNEL_NAMES,
    CHANNELS,
    PAID,
    REFUNDED,
    WireError,
    last_sent_cards,
    orders_of,
    our_lines,
    same_cards,
    taobao_trade,
    text_id,
)
from agent.pool_domain import PoolAddAnswer, PoolBounds, pool_card_number
from agent.secrets import resolve_secret
from agent.settings import default_delivery_messages
from agent.signed_http import DEFAULT_CONNECTIONS

log = get_logger("kami.agiso")

MAX_PAGE_SIZE = 100  # /Trade/TradesBuyerPay: "每页条数 ... 最大值:100"
DEFAULT_LOOKBACK_HOURS = 72
BEIJING = timedelta(hours=8)  # Agiso's times are China Standard Time
MAX_PROGRESS = 10_000  # orders whose delivery this process remembers
MAX_INBOX = 100_000
# Consignment: seconds between the pool keeper's rounds, and how long an order of a consigned
# SKU may wait for Agiso's pool to send its keys before it is parked for a human.
DEFAULT_POOL_INTERVAL = 30.0
DEFAULT_POOL_SALE_WAIT = 3600.0
MAX_POOL_KEYS = 100_000
# alds/push.md "自动发货成功推送（含出库卡券信息）": Agiso sent an order from its pools.
AUTOSEND_SUCCESS = 2048
# Channels whose pool sends can be read back per order: 淘宝 /Trade/QueryTradeCPSendLog,
# 闲鱼 and 拼多多 /Cpd/GetLastSentResult. 京东 documents none.
POOL_CHANNELS = ("taobao", "xianyu", "pdd")
# Our default delivery message, in any language: Agiso's own template is used in its place.
DEFAULT_MESSAGES = default_delivery_messages()


@dataclass(frozen=True, slots=True)
class AgisoOptions:
    """`[platforms.<name>]` keys only Agiso has."""

    channel: str
    access_token_secret: str
    products: Mapping[str, str]  # the marketplace's item / SKU / outer id -> our SKU
    templates: Mapping[str, str] = field(default_factory=dict)  # our SKU -> message template
    names: Mapping[str, str] = field(default_factory=dict)  # our SKU -> {商品} in messages
    message_cap: int = 0  # messages an order may receive from us (0: the channel's cap)
    calls_per_second: int = DEFAULT_CALLS_PER_SECOND
    probe_interval: float = DEFAULT_PROBE_INTERVAL
    lookback_hours: int = DEFAULT_LOOKBACK_HOURS
    # Consignment: our SKU -> the Agiso pool it is sold from, and the level kept there.
    pools: Mapping[str, PoolBounds] = field(default_factory=dict)
    pool_interval: float = DEFAULT_POOL_INTERVAL
    pool_sale_wait: float = DEFAULT_POOL_SALE_WAIT
    push_path: str = ""  # the listener's path for this shop's pushes ("": /agiso/<name>)

    def secret_names(self) -> list[str]:
        """Secrets named besides the platform's `secret` (`kami-agent check` asks for them)."""
        return [self.access_token_secret]

    def limits(self) -> Limits | None:
        limits = MESSAGE_LIMITS.get(self.channel)
        if limits is None:
            return None
        return Limits(limits.chars, self.message_cap or limits.count)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pool_bounds(section: Section, where: str, entry: Any) -> PoolBounds:
    _ = section._
    if not isinstance(entry, dict):
        raise section.error(
            where, _('must be a table: { cpc_id = "<卡种ID>", low = 20, high = 100 }')
        )
    unknown = sorted(set(entry) - {"cpc_id", "low", "high"})
    if unknown:
        raise section.error(f"{where}.{unknown[0]}", _("is not a pool setting (cpc_id, low, high)"))
    cpc = entry.get("cpc_id")
    cpc_id = text_id(cpc) if isinstance(cpc, str | int) and not isinstance(cpc, bool) else None
    if cpc_id is None or not cpc_id.isdigit():
        raise section.error(
            f"{where}.cpc_id",
            _("must be the pool's 卡种ID (digits), got %(value)r") % {"value": cpc},
        )
    bounds = []
    for name in ("low", "high"):
        value = entry.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise section.error(
                f"{where}.{name}", _("must be a whole number, got %(value)r") % {"value": value}
            )
        if not 0 <= value <= MAX_POOL_KEYS:
            raise section.error(
                f"{where}.{name}",
                _("must be between 0 and %(max)d, got %(value)d")
                % {"max": MAX_POOL_KEYS, "value": value},
            )
        bounds.append(value)
    low, high = bounds
    if low > high:
        raise section.error(
            where,
            _("low (%(low)d) must not be above high (%(high)d)") % {"low": low, "high": high},
        )
    return PoolBounds(cpc_id, low, high)


def _parse_pools(section: Section, channel: str, skus: set[str]) -> dict[str, PoolBounds]:
    """[platforms.<name>.pools]: "<SKU>" = { cpc_id = "<卡种ID>", low = N, high = M }."""
    _ = section._
    pools: dict[str, PoolBounds] = {}
    for sku, entry in section.table("pools").items():
        where = f"pools.{sku}"
        if channel not in POOL_CHANNELS:
            raise section.error(
                where,
                _(
                    "%(channel)s: Agiso offers no way to read back what a pool sent per order"
                    " there, so its pools cannot be kept from the ledger"
                )
                % {"channel": CHANNEL_NAMES[channel]},
            )
        if sku not in skus:
            raise section.error(
                where, _("%(sku)r is not a SKU of this shop's products") % {"sku": sku}
            )
        bounds = _pool_bounds(section, where, entry)
        if any(p.cpc_id == bounds.cpc_id for p in pools.values()):
            raise section.error(
                f"{where}.cpc_id",
                _("pool %(cpc_id)s is named for another SKU") % {"cpc_id": bounds.cpc_id},
            )
        pools[sku] = bounds
    return pools


def parse_options(section: Section) -> AgisoOptions:
    """channel ("taobao" | "xianyu" | "pdd" | "jd"), access_token (a secret's name), products
    (required), templates and names (per SKU), message_cap, calls_per_second, probe_interval,
    lookback_hours; pools (per SKU: cpc_id, low, high), pool_interval, pool_sale_wait;
    push_path (the listener's path for the shop's pushes, default /agiso/<name>)."""
    _ = section._
    base_url = section.data.get("base_url")
    if isinstance(base_url, str):
        parsed = urlparse(base_url)
        if parsed.scheme != "https" and not _loopback(parsed.hostname or ""):
            raise section.error(
                "base_url",
                _("must be https:// (the AccessToken travels in it), got %(value)r")
                % {"value": base_url},
            )
    channel = section.string("channel", required=True)
    if channel not in CHANNELS:
        raise section.error(
            "channel",
            _("must be one of %(choices)s, got %(value)r")
            % {"choices": ", ".join(CHANNELS), "value": channel},
        )
    products = section.table("products")
    if not products:
        raise section.error(
            "products",
            _(
                "is required: map the marketplace's item or SKU ids to SKUs,"
                ' products = { "<id>" = "<SKU>" }'
            ),
        )
    for key, sku in products.items():
        if text_id(key) != key:
            raise section.error(f"products.{key}", _("is not an item, SKU or outer id"))
        if not isinstance(sku, str) or not sku.strip() or len(sku) > 128:
            raise section.error(
                f"products.{key}", _("must name a SKU, got %(value)r") % {"value": sku}
            )
    templates = section.table("templates")
    for sku, text in templates.items():
        if not isinstance(text, str) or not text.strip():
            raise section.error(f"templates.{sku}", _("must be a non-empty string"))
        try:
            check_template(text)
        except TemplateError as exc:
            raise section.error(f"templates.{sku}", exc.say(_)) from None
    names = section.table("names")
    for sku, text in names.items():
        if not isinstance(text, str) or not text.strip():
            raise section.error(f"names.{sku}", _("must be a non-empty string"))
    limits = MESSAGE_LIMITS.get(channel)
    cap = section.integer("message_cap", 0, minimum=0, maximum=limits.count if limits else 0)
    pools = _parse_pools(section, channel, set(products.values()))
    push_path = section.string("push_path", "/").rstrip("/")
    if push_path and (not push_path.startswith("/") or "?" in push_path or "{" in push_path):
        raise section.error(
            "push_path", _("must be a path starting with /, got %(value)r") % {"value": push_path}
        )
    return AgisoOptions(
        channel=channel,
        access_token_secret=section.secret_name("access_token"),
        products=dict(products),
        templates=dict(templates),
        names=dict(names),
        message_cap=cap,
        calls_per_second=section.integer(
            "calls_per_second", DEFAULT_CALLS_PER_SECOND, minimum=1, maximum=MAX_CALLS_PER_SECOND
        ),
        probe_interval=section.number(
            "probe_interval", DEFAULT_PROBE_INTERVAL, minimum=1, maximum=3600
        ),
        lookback_hours=section.integer(
            "lookback_hours", DEFAULT_LOOKBACK_HOURS, minimum=1, maximum=24 * 30
        ),
        pools=pools,
        pool_interval=section.number(
            "pool_interval", DEFAULT_POOL_INTERVAL, minimum=1, maximum=3600, unit="s"
        ),
        pool_sale_wait=section.number(
            "pool_sale_wait", DEFAULT_POOL_SALE_WAIT, minimum=60, maximum=7 * 86400, unit="s"
        ),
        push_path=push_path,
    )


def build(settings: PlatformSettings, secret: str, max_connections: int) -> AgisoPlatform:
    """An adapter for one Agiso shop; `secret` is the AppSecret, the AccessToken is read from
    the secret the options name."""
    options = settings.options
    if not isinstance(options, AgisoOptions):
        raise TypeError("an agiso platform needs AgisoOptions (agent.config reads them)")
    token = resolve_secret(options.access_token_secret)
    return AgisoPlatform(settings, secret, token, max_connections)


def _cursor(cursor: str | None, epoch: str) -> tuple[int, int]:
    """(page of the 淘宝 listing, last push entry listed) from "page:N;push:EPOCH:SEQ"; a push
    position of another process counts from 0 (its inbox died with it)."""
    page, seq = 0, 0
    for part in (cursor or "").split(";"):
        kind, _, value = part.partition(":")
        if kind == "page" and value.isdigit() and len(value) < 7:
            page = int(value)
        elif kind == "push":
            owner, _, number = value.partition(":")
            if owner == epoch and number.isdigit() and len(number) < 12:
                seq = int(number)
    return page, seq


class AgisoPlatform:
    # Delivery hands this adapter the message template as it is: it renders it per channel.
    renders_messages = True

    def __init__(
        self,
        settings: PlatformSettings,
        app_secret: str,
        access_token: str,
        max_connections: int = DEFAULT_CONNECTIONS,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock`: wall time for request timestamps, holds and pushes (tests move it)."""
        options = settings.options
        if not isinstance(options, AgisoOptions):
            raise TypeError("an agiso platform needs AgisoOptions (agent.config reads them)")
        self.name = settings.name
        self.options = options
        self._secret = app_secret
        self._clock = clock
        self.client = AgisoClient(
            settings.base_url,
            settings.api_key,
            app_secret,
            access_token,
            timeout=settings.timeout,
            max_connections=max_connections,
            calls_per_second=options.calls_per_second,
            probe_interval=options.probe_interval,
            shop=settings.name,
            clock=clock,
        )
        self.channel: Channel = CHANNEL_TYPES[options.channel](self.client)
        self._page_size = min(settings.page_size, MAX_PAGE_SIZE)
        self._progress: OrderedDict[str, Progress] = OrderedDict()
        # Orders pushed, waiting to be listed: (sequence number, order), oldest first.
        self._inbox: list[tuple[int, PlatformOrder | RejectedOrder]] = []
        self._seq = itertools.count(1)
        self._epoch = secrets.token_hex(4)
        self._dedupe = PushDedupe()

    def __repr__(self) -> str:
        return f"AgisoPlatform({self.name}, {self.options.channel})"

    # --- intake ------------------------------------------------------------------------------
    async def list_paid(self, cursor: str | None) -> OrderPage:
        """Orders pushed since `cursor` and, on 淘宝, one page of the paid unshipped trades
        (/Trade/TradesBuyerPay, modified in the last `lookback_hours`); every listing walks the
        pages from the first (the set is small: each trade leaves it once shipped) and the
        engine drops what it already has. On a held shop this raises the refusal (the engine
        alerts) and makes at most one probing call."""
        page, seq = _cursor(cursor, self._epoch)
        self._inbox = [(n, order) for n, order in self._inbox if n > seq]
        orders: list[PlatformOrder | RejectedOrder] = [order for _, order in self._inbox]
        last = self._inbox[-1][0] if self._inbox else seq
        more = False
        if isinstance(self.channel, TaobaoChannel):
            listed, more = await self._list_taobao(page)
            pushed = {order.order_id for order in orders}
            orders += [order for order in listed if order.order_id not in pushed]
            page = page + 1 if more else 0
        else:
            await self._probe_if_held()
        return OrderPage(orders, f"page:{page};push:{self._epoch}:{last}", more)

    async def _list_taobao(self, page: int) -> tuple[list[PlatformOrder | RejectedOrder], bool]:
        since = datetime.fromtimestamp(self._clock(), UTC) + BEIJING
        since -= timedelta(hours=self.options.lookback_hours)
        params: dict[str, str | int] = {
            "modifyTimeStart": since.strftime("%Y-%m-%d %H:%M:%S"),
            "pageNo": page + 1,
            "pageSize": self._page_size,
        }
        envelope = await self.client.read("alds", "/Trade/TradesBuyerPay", params, empty_ok=True)
        data = envelope.data
        if data is None:  # also 没有数据 (11): no trade waiting
            data = []
        if isinstance(data, dict) and "Tid" in data:
            # The documented example of TradesBuyerPay shows Data as one trade object (the
            # TradeInfo sample); a public client reads a list. Both are taken.
            data = [data]
        if not isinstance(data, list):
            raise BadResponse("淘宝 /Trade/TradesBuyerPay answered no list of trades")
        orders: list[PlatformOrder | RejectedOrder] = []
        for entry in data:
            try:
                trade = taobao_trade(entry)
            except WireError:
                continue
            if trade.status == PAID:
                orders += orders_of(trade, self.options.products)
        return orders, len(data) >= self._page_size

    async def _probe_if_held(self) -> None:
        """Channels without a list call still make the engine see a refusal (and alert), and
        probe it now and then: the deposit for a deposit that ran out, else the shop's token
        with a read of an order that does not exist."""
        if self.client.app_held():
            await self.client.deposit()
        if self.client.holds.shop is not None:
            await self.channel.remote("0", None)

    async def wait_for_orders(self, cursor: str | None, wait_seconds: float) -> OrderPage:
        """Agiso pushes instead: no long poll."""
        raise Permanent("Agiso offers no long poll (orders come by push); set long_poll = false")

    async def accept_push(self, query: Mapping[str, str], form: Mapping[str, str]) -> PushEvent:
        """For the inbound listener: checks the push's signature before reading it, drops a
        repeat (same order and status), and queues a paid order for the next listing, reading
        the order first when the push does not say what was bought. Raises PushRejected."""
        push = verify_push(
            self._secret, query, form, now=self._clock(), channel=self.options.channel
        )
        event = read_push(push)
        if self._sold_from_pool(push, event):
            return event
        if not event.paid or not self._dedupe.first(event):
            return event
        trade = event.trade or await self.channel.trade(event.tid)
        one_each = self.channel.one_card_each
        for order in orders_of(trade, self.options.products, one_card_each=one_each):
            self._inbox.append((next(self._seq), order))
        del self._inbox[:-MAX_INBOX]
        log.info("agiso_push_taken", platform=self.name, tid=event.tid)
        return event

    async def read_pushed(
        self, query: Mapping[str, str], form: Mapping[str, str]
    ) -> tuple[PushEvent, list[PlatformOrder | RejectedOrder]]:
        """For the listener, which takes the orders into the ledger before it answers: the
        push (its signature and timestamp checked before its json is parsed) and, for a paid
        push, its orders (the order read first when the push does not say what was bought).
        No in-memory dedupe: the ledger's unique order line makes a repeat a no-op. The pool's
        "自动发货成功" push goes where accept_push sends it and yields no orders here.
        Raises PushRejected, or the read's error (the listener answers a failure: retried)."""
        push = verify_push(
            self._secret, query, form, now=self._clock(), channel=self.options.channel
        )
        event = read_push(push)
        if self._sold_from_pool(push, event) or not event.paid:
            return event, []
        trade = event.trade or await self.channel.trade(event.tid)
        one_each = self.channel.one_card_each
        return event, orders_of(trade, self.options.products, one_card_each=one_each)

    def _sold_from_pool(self, push: Push, event: PushEvent) -> bool:
        """淘宝's "自动发货成功" push (aopic 2048, with the cards sent): Agiso delivered the order
        from its pools, perhaps before any listing saw it paid. An order of a consigned SKU is
        queued for the engine, which records which keys the pool sent (the push only tells
        it to look: the send log is read). True when the push was of that kind."""
        if push.aopic != AUTOSEND_SUCCESS or self.options.channel != "taobao":
            return False
        if not self.options.pools or not self._dedupe.first(event):
            return True
        try:
            trade = taobao_trade({**push.body, "Status": "WAIT_SELLER_SEND_GOODS"})
        except WireError as exc:
            raise PushRejected(str(exc)) from None
        for order in orders_of(trade, self.options.products):
            if order.sku in self.options.pools:
                self._inbox.append((next(self._seq), order))
        del self._inbox[:-MAX_INBOX]
        log.info("agiso_pool_sale_pushed", platform=self.name, tid=event.tid)
        return True

    # --- consignment (agent/consignment.py) ---------------------------------------------------
    def pool_bounds(self) -> Mapping[str, PoolBounds]:
        """Our SKU -> the Agiso pool (卡种) it is sold from, with the level kept there."""
        return self.options.pools

    @property
    def pool_interval(self) -> float:
        """Seconds between the pool keeper's rounds."""
        return self.options.pool_interval

    @property
    def pool_sale_wait(self) -> float:
        """How long an order may wait for the pool to send its keys before it is parked."""
        return self.options.pool_sale_wait

    @property
    def pool_batch(self) -> int:
        """Keys one add carries at most ("最多1000行卡券")."""
        return MAX_LINES

    async def pool_levels(self, cpc_ids: Sequence[str]) -> dict[str, int]:
        """The keys left in each pool, by Agiso (/CardPwdCategory/GetStorage: "库存量大概值",
        an approximate count)."""
        return await pool_levels(self.client, cpc_ids)

    async def add_to_pool(
        self, cpc_id: str, items: Sequence[CardItem], reference: str
    ) -> PoolAddAnswer:
        """/CardPwd/Add without replacing (allowReplace 0), the add's reference as its
        summary. Ambiguous when the answer is lost; Permanent when refused for good."""
        result = await add_to_pool(self.client, cpc_id, items, summary=reference)
        return PoolAddAnswer(result.added, result.failed)

    async def take_back(self, cpc_id: str, item: CardItem) -> int:
        """/CardPwd/StockBack of one key, by its card number; 1 when the pool gave it back,
        0 when it does not hold it unsold (sold, or never added)."""
        return await take_back(self.client, cpc_id, pool_card_number(item))

    async def pool_sale(self, order_id: str, sku: str) -> RemoteDelivery:
        """What Agiso's pool sent for an order of consigned `sku`: "delivered" with the keys
        of its send log; "paid" while none shows yet (Agiso may still be sending: "等待5分钟
        后再尝试"); "cancelled"/"refunded" once closed."""
        bounds = self.options.pools.get(sku)
        if bounds is None:
            raise Permanent(f"{sku} is not consigned to a pool on {self.name}")
        trade = await self.channel.trade(order_id)
        if trade.status in (REFUNDED, CANCELLED):
            return RemoteDelivery(trade.status)
        cards: Sequence[CardItem]
        if isinstance(self.channel, TaobaoChannel):
            cards = await pool_sent_cards(self.client, order_id, [bounds.cpc_id])
        else:
            envelope = await self.client.read(
                self.channel.service,
                "/Cpd/GetLastSentResult",
                {"tid": order_id, "aldsType": 1},
                empty_ok=True,
            )
            cards = last_sent_cards(envelope.data)
        if cards:
            return RemoteDelivery("delivered", tuple(cards))
        return RemoteDelivery("paid")

    # --- reconcile ---------------------------------------------------------------------------
    async def get_order(self, order_id: str) -> RemoteDelivery:
        """ "paid" while the order waits; "delivered" with the keys when this process saw its
        delivery through, or when a sent log shows cards (the engine compares them with its
        own); "cancelled"/"refunded" once closed. A shipped order whose keys cannot be read
        back raises Permanent with the reason (parked for a human)."""
        return await self.channel.remote(order_id, self._progress.get(order_id))

    # --- delivery ----------------------------------------------------------------------------
    def _template(self, sku: str, message: str) -> str:
        template = self.options.templates.get(sku)
        if template is not None:
            return template
        if message and message not in DEFAULT_MESSAGES:
            # The SKU's own message from [skus]: a template too (checked when the config was
            # read), rendered here within the channel's limits (renders_messages).
            return message
        return DEFAULT_TEMPLATE

    def _progress_of(self, order_id: str, items: Sequence[CardItem]) -> Progress:
        progress = self._progress.get(order_id)
        if progress is None or not same_cards(progress.items, items):
            progress = Progress(tuple(items))
            self._progress[order_id] = progress
        self._progress.move_to_end(order_id)
        while len(self._progress) > MAX_PROGRESS:
            self._progress.popitem(last=False)
        return progress

    async def deliver(
        self, order_id: str, idempotency_key: str, items: Sequence[CardItem], message: str
    ) -> None:
        """Reads the order, renders the SKU's message (Chinese by default) within the channel's
        limits (Permanent, before anything is sent, when it cannot fit), then delivers on the
        channel (agent/platforms/agiso_channels.py)."""
        trade = await self.channel.trade(order_id)
        ours = our_lines(trade, self.options.products)
        if len(ours) != 1:
            raise Permanent(f"order {order_id} holds {len(ours)} items of ours, expected one")
        sku, line = ours[0]
        progress = self._progress_of(order_id, items)
        title = self.options.names.get(sku) or line.title or sku
        parts: tuple[str, ...] = ()
        limits = self.options.limits()
        if limits is not None:
            text = render(self._template(sku, message), order_id, title, len(items), items)
            try:
                parts = tuple(split(text, limits, CHANNEL_NAMES[self.options.channel]))
            except TooLong as exc:
                raise Permanent(str(exc)) from None
        progress.parts = len(parts)
        try:
            await self.channel.deliver(trade, line, Delivery(tuple(items), title, parts, progress))
        except AgisoRefused as exc:
            log.error("agiso_delivery_waits", platform=self.name, order_id=order_id, error=str(exc))
            raise
        log.info(
            "agiso_delivered",
            platform=self.name,
            channel=self.options.channel,
            order_id=order_id,
            messages=progress.sent,
            message_unconfirmed=progress.unknown is not None,
        )

    async def notice(self, order_id: str, message: str, idempotency_key: str | None = None) -> None:
        """Not sent: every message counts against the order's cap (淘宝 3, 闲鱼 5), which the
        keys need; 拼多多 and 京东 have no message call here. (The buyer care passes the
        notice's idempotency key: without the parameter, its call raised TypeError.)"""
        log.info("agiso_notice_not_sent", platform=self.name, order_id=order_id)

    async def refund(self, order_id: str, idempotency_key: str, reason: str) -> None:
        """Refunds are the merchant's, in the marketplace's own back office."""
        raise Permanent("refunds through Agiso are not automated; refund in the shop's back office")

    async def ping(self) -> None:
        """The deposit (AppId and AppSecret) and, on 淘宝, one page of paid orders (the token)."""
        await self.client.deposit()
        if isinstance(self.channel, TaobaoChannel):
            await self._list_taobao(0)

    async def close(self) -> None:
        await self.client.close()


def listener_routes(platform: AgisoPlatform, context: ListenerContext) -> Mount:
    """POST <push_path> (default /agiso/<name>): the shop's Agiso pushes, each paid order
    committed to the ledger before the answer (agent/platforms/agiso_listener.py)."""
    from agent.platforms.agiso_listener import push_routes

    return push_routes(platform, context)
