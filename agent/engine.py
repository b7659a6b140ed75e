"""The order state machine: intake, allocate, deliver, sweep.

Every external call is bracketed by store transactions: the intent (with a deterministic
idempotency key) is committed before the call, the result after it. A line found in
`delivering` with an attempt already made is reconciled with the platform before anything
is sent again.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.coalesce import Coalescer
from agent.config import AgentSettings, SkuSettings, SupplierSettings
from agent.crashpoints import crash_point
from agent.domain import (
    ACTIVE_STATES,
    AgentError,
    Ambiguous,
    AuthFailed,
    CardItem,
    DeliveryConflict,
    DeliveryIntent,
    LineState,
    OrderClosed,
    OrderLine,
    OrderPage,
    Permanent,
    PlatformOrder,
    RejectedOrder,
    Transient,
    retry_delay,
)
from agent.logs import get_logger
from agent.once import FirstSeen
from agent.platforms.base import Platform
from agent.sourcing import Sourcing
from agent.store.base import Store, StoreError
from agent.suppliers.base import Balance, Supplier

log = get_logger("kami.engine")

MAX_PAGES_PER_POLL = 1000
SWEEP_BATCH = 1000
# Lines claimed per ledger call at intake: big enough to save the per-call overhead (30 us of
# ledger time per line at 64, 26 at 128, 25 at 256), small enough that a page's first
# deliveries start after a short transaction, not after the whole page's.
CLAIM_CHUNK = 128
CLAIMS_IN_FLIGHT = 2
# Claimed deliveries waiting for a worker, per worker, beyond which intake waits (at least a
# chunk's worth): enough to keep every worker busy while the next chunk is claimed, few enough
# that a claimed line waits for its send seconds, not minutes (on a shared ledger its lease
# runs meanwhile, and another agent would take it up), and a burst's memory stays flat.
INTAKE_AHEAD_PER_WORKER = 4
# A long poll that has not answered for its wait plus this long is taken for dead and the
# poll job resumes; longer than the adapters' read-timeout margin, so a hung request fails
# (and says so) first.
LONG_POLL_SILENCE_MARGIN = 15.0


@dataclass(slots=True)
class EngineStats:
    polled_orders: int = 0
    delivered: int = 0
    parked: int = 0
    retries: int = 0
    handled: int = 0  # lines a worker finished with, whatever the outcome
    last_progress: float = 0.0


def screen_order(
    order: PlatformOrder | RejectedOrder, skus: Mapping[str, SkuSettings]
) -> PlatformOrder | RejectedOrder | None:
    """Pure intake rules: which orders we act on, which we park, which we ignore."""
    if isinstance(order, RejectedOrder):
        return order
    if order.status != "paid":
        return None  # only paid orders are ours to deliver; others are the platform's business
    sku = skus.get(order.sku)
    if sku is None:
        return RejectedOrder(
            order.order_id, f"unknown SKU {order.sku!r} (not in config [skus])", sku=order.sku
        )
    if order.quantity > sku.max_quantity:
        return RejectedOrder(
            order.order_id,
            f"quantity {order.quantity} exceeds max_quantity {sku.max_quantity} for {order.sku}",
            sku=order.sku,
            quantity=order.quantity,
        )
    return order


@dataclass(frozen=True, slots=True)
class _Send:
    """A delivery claimed at intake, its intent committed: the worker only sends it."""

    platform: Platform
    intent: DeliveryIntent


def _line_id(item: int | _Send) -> int:
    return item.intent.line.id if isinstance(item, _Send) else item


def _log_backordered(line: OrderLine) -> None:
    log.info("backordered", order_id=line.order_id, sku=line.sku, quantity=line.quantity)


def _same_items(a: Sequence[CardItem], b: Sequence[CardItem]) -> bool:
    return Counter((i.code, i.secret) for i in a) == Counter((i.code, i.secret) for i in b)


class Engine:
    def __init__(
        self,
        settings: AgentSettings,
        skus: Mapping[str, SkuSettings],
        store: Store,
        platforms: Mapping[str, Platform],
        clock: Callable[[], float] = time.time,
        suppliers: Mapping[str, Supplier] | None = None,
        supplier_settings: Mapping[str, SupplierSettings] | None = None,
    ) -> None:
        self.settings = settings
        self.skus = skus
        self.store = store
        self.platforms = platforms
        self.clock = clock
        self.suppliers = dict(suppliers or {})
        self.sourcing = Sourcing(
            settings, skus, store, self.suppliers, supplier_settings or {}, clock
        )
        self.balances: dict[str, Balance] = {}
        self.auth_failures: set[str] = set()
        self.stats = EngineStats()
        # Work for the workers: a line to take through its states, or a delivery whose
        # intent is already committed (claimed at intake).
        self._queue: asyncio.Queue[int | _Send] = asyncio.Queue()
        self._delivered: Coalescer[tuple[int, str]] = Coalescer(
            lambda batch: self.store.mark_many_delivered(batch, self.clock())
        )
        self._local_skus = frozenset(s for s in skus if self.sourcing.local_only(s))
        self._queued: set[int] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._long_polled: set[str] = set()  # platforms whose long poll is running
        self._took_in_at: dict[str, float] = {}  # platform -> when a poll last found orders
        # platform -> (monotonic time of its long poll's last answer, the wait it asks for)
        self._long_poll_answered: dict[str, tuple[float, float]] = {}
        self._busy = 0
        self._taking_in: list[float] = []  # the `now` of each take-in under way
        self._intake_ahead = max(CLAIM_CHUNK, INTAKE_AHEAD_PER_WORKER * settings.concurrency)
        self._room = asyncio.Event()  # set when the queue falls under _intake_ahead
        self._reported = FirstSeen()  # orders rejected or ignored at intake, logged once each

    # --- lifecycle ----------------------------------------------------------------------------
    def start_workers(self) -> None:
        for index in range(self.settings.concurrency):
            self._workers.append(asyncio.create_task(self._worker(), name=f"kami-worker-{index}"))

    async def stop_workers(self, grace: float) -> None:
        """Let every worker finish the line in hand, then stop; queued lines stay in the DB."""
        self._room.set()  # an intake waiting for the workers must not wait for ever
        for follower in self._followers.values():
            follower.cancel()
        await asyncio.gather(*self._followers.values(), return_exceptions=True)
        while not self._queue.empty():
            self._queued.discard(_line_id(self._queue.get_nowait()))
            self._queue.task_done()
        try:
            async with asyncio.timeout(grace):
                await self._queue.join()
        except TimeoutError:
            log.warning("drain_timeout", busy=self._busy)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()

    async def idle(self) -> None:
        """Waits until every queued line has been handled (tests and the demo use it)."""
        await self._queue.join()

    @property
    def backlog(self) -> int:
        return self._queue.qsize() + self._busy

    def dispatch(self, line_ids: Sequence[int]) -> None:
        for line_id in line_ids:
            if line_id not in self._queued:
                self._queued.add(line_id)
                self._queue.put_nowait(line_id)

    async def _worker(self) -> None:
        while True:
            item = await self._queue.get()
            if self._queue.qsize() < self._intake_ahead:
                self._room.set()
            line_id = _line_id(item)
            self._busy += 1
            recording: asyncio.Future[None] | None = None
            try:
                if isinstance(item, _Send):
                    # The worker goes on to the next delivery while the ledger records this
                    # one: waiting for that commit would leave a platform connection idle.
                    recording = await self._send(item.platform, item.intent.line, item.intent)
                else:
                    await self.process(item)
            except Exception:
                # A bug or a store failure must not kill the worker; the row is still in
                # the DB and the sweeper will bring it back.
                log.exception("line_processing_failed", line_id=line_id)
            finally:
                self.stats.handled += 1
                self._busy -= 1
                if recording is None:
                    self._release(line_id)
                else:  # queued until recorded, so the sweep does not take it up meanwhile
                    recording.add_done_callback(functools.partial(self._recorded, line_id))

    def _release(self, line_id: int) -> None:
        self._queued.discard(line_id)
        self._queue.task_done()

    def _recorded(self, line_id: int, recording: asyncio.Future[None]) -> None:
        if not recording.cancelled() and (exc := recording.exception()) is not None:
            # Delivered but not recorded: the line is still `delivering` in the ledger, and
            # the sweep reconciles it with the platform (which has it) without a resend.
            log.error("delivery_not_recorded", line_id=line_id, error=str(exc))
        self._release(line_id)

    # --- intake -----------------------------------------------------------------------------
    async def poll(
        self, platform_name: str, *, from_start: bool = False, follow: bool = True
    ) -> int:
        """Lists paid orders page by page; returns how many new lines were taken in. New
        orders start follow-up polls (see _follow_up) unless `follow` is off."""
        platform = self.platforms[platform_name]
        cursor = None if from_start else await self.store.get_cursor(platform_name)
        taken = 0
        # A full re-list also checks that the platform took our deliveries (see below).
        listed_at = self.clock()
        listed_paid: list[str] | None = [] if from_start else None
        for _ in range(MAX_PAGES_PER_POLL):
            page = await self._fetch(platform_name, platform.list_paid(cursor))
            if page is None:
                return taken
            if listed_paid is not None:
                listed_paid.extend(
                    o.order_id
                    for o in page.orders
                    if isinstance(o, PlatformOrder) and o.status == "paid"
                )
            taken += await self._take_page(platform_name, page)
            if page.next_cursor and page.next_cursor != cursor:
                cursor = page.next_cursor
            elif page.has_more:
                log.warning("cursor_did_not_advance", platform=platform_name)
                break
            if not page.has_more:
                break
        if taken:
            self._took_in_at[platform_name] = time.monotonic()
            if follow:
                self._follow_up(platform_name)
        if listed_paid:
            await self._check_still_paid(platform_name, platform, listed_paid, listed_at)
        return taken

    async def _check_still_paid(
        self, platform_name: str, platform: Platform, order_ids: list[str], listed_at: float
    ) -> None:
        """An order the platform still lists as paid after our ledger recorded it delivered
        did not get our delivery, whatever answer we had (a call that went elsewhere, a
        platform that lost it): the buyer has no keys. Confirmed with the order itself (a
        listing can lag), then parked for the merchant with the reason, which raises the
        needs-attention alert; its keys stay bound to it for a resend."""
        for line in await self.store.delivered_lines_of(platform_name, order_ids):
            if line.delivered_at is None or line.delivered_at >= listed_at:
                continue  # delivered while the listing was being read: not yet visible
            try:
                remote = await platform.get_order(line.order_id)
            except AgentError as exc:
                log.warning("still_paid_check_failed", order_id=line.order_id, error=str(exc))
                continue
            if remote.status != "paid":
                continue
            reason = (
                "the platform still lists this order as paid after our ledger recorded it"
                " delivered: the buyer may not have the keys; check the order on the platform,"
                " then `kami-agent orders retry` it"
            )
            await self._park(line, reason)

    async def scheduled_poll(self, platform_name: str) -> int:
        """The poll job. Skipped while the platform's long poll keeps answering: both read
        from the same cursor, so the poll would list, parse and ingest the very pages the
        long poll brings (in a flash sale, every page twice). When the long poll fails or
        goes silent well past the wait it asked for, polling takes over again."""
        answered = self._long_poll_answered.get(platform_name)  # only while it runs
        if answered is not None:
            at, wait_seconds = answered
            if time.monotonic() - at < wait_seconds + LONG_POLL_SILENCE_MARGIN:
                return 0
        return await self.poll(platform_name)

    def _follow_up(self, platform_name: str) -> None:
        """After an intake that found new orders, keep polling every busy_poll_interval until
        a poll finds none: orders flowing in wait a fraction of a second for a listing, not a
        whole poll_interval, and a quiet shop is still polled once per poll_interval."""
        busy = self.settings.busy_poll_interval
        if busy <= 0 or busy >= self.settings.poll_interval or platform_name in self._long_polled:
            return  # the long poll already brings orders in as they come
        running = self._followers.get(platform_name)
        if running is not None and not running.done():
            return

        async def follow() -> None:
            try:
                while True:
                    await asyncio.sleep(busy)
                    if await self.poll(platform_name, follow=False):
                        continue
                    # Found none: quiet, unless another poll (the scheduled one) took the
                    # orders in just before this one. Stopping then would leave a steady
                    # stream to pile up until the next scheduled poll.
                    if time.monotonic() - self._took_in_at.get(platform_name, -math.inf) > busy:
                        return
            except Exception:
                log.exception("follow_up_poll_failed", platform=platform_name)

        self._followers[platform_name] = asyncio.create_task(
            follow(), name=f"follow-up-poll:{platform_name}"
        )

    async def long_poll(self, platform_name: str, wait_seconds: float) -> None:
        """Takes orders in as the platform announces them, so latency does not wait for the
        next poll. Runs until cancelled (or until the platform turns out not to offer it);
        the poll job is the safety net whenever it is not answering."""
        platform = self.platforms[platform_name]
        self._long_polled.add(platform_name)
        try:
            while True:
                try:
                    await self._long_poll(platform, platform_name, wait_seconds)
                    return  # not offered: polling only from now on
                except Exception:
                    # E.g. the ledger was unreachable while a page was taken in. The page was
                    # not committed, so the stored cursor still points at it: start again.
                    self._long_poll_answered.pop(platform_name, None)
                    log.exception("long_poll_intake_failed", platform=platform_name)
                    await asyncio.sleep(1.0)
        finally:
            self._long_polled.discard(platform_name)
            self._long_poll_answered.pop(platform_name, None)

    async def _long_poll(self, platform: Platform, platform_name: str, wait_seconds: float) -> None:
        cursor = await self.store.get_cursor(platform_name)
        ahead: asyncio.Future[OrderPage] | None = None
        try:
            while True:
                call = ahead or asyncio.ensure_future(
                    platform.wait_for_orders(cursor, wait_seconds)
                )
                ahead = None
                try:
                    page = await call
                except Permanent as exc:
                    log.warning("long_poll_unsupported", platform=platform_name, error=str(exc))
                    return
                except AgentError as exc:
                    self._long_poll_answered.pop(platform_name, None)  # the poll job takes over
                    log.warning("long_poll_failed", platform=platform_name, error=str(exc))
                    await asyncio.sleep(1.0)
                    cursor = await self.store.get_cursor(platform_name)
                    continue
                self._long_poll_answered[platform_name] = (time.monotonic(), wait_seconds)
                cursor = page.next_cursor or cursor
                # The next page is asked for while this one is taken in, so a flash sale's
                # deliveries do not pause at every page boundary. Pages are still taken in
                # one after the other, each committed before the stored cursor moves.
                ahead = asyncio.ensure_future(platform.wait_for_orders(cursor, wait_seconds))
                await self._take_page(platform_name, page)
        finally:
            if ahead is not None:
                ahead.cancel()
                if ahead.done() and not ahead.cancelled():
                    ahead.exception()  # not wanted any more; retrieved so asyncio keeps quiet

    async def _fetch(self, platform_name: str, call: Awaitable[OrderPage]) -> OrderPage | None:
        try:
            page = await call
        except AuthFailed as exc:
            self.auth_failures.add(platform_name)
            log.error("platform_auth_failed", platform=platform_name, error=str(exc))
            return None
        except AgentError as exc:
            log.warning(
                "poll_failed", platform=platform_name, error=str(exc), kind=type(exc).__name__
            )
            return None
        self.auth_failures.discard(platform_name)
        return page

    async def _take_page(self, platform_name: str, page: OrderPage) -> int:
        """Takes one page in (see _take_in), then advances the stored cursor."""
        if page.unidentifiable:
            # Each reason once: the same entry is listed again at every re-list.
            fresh = [r for r in page.ignored if self._reported.first((platform_name, r))]
            if fresh or not page.ignored:
                count = len(fresh) if page.ignored else page.unidentifiable
                log.warning(
                    "orders_without_id", platform=platform_name, count=count, reasons=fresh[:5]
                )
        screened = [s for o in page.orders if (s := screen_order(o, self.skus)) is not None]
        taken = await self._take_in(platform_name, screened)
        self.stats.polled_orders += len(page.orders)
        for order in screened:
            if isinstance(order, RejectedOrder) and self._reported.first(
                (platform_name, order.order_id)
            ):
                log.warning(
                    "order_rejected",
                    platform=platform_name,
                    order_id=order.order_id,
                    reason=order.reason,
                )
        if taken:
            log.info("orders_taken", platform=platform_name, count=taken)
        if page.next_cursor:
            # Only after the page is committed, so a crash re-reads rather than skips.
            await self.store.set_cursor(platform_name, page.next_cursor, self.clock())
        return taken

    async def _take_in(
        self, platform_name: str, orders: Sequence[PlatformOrder | RejectedOrder]
    ) -> int:
        """Records the orders, CLAIM_CHUNK per ledger call, and claims the new local-stock
        lines in the same call (a flash sale is mostly this): each chunk's deliveries go to
        the workers as soon as it is committed. Lines that may buy upstream go to the workers
        as they are. Returns how many new lines were taken in."""
        platform = self.platforms[platform_name]
        chunks = [orders[i : i + CLAIM_CHUNK] for i in range(0, len(orders), CLAIM_CHUNK)]
        under_way: deque[tuple[float, asyncio.Future[list[DeliveryIntent | OrderLine]]]]
        under_way = deque()
        started = taken = 0
        try:
            while started < len(chunks) or under_way:
                # CLAIMS_IN_FLIGHT chunks at once: the next chunk's statements run while the
                # commit (the fsync) of the one before is under way, so the workers are not
                # left idle at every commit. They are handed out in order.
                while (
                    started < len(chunks)
                    and len(under_way) < CLAIMS_IN_FLIGHT
                    and self._queue.qsize() < self._intake_ahead
                ):
                    now = self.clock()
                    chunk = self.store.take_in(
                        platform_name, chunks[started], now, self._local_skus
                    )
                    started += 1
                    self._taking_in.append(now)
                    under_way.append((now, asyncio.ensure_future(chunk)))
                if not under_way:  # the workers are far behind: let them catch up first
                    self._room.clear()
                    await self._room.wait()
                    continue
                now, call = under_way.popleft()
                try:
                    claims = await call
                except BaseException:
                    under_way.appendleft((now, call))
                    raise
                try:
                    self._hand_out(platform, claims)
                finally:
                    self._taking_in.remove(now)
                taken += len(claims)
        except BaseException:
            for now, pending in under_way:  # already on its way to the ledger
                pending.add_done_callback(functools.partial(self._late_claims, platform, now))
            raise
        return taken

    def _late_claims(
        self,
        platform: Platform,
        now: float,
        call: asyncio.Future[list[DeliveryIntent | OrderLine]],
    ) -> None:
        """A chunk still being taken in when its page failed: what it claimed goes out all
        the same. (A chunk that failed recorded nothing; the page is read again.)"""
        try:
            if not call.cancelled() and call.exception() is None:
                self._hand_out(platform, call.result())
        finally:
            self._taking_in.remove(now)

    def _hand_out(self, platform: Platform, claims: Sequence[DeliveryIntent | OrderLine]) -> None:
        crash_point("after_ingest")
        for claimed in claims:
            line_id = claimed.line.id if isinstance(claimed, DeliveryIntent) else claimed.id
            if line_id in self._queued:
                continue  # a sweep that ran meanwhile found it first; its worker has it
            if isinstance(claimed, DeliveryIntent):
                crash_point("after_allocate")
                crash_point("after_intent")
                self._queued.add(line_id)
                self._queue.put_nowait(_Send(platform, claimed))
            elif claimed.state == LineState.BACKORDERED:
                # Nothing to do until stock comes: the sweep brings it back then.
                _log_backordered(claimed)
            else:
                self.dispatch([line_id])  # it may buy upstream: the worker decides

    async def reconcile_all(self) -> None:
        """Re-list from the start: the cursor is only an optimisation (catch-up on start)."""
        for name in self.platforms:
            await self.poll(name, from_start=True)

    async def sweep(self) -> int:
        async with self.store.singleton("sweep") as ours:
            if not ours:
                return 0  # another agent sharing the store is sweeping right now
            lines = await self.store.due_lines(self.clock(), SWEEP_BATCH)
        # Lines a take-in under way has recorded are its to hand out: claimed ones would
        # otherwise be taken for unfinished sends and checked with the platform first.
        recording_since = min(self._taking_in, default=math.inf)
        fresh = [
            line.id
            for line in lines
            if line.id not in self._queued and line.seen_at < recording_since
        ]
        self.dispatch(fresh)
        return len(fresh)

    # --- one line -------------------------------------------------------------------------------
    async def process(self, line_id: int) -> None:
        # None when another agent sharing the store is working on the line right now.
        line = await self.store.take_line(line_id, self.clock())
        while line is not None and line.state in ACTIVE_STATES:
            waiting = line.next_attempt_at > self.clock()
            if line.state == LineState.BACKORDERED:
                # Stock may have arrived before the next supplier round is due.
                line = await self.sourcing.fill(line, suppliers=not waiting)
            elif waiting:
                return
            elif line.state == LineState.NEW and self.sourcing.local_only(line.sku):
                await self._claim_and_deliver(line)
                return
            elif line.state == LineState.NEW:
                line = await self.sourcing.fill(line)
            elif line.state == LineState.PURCHASING:
                line = await self.sourcing.resume(line)
            else:
                await self._deliver(line)
                return
            crash_point("after_allocate")
            if line.state != LineState.ALLOCATED:
                if line.state == LineState.BACKORDERED:
                    _log_backordered(line)
                return

    async def _platform_for(self, line: OrderLine) -> Platform | None:
        """The line's platform, or None after parking a line whose platform left the config."""
        platform = self.platforms.get(line.platform)
        if platform is None:
            await self._park(line, f"platform {line.platform!r} is not configured")
        return platform

    async def _claim_and_deliver(self, line: OrderLine) -> None:
        """The common case in one ledger call: bind the keys and commit the delivery intent
        together (a flash sale is mostly this), then deliver."""
        platform = await self._platform_for(line)
        if platform is None:
            return
        claimed = await self.store.claim_for_delivery(line.id, self.clock())
        crash_point("after_allocate")
        if isinstance(claimed, DeliveryIntent):
            crash_point("after_intent")
            await self._send_recorded(platform, claimed.line, claimed)
        elif claimed.state == LineState.BACKORDERED:
            _log_backordered(line)

    async def poll_balances(self) -> None:
        for name, supplier in self.suppliers.items():
            try:
                balance = await supplier.balance()
            except AgentError as exc:
                log.warning("supplier_balance_failed", supplier=name, error=str(exc))
                continue
            self.balances[name] = balance
            log.info(
                "supplier_balance",
                supplier=name,
                balance=str(balance.amount),
                currency=balance.currency,
            )

    async def _deliver(self, line: OrderLine) -> None:
        platform = await self._platform_for(line)
        if platform is None:
            return
        needs_reconcile = line.state == LineState.DELIVERING and (
            line.attempts > 0 or line.ambiguous
        )
        if needs_reconcile and not await self._reconcile(line, platform):
            return
        if line.attempts >= self.settings.max_delivery_attempts:
            await self._park(
                line,
                f"still undelivered after {line.attempts} attempts: "
                f"{line.reason or 'no reason recorded'}",
            )
            return
        try:
            intent = await self.store.begin_delivery(line.id, self.clock())
        except StoreError as exc:
            current = await self.store.get_line(line.id)
            if current is not None and current.state not in ACTIVE_STATES:
                # Settled meanwhile (on a shared ledger, by another agent that took the line
                # up when our lease ran out): nothing left to do, and nothing to park.
                log.info("line_settled_meanwhile", order_id=line.order_id, state=current.state)
                return
            await self._park(line, str(exc))
            return
        crash_point("after_intent")
        await self._send_recorded(platform, line, intent)

    async def _send_recorded(
        self, platform: Platform, line: OrderLine, intent: DeliveryIntent
    ) -> None:
        recording = await self._send(platform, line, intent)
        if recording is not None:
            await recording

    async def _send(
        self, platform: Platform, line: OrderLine, intent: DeliveryIntent
    ) -> asyncio.Future[None] | None:
        """The delivery call, its intent already committed; then its outcome committed. A
        failure is committed before returning (None); a delivery is returned as its
        recording in the ledger, under way, for the caller to wait for or hand off."""
        message = self._message_for(line.sku)
        try:
            await platform.deliver(line.order_id, intent.idempotency_key, intent.items, message)
        except DeliveryConflict as exc:
            await self._park(line, str(exc))
            return None
        except OrderClosed as exc:
            await self._close(line, exc.status, str(exc))
            return None
        except Permanent as exc:
            await self._park(line, str(exc))
            return None
        except Ambiguous as exc:
            await self._retry_later(intent.line, str(exc), ambiguous=True)
            return None
        except Transient as exc:
            await self._retry_later(
                intent.line, str(exc), ambiguous=False, retry_after=exc.retry_after
            )
            return None
        crash_point("after_deliver_call")
        # Deliveries finishing together are recorded in one ledger call (a flash sale).
        recording = self._delivered.enqueue((line.id, f"key {intent.idempotency_key}"))
        self.stats.delivered += 1
        self.stats.last_progress = self.clock()
        log.info(
            "delivered",
            order_id=line.order_id,
            sku=line.sku,
            quantity=line.quantity,
            attempt=intent.line.attempts,
            latency_ms=round((self.clock() - line.seen_at) * 1000, 1),
        )
        return recording

    async def _reconcile(self, line: OrderLine, platform: Platform) -> bool:
        """Ask the platform what became of an earlier attempt; True = safe to send (again)."""
        try:
            remote = await platform.get_order(line.order_id)
        except Permanent as exc:
            await self._park(line, f"platform cannot show the order: {exc}")
            return False
        except (Transient, Ambiguous) as exc:
            await self._retry_later(line, f"reconcile failed: {exc}", ambiguous=True)
            return False
        now = self.clock()
        if remote.status == "delivered":
            ours = await self.store.bound_items(line.id)
            if _same_items(ours, remote.items):
                await self.store.mark_delivered(line.id, now, "confirmed by platform")
                self.stats.delivered += 1
                self.stats.last_progress = now
                log.info(
                    "delivered",
                    order_id=line.order_id,
                    sku=line.sku,
                    quantity=line.quantity,
                    confirmed=True,
                )
            else:
                await self._park(line, "platform shows a delivery with other keys")
            return False
        if remote.status in ("refunded", "cancelled"):
            await self._close(line, remote.status, f"platform reports {remote.status}")
            return False
        if remote.status != "paid":
            await self._park(line, f"platform reports unexpected status {remote.status[:40]!r}")
            return False
        await self.store.add_event(line.id, "reconciled", "platform: still paid, re-sending", now)
        return True

    async def _retry_later(
        self, line: OrderLine, reason: str, *, ambiguous: bool, retry_after: float | None = None
    ) -> None:
        now = self.clock()
        backoff = retry_delay(line.attempts, self.settings.retry_base, self.settings.retry_cap)
        delay = max(backoff, retry_after or 0.0)
        await self.store.defer(line.id, now + delay, reason, ambiguous=ambiguous, now=now)
        self.stats.retries += 1
        log.warning(
            "delivery_retry_scheduled",
            order_id=line.order_id,
            reason=reason,
            ambiguous=ambiguous,
            delay_s=round(delay, 2),
        )

    async def _close(self, line: OrderLine, status: str, reason: str) -> None:
        """The platform closed the order (cancelled or refunded): so do we; its keys stay
        bound to the line, as for every line that may have reached the buyer."""
        await self.store.close_line(line.id, LineState(status), reason, self.clock())
        log.warning("order_closed_by_platform", order_id=line.order_id, status=status)

    async def _park(self, line: OrderLine, reason: str) -> None:
        await self.store.park(line.id, reason, self.clock())
        self.stats.parked += 1
        log.error("needs_attention", order_id=line.order_id, sku=line.sku, reason=reason)

    def _message_for(self, sku: str) -> str:
        settings = self.skus.get(sku)
        if settings is not None and settings.message:
            return settings.message
        return self.settings.delivery_message

    def snapshot(self) -> dict[str, Any]:
        return {
            "delivered": self.stats.delivered,
            "parked": self.stats.parked,
            "retries": self.stats.retries,
            "backlog": self.backlog,
        }
