"""Turns the state of the shop into alerts, and drains the alert outbox to the channels.

Alerts fire once per crossing: a condition opens an alert (and queues one message per
channel in the same transaction), an alert still open after `escalate_after` is sent again
(at most `max_escalations` times), and an alert whose condition clears is resolved with a
recovery message. Low stock clears only with headroom (hysteresis), so an alert re-arms after
a restock instead of flapping around its threshold.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from decimal import Decimal

from agent.config import LOCAL_SOURCE, Config
from agent.domain import (
    AlertCondition,
    AlertMessage,
    AuthFailed,
    CallsUnpaid,
    LineState,
    OrderLine,
    Permanent,
    Transient,
    retry_delay,
)
from agent.forecast import SkuForecast, ewma_rate, time_to_empty
from agent.i18n import ENGLISH, Translator, duration
from agent.logs import get_logger
from agent.notify.base import Notifier
from agent.store.base import Store
from agent.suppliers.base import Balance

log = get_logger("kami.alerts")

# Sales come in bursts and the rate is an estimate: warn a little earlier than the lead time.
ALERT_MARGIN = 1.2
CLEAR_HEADROOM = 1.5  # a low-stock alert clears at 1.5x its thresholds
FORECAST_HORIZON_HALF_LIVES = 8  # older sales weigh < 0.4 %; not worth reading
MAX_OUTBOX_ATTEMPTS = 50
MAX_ACTIVE_LINES = 100_000  # undelivered lines read per check; far beyond any real backlog
# A line whose platform sets a deadline (Kinguin cancels a reservation 15 minutes after it
# needs stock) alerts this long before it: still time for a human to bring stock.
DEADLINE_WARNING = 300.0
ORDERS_NAMED = 5  # order ids an alert about many orders names; the rest is "…"


def _some(ids: Sequence[str]) -> str:
    return ", ".join(ids[:ORDERS_NAMED]) + (" …" if len(ids) > ORDERS_NAMED else "")


class Forecaster:
    def __init__(self, config: Config, store: Store, clock: Callable[[], float]) -> None:
        self.config = config
        self.store = store
        self.clock = clock

    async def forecast(
        self, balances: Mapping[str, Balance], active: Sequence[OrderLine] | None = None
    ) -> list[SkuForecast]:
        """`active`: the undelivered lines, when the caller has already read them."""
        now = self.clock()
        half_life = self.config.alerts.half_life
        demand = await self.store.demand_since(now - FORECAST_HORIZON_HALF_LIVES * half_life)
        sales: dict[str, list[tuple[float, int]]] = {}
        for sku, at, quantity in demand:
            sales.setdefault(sku, []).append((at, quantity))
        free = await self.store.free_counts()
        consigned = await self.store.consigned_counts()
        if active is None:
            active = await self.store.active_lines(MAX_ACTIVE_LINES)
        pending = Counter(line.sku for line in active)
        result = []
        for sku in sorted(set(self.config.skus) | set(free) | set(consigned)):
            rate = ewma_rate(sales.get(sku, []), now, half_life)
            bought = self._supplier_keys(sku, balances)
            local = free.get(sku, 0)
            pooled = consigned.get(sku, 0)  # sold by the platforms' pools meanwhile
            result.append(
                SkuForecast(
                    sku=sku,
                    free=local,
                    supplier_keys=bought,
                    rate_per_hour=rate * 3600,
                    time_to_empty=time_to_empty(local + pooled + bought, rate),
                    pending=pending.get(sku, 0),
                    consigned=pooled,
                )
            )
        return result

    def _supplier_keys(self, sku: str, balances: Mapping[str, Balance]) -> int:
        """Keys the suppliers' balances can still buy; 0 where that is unknown (be cautious)."""
        settings = self.config.skus.get(sku)
        if settings is None or settings.max_price is None:
            return 0
        total = 0
        for source in settings.sources:
            balance = balances.get(source)
            if source != LOCAL_SOURCE and balance is not None:
                total += int(balance.amount // settings.max_price)
        return total


def low_stock_conditions(
    config: Config, forecasts: Sequence[SkuForecast], open_keys: set[str]
) -> list[AlertCondition]:
    _ = Translator(config.agent.language)
    conditions = []
    for f in forecasts:
        sku = config.skus.get(f.sku)
        if sku is None:
            continue
        key = f"low_stock:{f.sku}"
        headroom = CLEAR_HEADROOM if key in open_keys else 1.0
        horizon = sku.lead_time * ALERT_MARGIN * headroom
        short_time = f.time_to_empty is not None and f.time_to_empty < horizon
        stocked = f.free + f.consigned  # keys in platform pools are stock still selling
        short_count = LOCAL_SOURCE in sku.sources and stocked < math.ceil(sku.min_stock * headroom)
        if not (short_time or short_count):
            continue
        summary = _(
            "%(sku)s stock runs out in %(time)s at %(rate).1f/h (lead time %(lead)s):"
            " %(free)d local keys, %(upstream)d affordable upstream, %(waiting)d orders waiting"
        ) % {
            "sku": f.sku,
            "time": duration(_, f.time_to_empty),
            "rate": f.rate_per_hour,
            "lead": duration(_, sku.lead_time),
            "free": f.free,
            "upstream": f.supplier_keys,
            "waiting": f.pending,
        }
        severity = "critical" if stocked == 0 and f.supplier_keys == 0 else "warning"
        conditions.append(AlertCondition(key, "low_stock", severity, summary))
    return conditions


def deadline_of(line: OrderLine) -> float | None:
    """The line's platform deadline as POSIX time; None when the platform sets none."""
    if not line.deliver_by:
        return None
    try:
        moment = datetime.fromisoformat(line.deliver_by.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


def deadlines_near(active: Sequence[OrderLine], now: float) -> list[tuple[float, OrderLine]]:
    """(seconds left, negative when missed, line) for the active lines within
    DEADLINE_WARNING of their platform deadline, the most urgent first."""
    near = []
    for line in active:
        due = deadline_of(line)
        if due is not None and due - now < DEADLINE_WARNING:
            near.append((due - now, line))
    near.sort(key=lambda pair: pair[0])
    return near


def deadline_conditions(
    active: Sequence[OrderLine], now: float, language: str = ENGLISH
) -> list[AlertCondition]:
    _ = Translator(language)
    near = deadlines_near(active, now)
    if not near:
        return []
    shown = [
        _("%(order)s (missed)") % {"order": line.order_id}
        if left < 0
        else _("%(order)s (in %(time)s)") % {"order": line.order_id, "time": duration(_, left)}
        for left, line in near
    ]
    return [
        AlertCondition(
            "deadline_near",
            "deadline_near",
            "critical",
            _(
                "%(n)d orders about to miss the platform's delivery deadline (the platform"
                " cancels them then): %(orders)s"
            )
            % {"n": len(near), "orders": _some(shown)},
        )
    ]


class AlertEvaluator:
    def __init__(
        self,
        config: Config,
        store: Store,
        clock: Callable[[], float],
        balances: Mapping[str, Balance],
        auth_failures: Mapping[str, AuthFailed],
        unreachable_since: Mapping[str, float] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.forecaster = Forecaster(config, store, clock)
        self.balances = balances
        self.auth_failures = auth_failures
        self.unreachable_since = unreachable_since if unreachable_since is not None else {}
        self._ = Translator(config.agent.language)

    async def conditions(self) -> list[AlertCondition]:
        _ = self._
        now = self.clock()
        open_keys = {a.key for a in await self.store.open_alerts()}
        active = await self.store.active_lines(MAX_ACTIVE_LINES)
        forecasts = await self.forecaster.forecast(self.balances, active)
        found = low_stock_conditions(self.config, forecasts, open_keys)
        for supplier in self.config.suppliers:
            balance = self.balances.get(supplier.name)
            if balance is not None and supplier.balance_low is not None:
                low = supplier.balance_low * (
                    Decimal(CLEAR_HEADROOM) if f"balance:{supplier.name}" in open_keys else 1
                )
                if balance.amount < low:
                    found.append(
                        AlertCondition(
                            f"balance:{supplier.name}",
                            "supplier_balance",
                            "warning",
                            _("supplier %(name)s balance %(amount)s %(currency)s is below %(low)s")
                            % {
                                "name": supplier.name,
                                "amount": balance.amount,
                                "currency": balance.currency,
                                "low": supplier.balance_low,
                            },
                        )
                    )
        for platform, refusal in sorted(self.auth_failures.items()):
            found.append(self._refusal(platform, refusal))
        found += self._unreachable(now)
        stuck = []
        for line in active:
            sku = self.config.skus.get(line.sku)
            promise = sku.promise if sku else 600.0
            if now - line.seen_at > promise:
                stuck.append(line.order_id)
        if stuck:
            found.append(
                AlertCondition(
                    "stuck_orders",
                    "stuck_orders",
                    "critical",
                    _("%(n)d orders undelivered past their promised time: %(orders)s")
                    % {"n": len(stuck), "orders": _some(stuck)},
                )
            )
        found += deadline_conditions(active, now, self.config.agent.language)
        attention = (await self.store.count_by_state()).get(LineState.NEEDS_ATTENTION, 0)
        if attention:
            found.append(
                AlertCondition(
                    "needs_attention",
                    "needs_attention",
                    "warning",
                    _(
                        "%(n)d orders need attention (kami-agent orders list --state"
                        " needs_attention)"
                    )
                    % {"n": attention},
                )
            )
        return found

    def _unreachable(self, now: float) -> list[AlertCondition]:
        """Platform accounts none of whose polls answered for `alerts.unreachable_after`:
        one alert per outage, resolved by the first poll that answers."""
        _ = self._
        found = []
        for platform, since in sorted(self.unreachable_since.items()):
            if now - since < self.config.alerts.unreachable_after:
                continue
            found.append(
                AlertCondition(
                    f"unreachable:{platform}",
                    "platform_unreachable",
                    "critical",
                    _(
                        "platform %(name)s has not answered for %(time)s (connection refused,"
                        " timeouts or server errors): orders are not being taken in"
                    )
                    % {"name": platform, "time": duration(_, now - since)},
                )
            )
        return found

    def _refusal(self, platform: str, refusal: AuthFailed) -> AlertCondition:
        """A platform that stopped our calls: for want of payment (a prepaid balance for API
        calls ran out: top it up) or because it refuses our credentials (renew them)."""
        _ = self._
        if isinstance(refusal, CallsUnpaid):
            return AlertCondition(
                f"auth:{platform}",
                "platform_unpaid",
                "critical",
                _(
                    "platform %(name)s stopped our calls: the prepaid balance for them ran out"
                    " (%(said)s). Top it up; orders are not being taken in until then, none is lost"
                )
                % {"name": platform, "said": str(refusal)},
            )
        return AlertCondition(
            f"auth:{platform}",
            "platform_auth",
            "critical",
            _("platform %(name)s refuses our credentials: orders are not being taken in")
            % {"name": platform},
        )

    async def run(self) -> list[AlertMessage]:
        conditions = await self.conditions()
        messages = await self.store.apply_alerts(
            conditions,
            [channel.name for channel in self.config.notify],
            self.clock(),
            self.config.alerts.escalate_after,
            self.config.alerts.max_escalations,
        )
        for message in messages:
            log.warning(
                "alert",
                key=message.key,
                alert_event=message.event,
                severity=message.severity,
                summary=message.summary,
            )
        return messages


class OutboxDrainer:
    def __init__(
        self,
        store: Store,
        notifiers: Mapping[str, Notifier],
        clock: Callable[[], float],
        language: str = ENGLISH,
    ) -> None:
        self.store = store
        self.notifiers = notifiers
        self.clock = clock
        self.language = language  # the merchant's: the words around each alert's summary

    async def drain(self) -> int:
        sent = 0
        for item in await self.store.due_outbox(self.clock(), 100):
            notifier = self.notifiers.get(item.channel)
            now = self.clock()
            if notifier is None:
                await self.store.outbox_done(item.id, now, error="channel no longer configured")
                continue
            try:
                message = AlertMessage.from_json(item.payload)
                await notifier.send(replace(message, language=self.language))
            except Transient as exc:
                if item.attempts + 1 >= MAX_OUTBOX_ATTEMPTS:
                    await self.store.outbox_done(item.id, now, error=str(exc))
                else:
                    await self.store.outbox_done(
                        item.id,
                        now,
                        error=str(exc),
                        retry_at=now + retry_delay(item.attempts + 1, 5.0, 600.0),
                    )
                log.warning("alert_send_failed", channel=item.channel, error=str(exc))
                continue
            except Permanent as exc:
                await self.store.outbox_done(item.id, now, error=str(exc))
                log.error("alert_channel_broken", channel=item.channel, error=str(exc))
                continue
            await self.store.outbox_done(item.id, now)
            sent += 1
        return sent
