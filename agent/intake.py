"""Intake: one object per platform account takes its paid orders into the ledger.

It owns what belongs to that account alone: its stored cursor, the scheduled poll and the
busy polls that follow an intake that found orders, the long poll when the platform offers
one, the orders it has already reported, and whether the platform refuses our credentials.
Claimed deliveries go to the work queue (agent/engine.py) chunk by chunk, as each chunk is
committed, and intake waits for room there when the workers fall behind.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from agent.config import AgentSettings, SkuSettings
from agent.domain import (
    AgentError,
    AuthFailed,
    DeliveryIntent,
    OrderLine,
    OrderPage,
    Permanent,
    PlatformOrder,
    RejectedOrder,
)
from agent.engine_stats import EngineStats
from agent.logs import get_logger
from agent.once import FirstSeen
from agent.platforms.base import Platform
from agent.reasons import OVER_MAX_QUANTITY, STILL_PAID, UNKNOWN_SKU, english
from agent.screening import Screening
from agent.store.base import Store

log = get_logger("kami.engine")

MAX_PAGES_PER_POLL = 1000
# Lines claimed per ledger call at intake: big enough to save the per-call overhead (30 us of
# ledger time per line at 64, 26 at 128, 25 at 256), small enough that a page's first
# deliveries start after a short transaction, not after the whole page's.
CLAIM_CHUNK = 128
CLAIMS_IN_FLIGHT = 2
# A long poll that has not answered for its wait plus this long is taken for dead and the
# poll job resumes; longer than the adapters' read-timeout margin, so a hung request fails
# (and says so) first.
LONG_POLL_SILENCE_MARGIN = 15.0

Claims = Sequence[DeliveryIntent | OrderLine]


class WorkQueue(Protocol):
    """What intake needs from the work queue."""

    def has_room(self) -> bool:
        """True while the claimed deliveries waiting for a worker are few enough to claim
        another chunk."""
        ...

    async def wait_for_room(self) -> None:
        """Returns once the workers have caught up (or the queue is stopping)."""
        ...

    def hand_out(self, platform: Platform, claims: Claims) -> None:
        """Queues what a committed chunk claimed: deliveries to send, lines to work on."""
        ...

    def taking_in(self, now: float) -> None:
        """A chunk recorded as of `now` is on its way to the ledger: the sweep leaves the
        lines it records to this intake."""
        ...

    def took_in(self, now: float) -> None:
        """The chunk taken in as of `now` is handed out (or failed)."""
        ...


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
            order.order_id,
            english(UNKNOWN_SKU, sku=order.sku),
            sku=order.sku,
            quantity=order.quantity,  # its true quantity, shown and kept for a retry
        )
    if order.quantity > sku.max_quantity:
        return RejectedOrder(
            order.order_id,
            english(
                OVER_MAX_QUANTITY, quantity=order.quantity, max=sku.max_quantity, sku=order.sku
            ),
            sku=order.sku,
            quantity=order.quantity,
        )
    return order


class Intake:
    """The intake of one platform account."""

    def __init__(
        self,
        name: str,
        platform: Platform,
        settings: AgentSettings,
        skus: Mapping[str, SkuSettings],
        store: Store,
        queue: WorkQueue,
        *,
        local_skus: frozenset[str],
        park: Callable[[OrderLine, str], Awaitable[None]],
        stats: EngineStats,
        auth_failures: dict[str, AuthFailed],
        clock: Callable[[], float],
        unreachable_since: dict[str, float] | None = None,
    ) -> None:
        self.name = name
        self.platform = platform
        self.settings = settings
        self.skus = skus
        self.store = store
        self.queue = queue
        self.clock = clock
        self._local_skus = local_skus
        self._park = park
        self._stats = stats
        # Shared with the alert evaluator: the accounts whose platform refuses our credentials.
        self._auth_failures = auth_failures
        # Shared with the alert evaluator too: since when (the engine's clock) every poll of
        # the account has failed without an answer from the platform (refused, timed out, 5xx).
        self._unreachable_since = unreachable_since if unreachable_since is not None else {}
        self._follower: asyncio.Task[None] | None = None
        self._long_polled = False  # the long poll is running
        self._took_in_at = -math.inf  # monotonic time a poll last found orders
        # Monotonic time of the long poll's last answer and the wait it asks for, while it runs.
        self._long_poll_answered: tuple[float, float] | None = None
        # Monotonic time before which the platform asked not to be listed (429/503
        # Retry-After): every poll until then is skipped, the scheduled and the busy ones.
        self._quiet_until = -math.inf
        self._reported = FirstSeen()  # orders rejected or ignored, logged once each
        self._screening = Screening(settings, skus, store)  # blocked buyers, buyer limits
        # SKUs whose keys wait a while after intake: never claimed as they are taken in.
        self._delays = {sku: s.delay for sku, s in skus.items() if s.delay > 0}
        self._claimed_at_intake = local_skus - frozenset(self._delays)

    @property
    def auth_failed(self) -> bool:
        """The platform refused our credentials at the last listing."""
        return self.name in self._auth_failures

    async def stop(self) -> None:
        """Stops the busy polls (the scheduled poll and the long poll are their owners')."""
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)

    # --- polling ------------------------------------------------------------------------------
    async def poll(self, *, from_start: bool = False, follow: bool = True) -> int:
        """Lists paid orders page by page; returns how many new lines were taken in. New
        orders start follow-up polls (see _follow_up) unless `follow` is off."""
        if time.monotonic() < self._quiet_until:
            return 0  # the platform's Retry-After has not run out
        cursor = None if from_start else await self.store.get_cursor(self.name)
        taken = 0
        # A full re-list also checks that the platform took our deliveries (see below).
        listed_at = self.clock()
        listed_paid: list[str] | None = [] if from_start else None
        for _ in range(MAX_PAGES_PER_POLL):
            page = await self._fetch(self.platform.list_paid(cursor))
            if page is None:
                return taken
            if listed_paid is not None:
                listed_paid.extend(
                    o.order_id
                    for o in page.orders
                    if isinstance(o, PlatformOrder) and o.status == "paid"
                )
            taken += await self.take_page(page)
            if page.next_cursor and page.next_cursor != cursor:
                cursor = page.next_cursor
            elif page.has_more:
                log.warning("cursor_did_not_advance", platform=self.name)
                break
            if not page.has_more:
                break
        if taken:
            self._took_in_at = time.monotonic()
            if follow:
                self._follow_up()
        if listed_paid:
            await self._check_still_paid(listed_paid, listed_at)
        return taken

    async def scheduled_poll(self) -> int:
        """The poll job. Skipped while the long poll keeps answering: both read from the same
        cursor, so the poll would list, parse and ingest the very pages the long poll brings
        (in a flash sale, every page twice). When the long poll fails or goes silent well
        past the wait it asked for, polling takes over again."""
        answered = self._long_poll_answered  # only while it runs
        if answered is not None:
            at, wait_seconds = answered
            if time.monotonic() - at < wait_seconds + LONG_POLL_SILENCE_MARGIN:
                return 0
        return await self.poll()

    def _follow_up(self) -> None:
        """After an intake that found new orders, keep polling every busy_poll_interval until
        a poll finds none: orders flowing in wait a fraction of a second for a listing, not a
        whole poll_interval, and a quiet shop is still polled once per poll_interval."""
        busy = self.settings.busy_poll_interval
        if busy <= 0 or busy >= self.settings.poll_interval or self._long_polled:
            return  # the long poll already brings orders in as they come
        if self._follower is not None and not self._follower.done():
            return

        async def follow() -> None:
            try:
                while True:
                    await asyncio.sleep(busy)
                    if await self.poll(follow=False):
                        continue
                    # Found none: quiet, unless another poll (the scheduled one) took the
                    # orders in just before this one. Stopping then would leave a steady
                    # stream to pile up until the next scheduled poll.
                    if time.monotonic() - self._took_in_at > busy:
                        return
            except Exception:
                log.exception("follow_up_poll_failed", platform=self.name)

        self._follower = asyncio.create_task(follow(), name=f"follow-up-poll:{self.name}")

    async def long_poll(self, wait_seconds: float) -> None:
        """Takes orders in as the platform announces them, so latency does not wait for the
        next poll. Runs until cancelled (or until the platform turns out not to offer it);
        the poll job is the safety net whenever it is not answering."""
        self._long_polled = True
        try:
            while True:
                try:
                    await self._long_poll(wait_seconds)
                    return  # not offered: polling only from now on
                except Exception:
                    # E.g. the ledger was unreachable while a page was taken in. The page was
                    # not committed, so the stored cursor still points at it: start again.
                    self._long_poll_answered = None
                    log.exception("long_poll_intake_failed", platform=self.name)
                    await asyncio.sleep(1.0)
        finally:
            self._long_polled = False
            self._long_poll_answered = None

    async def _long_poll(self, wait_seconds: float) -> None:
        platform = self.platform
        cursor = await self.store.get_cursor(self.name)
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
                    log.warning("long_poll_unsupported", platform=self.name, error=str(exc))
                    return
                except AgentError as exc:
                    self._long_poll_answered = None  # the poll job takes over
                    if isinstance(exc, AuthFailed):
                        log.warning("long_poll_failed", platform=self.name, error=str(exc))
                    else:
                        self._mark_unreachable(exc)
                    await asyncio.sleep(max(1.0, self._hold_off(exc)))
                    cursor = await self.store.get_cursor(self.name)
                    continue
                self._long_poll_answered = (time.monotonic(), wait_seconds)
                self._mark_reachable()
                cursor = page.next_cursor or cursor
                # The next page is asked for while this one is taken in, so a flash sale's
                # deliveries do not pause at every page boundary. Pages are still taken in
                # one after the other, each committed before the stored cursor moves.
                ahead = asyncio.ensure_future(platform.wait_for_orders(cursor, wait_seconds))
                await self.take_page(page)
        finally:
            if ahead is not None:
                ahead.cancel()
                if ahead.done() and not ahead.cancelled():
                    ahead.exception()  # not wanted any more; retrieved so asyncio keeps quiet

    async def _fetch(self, call: Awaitable[OrderPage]) -> OrderPage | None:
        try:
            page = await call
        except AuthFailed as exc:
            self._unreachable_since.pop(self.name, None)  # it answered, with a refusal
            self._auth_failures[self.name] = exc  # the alert says which refusal it is
            log.error("platform_auth_failed", platform=self.name, error=str(exc))
            return None
        except AgentError as exc:
            self._hold_off(exc)
            self._mark_unreachable(exc)
            return None
        self._auth_failures.pop(self.name, None)
        self._mark_reachable()
        return page

    def _hold_off(self, exc: AgentError) -> float:
        """A failed listing whose answer carried Retry-After (429, 503): no listing of this
        platform until it runs out. Returns the seconds asked for (0 when none)."""
        wait = getattr(exc, "retry_after", None) or 0.0
        if wait > 0:
            self._quiet_until = max(self._quiet_until, time.monotonic() + wait)
        return wait

    def _mark_unreachable(self, exc: AgentError) -> None:
        """A failed poll. Logged when an outage starts; while it lasts, the polls' failures
        are logged at debug level: the `platform_unreachable` alert speaks for them, not a
        warning per poll (several a second with the long poll)."""
        if self.name not in self._unreachable_since:
            self._unreachable_since[self.name] = self.clock()
            log.warning("poll_failed", platform=self.name, error=str(exc), kind=type(exc).__name__)
        else:
            log.debug("poll_failed", platform=self.name, error=str(exc), kind=type(exc).__name__)

    def _mark_reachable(self) -> None:
        """A poll answered: an outage under way is over."""
        if self._unreachable_since.pop(self.name, None) is not None:
            log.info("platform_reachable", platform=self.name)

    async def _check_still_paid(self, order_ids: list[str], listed_at: float) -> None:
        """An order the platform still lists as paid after our ledger recorded it delivered
        did not get our delivery, whatever answer we had (a call that went elsewhere, a
        platform that lost it): the buyer has no keys. Confirmed with the order itself (a
        listing can lag), then parked for the merchant with the reason, which raises the
        needs-attention alert; its keys stay bound to it for a resend."""
        for line in await self.store.delivered_lines_of(self.name, order_ids):
            if line.delivered_at is None or line.delivered_at >= listed_at:
                continue  # delivered while the listing was being read: not yet visible
            try:
                remote = await self.platform.get_order(line.order_id)
            except AgentError as exc:
                log.warning("still_paid_check_failed", order_id=line.order_id, error=str(exc))
                continue
            if remote.status != "paid":
                continue
            await self._park(line, STILL_PAID)

    # --- into the ledger ----------------------------------------------------------------------
    async def take_page(self, page: OrderPage) -> int:
        """Takes one page in (see _take_in), then advances the stored cursor."""
        if page.unidentifiable:
            # Each reason once: the same entry is listed again at every re-list.
            fresh = [r for r in page.ignored if self._reported.first(r)]
            if fresh or not page.ignored:
                count = len(fresh) if page.ignored else page.unidentifiable
                log.warning("orders_without_id", platform=self.name, count=count, reasons=fresh[:5])
        screened = [s for o in page.orders if (s := screen_order(o, self.skus)) is not None]
        screened = await self._screening.screen(self.name, screened, self.clock())
        taken = await self._take_in(screened)
        self._stats.polled_orders += len(page.orders)
        for order in screened:
            if isinstance(order, RejectedOrder) and self._reported.first(order.order_id):
                log.warning(
                    "order_rejected",
                    platform=self.name,
                    order_id=order.order_id,
                    reason=order.reason,
                )
        if taken:
            log.info("orders_taken", platform=self.name, count=taken)
        if page.next_cursor:
            # Only after the page is committed, so a crash re-reads rather than skips.
            await self.store.set_cursor(self.name, page.next_cursor, self.clock())
        return taken

    async def _take_in(self, orders: Sequence[PlatformOrder | RejectedOrder]) -> int:
        """Records the orders, CLAIM_CHUNK per ledger call, and claims the new local-stock
        lines in the same call (a flash sale is mostly this): each chunk's deliveries go to
        the workers as soon as it is committed. Lines that may buy upstream go to the workers
        as they are. Returns how many new lines were taken in."""
        queue = self.queue
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
                    started < len(chunks) and len(under_way) < CLAIMS_IN_FLIGHT and queue.has_room()
                ):
                    now = self.clock()
                    # (delays passed only when a SKU has one: the call stays the port's usual)
                    delays = (self._delays,) if self._delays else ()
                    chunk = self.store.take_in(
                        self.name, chunks[started], now, self._claimed_at_intake, *delays
                    )
                    started += 1
                    queue.taking_in(now)
                    under_way.append((now, asyncio.ensure_future(chunk)))
                if not under_way:  # the workers are far behind: let them catch up first
                    await queue.wait_for_room()
                    continue
                now, call = under_way.popleft()
                try:
                    claims = await call
                except BaseException:
                    under_way.appendleft((now, call))
                    raise
                try:
                    queue.hand_out(self.platform, claims)
                finally:
                    queue.took_in(now)
                taken += len(claims)
        except BaseException:
            for now, pending in under_way:  # already on its way to the ledger
                pending.add_done_callback(functools.partial(self._late_claims, now))
            raise
        return taken

    def _late_claims(
        self, now: float, call: asyncio.Future[list[DeliveryIntent | OrderLine]]
    ) -> None:
        """A chunk still being taken in when its page failed: what it claimed goes out all
        the same. (A chunk that failed recorded nothing; the page is read again.)"""
        try:
            if not call.cancelled() and call.exception() is None:
                self.queue.hand_out(self.platform, call.result())
        finally:
            self.queue.took_in(now)
