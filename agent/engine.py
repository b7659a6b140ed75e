"""The work queue: workers, backpressure, sweep.

Intake (agent/intake.py, one object per platform account) puts work here: a delivery whose
intent it has already committed, or a line to take through its states. Workers take one item
at a time and hand it to delivery (agent/delivery.py). The queue keeps intake from claiming
far ahead of the workers, and the sweep brings back every line the ledger says is due
(retries, backorders with stock, lines left by a stopped run) that no worker holds.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.config import AgentSettings, SkuSettings, SupplierSettings
from agent.consignment import ConsignedSales, consigned_skus
from agent.crashpoints import crash_point
from agent.delivery import Delivery, log_backordered
from agent.domain import AgentError, AuthFailed, DeliveryIntent, LineState, OrderLine
from agent.engine_stats import EngineStats
from agent.intake import CLAIM_CHUNK, Intake, screen_order
from agent.logs import get_logger
from agent.platforms.base import Platform
from agent.sourcing import Sourcing
from agent.store.base import Store
from agent.suppliers.base import Balance, Supplier

__all__ = ["CLAIM_CHUNK", "Engine", "EngineStats", "screen_order"]

log = get_logger("kami.engine")

SWEEP_BATCH = 1000
# Claimed deliveries waiting for a worker, per worker, beyond which intake waits (at least a
# chunk's worth): enough to keep every worker busy while the next chunk is claimed, few enough
# that a claimed line waits for its send seconds, not minutes (on a shared ledger its lease
# runs meanwhile, and another agent would take it up), and a burst's memory stays flat.
INTAKE_AHEAD_PER_WORKER = 4


@dataclass(frozen=True, slots=True)
class _Send:
    """A delivery claimed at intake, its intent committed: the worker only sends it."""

    platform: Platform
    intent: DeliveryIntent


def _line_id(item: int | _Send) -> int:
    return item.intent.line.id if isinstance(item, _Send) else item


class Engine:
    """The work queue and its workers, with one intake per platform account."""

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
        self.store = store
        self.platforms = platforms
        self.clock = clock
        self.suppliers = dict(suppliers or {})
        self.balances: dict[str, Balance] = {}
        # Platform accounts refusing our calls, with the refusal (credentials, or unpaid calls).
        self.auth_failures: dict[str, AuthFailed] = {}
        # Platform accounts none of whose polls answered since this time (self.clock).
        self.unreachable_since: dict[str, float] = {}
        self.stats = EngineStats()
        sourcing = Sourcing(settings, skus, store, self.suppliers, supplier_settings or {}, clock)
        # Lines of a SKU a platform sells from its own pool are that pool's to deliver.
        self.consigned = ConsignedSales(store, platforms, clock)
        self.delivery = Delivery(
            settings, skus, store, platforms, sourcing, self.stats, clock, self.consigned
        )
        local_skus = frozenset(s for s in skus if sourcing.local_only(s))
        self.intakes = {
            name: Intake(
                name,
                platform,
                settings,
                skus,
                store,
                self,
                local_skus=local_skus - consigned_skus(platform),
                park=self.delivery.park,
                stats=self.stats,
                auth_failures=self.auth_failures,
                clock=clock,
                unreachable_since=self.unreachable_since,
            )
            for name, platform in platforms.items()
        }
        # Work for the workers: a line to take through its states, or a delivery whose
        # intent is already committed (claimed at intake).
        self._queue: asyncio.Queue[int | _Send] = asyncio.Queue()
        self._queued: set[int] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._busy = 0
        self._taking_in: list[float] = []  # the `now` of each take-in under way
        self._intake_ahead = max(CLAIM_CHUNK, INTAKE_AHEAD_PER_WORKER * settings.concurrency)
        self._room = asyncio.Event()  # set when the queue falls under _intake_ahead

    # --- workers ------------------------------------------------------------------------------
    def start_workers(self) -> None:
        """Starts `concurrency` workers."""
        for index in range(self.settings.concurrency):
            self._workers.append(asyncio.create_task(self._worker(), name=f"kami-worker-{index}"))

    async def stop_workers(self, grace: float) -> None:
        """Let every worker finish the line in hand, then stop; queued lines stay in the DB."""
        self._room.set()  # an intake waiting for the workers must not wait for ever
        await asyncio.gather(*(intake.stop() for intake in self.intakes.values()))
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
        """Lines queued or in a worker's hands."""
        return self._queue.qsize() + self._busy

    def dispatch(self, line_ids: Sequence[int]) -> None:
        """Queues each line no worker holds or waits for."""
        for line_id in line_ids:
            if line_id not in self._queued:
                self._queued.add(line_id)
                self._queue.put_nowait(line_id)

    async def _worker(self) -> None:
        delivery = self.delivery
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
                    recording = await delivery.send(item.platform, item.intent.line, item.intent)
                else:
                    await delivery.process(item)
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

    # --- what intake puts here (agent.intake.WorkQueue) -----------------------------------------
    def has_room(self) -> bool:
        """True while intake may claim another chunk."""
        return self._queue.qsize() < self._intake_ahead

    async def wait_for_room(self) -> None:
        """Returns once a worker has brought the queue under the limit (or on stop)."""
        self._room.clear()
        await self._room.wait()

    def taking_in(self, now: float) -> None:
        """A take-in as of `now` is under way (the sweep leaves its lines to it)."""
        self._taking_in.append(now)

    def took_in(self, now: float) -> None:
        """The take-in as of `now` is handed out."""
        self._taking_in.remove(now)

    def hand_out(self, platform: Platform, claims: Sequence[DeliveryIntent | OrderLine]) -> None:
        """Queues a committed chunk's claims: deliveries to send, lines that may buy."""
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
                log_backordered(claimed)
            else:
                self.dispatch([line_id])  # it may buy upstream: the worker decides

    # --- periodic jobs ------------------------------------------------------------------------
    async def sweep(self) -> int:
        """Queues the lines the ledger says are due and no worker holds; returns how many."""
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

    async def reconcile_all(self) -> None:
        """Re-list from the start: the cursor is only an optimisation (catch-up on start)."""
        for intake in self.intakes.values():
            await intake.poll(from_start=True)

    async def poll_balances(self) -> None:
        """Reads every supplier's balance (the forecast and the low-balance alert use it)."""
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

    # --- one platform account's intake, by name ----------------------------------------------
    async def poll(
        self, platform_name: str, *, from_start: bool = False, follow: bool = True
    ) -> int:
        """See Intake.poll."""
        return await self.intakes[platform_name].poll(from_start=from_start, follow=follow)

    async def scheduled_poll(self, platform_name: str) -> int:
        """See Intake.scheduled_poll."""
        return await self.intakes[platform_name].scheduled_poll()

    async def long_poll(self, platform_name: str, wait_seconds: float) -> None:
        """See Intake.long_poll."""
        await self.intakes[platform_name].long_poll(wait_seconds)

    def snapshot(self) -> dict[str, Any]:
        """The figures of the status line and the stop log."""
        return {
            "delivered": self.stats.delivered,
            "parked": self.stats.parked,
            "retries": self.stats.retries,
            "backlog": self.backlog,
        }
