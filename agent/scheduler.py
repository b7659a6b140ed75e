"""APScheduler wiring: one poll job per platform account, reconcile, sweep, watchdog."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
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


def build_scheduler(
    engine: Engine, settings: AgentSettings, watchdog: tuple[float, JobFunc] | None = None
) -> AsyncIOScheduler:
    # "max instances reached" is expected when a poll outlasts its interval; not news.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    scheduler = AsyncIOScheduler(timezone=UTC)
    now = datetime.now(UTC)
    common = {"coalesce": True, "max_instances": 1, "misfire_grace_time": None}

    def poll_job(name: str) -> JobFunc:
        async def poll() -> int:
            return await engine.poll(name)

        return poll

    for name in engine.platforms:
        scheduler.add_job(
            guarded(f"poll:{name}", poll_job(name)),
            "interval",
            seconds=settings.poll_interval,
            id=f"poll:{name}",
            next_run_time=now,
            **common,
        )
    scheduler.add_job(
        guarded("reconcile", engine.reconcile_all),
        "interval",
        seconds=settings.reconcile_interval,
        id="reconcile",
        next_run_time=now,  # catch-up on orders paid while we were down
        **common,
    )
    if engine.suppliers:
        scheduler.add_job(
            guarded("balances", engine.poll_balances),
            "interval",
            seconds=settings.balance_interval,
            id="balances",
            next_run_time=now,
            **common,
        )
    scheduler.add_job(
        guarded("sweep", engine.sweep),
        "interval",
        seconds=settings.sweep_interval,
        id="sweep",
        **common,
    )
    if watchdog is not None:
        interval, ping = watchdog
        scheduler.add_job(
            guarded("watchdog", ping), "interval", seconds=interval, id="watchdog", **common
        )
    return scheduler
