"""APScheduler wiring: one poll job per platform account, reconcile, sweep, watchdog."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from agent.config import AgentSettings
from agent.engine import Engine
from agent.logs import get_logger

JobFunc = Callable[[], Awaitable[object]]
log = get_logger("kami.scheduler")


def guarded(name: str, func: JobFunc) -> Callable[[], Awaitable[None]]:
    """Job errors go to our JSON log; a job cancelled by shutdown is not an error."""

    async def job() -> None:
        try:
            await func()
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("job_failed", job=name)

    return job


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    func: JobFunc
    every: float  # seconds
    at_start: bool = False  # also run right away


def build_scheduler(
    engine: Engine, settings: AgentSettings, extra: Sequence[Job] = ()
) -> AsyncIOScheduler:
    """Every periodic job: coalesced, one instance at a time, errors to our log."""
    # "max instances reached" is expected when a poll outlasts its interval; not news.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)

    def poll_job(name: str) -> JobFunc:
        async def poll() -> int:
            return await engine.scheduled_poll(name)

        return poll

    jobs = [
        Job(f"poll:{name}", poll_job(name), settings.poll_interval, at_start=True)
        for name in engine.platforms
    ]
    # at start: catch up on orders paid while we were down
    jobs.append(Job("reconcile", engine.reconcile_all, settings.reconcile_interval, True))
    if engine.suppliers:
        jobs.append(Job("balances", engine.poll_balances, settings.balance_interval, True))
    jobs.append(Job("sweep", engine.sweep, settings.sweep_interval))
    jobs.extend(extra)

    scheduler = AsyncIOScheduler(timezone=UTC)
    now = datetime.now(UTC)
    for job in jobs:
        start = {"next_run_time": now} if job.at_start else {}
        scheduler.add_job(
            guarded(job.name, job.func),
            "interval",
            seconds=job.every,
            id=job.name,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
            **start,
        )
    return scheduler
