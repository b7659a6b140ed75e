"""Periodic jobs timed by the monotonic clock, immune to steps of the wall clock.

APScheduler 3.x (the project's scheduler dependency) computes every wait from the wall clock
(`datetime.now`): stepped back by N seconds (NTP correcting a bad hardware clock, a VM
resumed from a snapshot, an operator's `date -s`), each interval job waited N seconds more.
A 200 s step gave 0 platform requests for about 210 s, and since the watchdog ping was a
job too, systemd restarted the daemon for any step over WatchdogSec. Every job the daemon
has means "every N seconds", where the wall clock has nothing to say, so none of them runs
on APScheduler any more: each job is its own asyncio task that sleeps on the event loop's
clock (`loop.time()`, monotonic). APScheduler remains the tool for a job at a time of day,
should one come, where the wall clock is the point; the daemon has none today.

What the daemon relied on from APScheduler is kept: a job never runs twice at once; runs
missed while one outlasted its interval are dropped, not caught up (its next run is the next
tick of its own grid); a job's error is logged and the job goes on.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

from agent.logs import get_logger

JobFunc = Callable[[], Awaitable[object]]
log = get_logger("kami.periodic")
# How long a stop waits for cancelled tasks to end: they normally end at once.
STOP_GRACE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    func: JobFunc
    every: float  # seconds
    at_start: bool = False  # also run right away


def next_tick(due: float, every: float, now: float) -> float:
    """The first tick of the grid `due + k * every` (k >= 1) that is not in the past: runs
    that fell while the last one was still going are skipped, as APScheduler coalesced them."""
    due += every
    if due < now:
        due += every * math.ceil((now - due) / every)
    return due


async def run_job(job: Job) -> None:
    """Runs `job` on its grid until cancelled."""
    loop = asyncio.get_running_loop()
    due = loop.time() + (0.0 if job.at_start else job.every)
    while True:
        await asyncio.sleep(max(0.0, due - loop.time()))
        try:
            await job.func()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being stopped
            # A cancellation from inside the job (an inner call's): its failure, not ours.
            log.warning("job_cancelled", job=job.name)
        except Exception:
            log.exception("job_failed", job=job.name)
        due = next_tick(due, job.every, loop.time())


class Periodic:
    """The daemon's periodic jobs, one task each."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self.jobs = tuple(jobs)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(run_job(j), name=f"job:{j.name}") for j in self.jobs]

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Cancels every job, a run under way included (each is safe to interrupt: the
        ledger commits before anything moves on), and waits until they have ended (see
        cancel_all)."""
        await cancel_all(self._tasks, grace)
        self._tasks.clear()


async def cancel_all(
    tasks: Collection[asyncio.Task[None]], grace: float = STOP_GRACE_SECONDS
) -> None:
    """Cancels the tasks and waits until they have ended, `grace` seconds at most: a task
    that holds on to its cancellation (a driver waiting on a dead connection) is named in
    the log and left behind, it must not keep the daemon from draining and exiting."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=grace)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: asyncio would report it at exit otherwise
    if pending:
        log.warning("tasks_did_not_stop", tasks=sorted(t.get_name() for t in pending))
