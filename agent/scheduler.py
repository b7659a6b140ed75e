"""APScheduler wiring: one poll job per platform account, reconcile, sweep, watchdog."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from agent.config import AgentSettings
from agent.engine import Engine

JobFunc = Callable[[], Awaitable[object]]


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
            poll_job(name),
            "interval",
            seconds=settings.poll_interval,
            id=f"poll:{name}",
            next_run_time=now,
            **common,
        )
    scheduler.add_job(
        engine.reconcile_all,
        "interval",
        seconds=settings.reconcile_interval,
        id="reconcile",
        next_run_time=now,  # catch-up on orders paid while we were down
        **common,
    )
    scheduler.add_job(
        engine.sweep, "interval", seconds=settings.sweep_interval, id="sweep", **common
    )
    if watchdog is not None:
        interval, ping = watchdog
        scheduler.add_job(ping, "interval", seconds=interval, id="watchdog", **common)
    return scheduler
