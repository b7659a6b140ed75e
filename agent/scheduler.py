"""The daemon's periodic jobs: one poll per platform account, reconcile, balances, sweep.

They run on the monotonic clock (agent/periodic.py says why not on APScheduler)."""

from __future__ import annotations

from collections.abc import Sequence

from agent.config import AgentSettings
from agent.engine import Engine
from agent.periodic import Job, JobFunc, Periodic

__all__ = ["Job", "JobFunc", "build_scheduler"]


def build_scheduler(engine: Engine, settings: AgentSettings, extra: Sequence[Job] = ()) -> Periodic:
    """Every periodic job of the engine, and `extra`; start() starts them."""

    jobs = [
        Job(f"poll:{name}", intake.scheduled_poll, settings.poll_interval, at_start=True)
        for name, intake in engine.intakes.items()
    ]
    # at start: catch up on orders paid while we were down
    jobs.append(Job("reconcile", engine.reconcile_all, settings.reconcile_interval, True))
    if engine.suppliers:
        jobs.append(Job("balances", engine.poll_balances, settings.balance_interval, True))
    jobs.append(Job("sweep", engine.sweep, settings.sweep_interval))
    jobs.extend(extra)
    return Periodic(jobs)
