"""Stopping the periodic jobs and the daemon's background tasks never waits for ever."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TextIO

from agent import logs
from agent.periodic import Job, Periodic
from tests.helpers import SAFETY_TIMEOUT


async def test_stop_leaves_a_job_that_holds_on_to_its_cancellation(
    tmp_path: Path, quiet_logs: TextIO
) -> None:
    release = asyncio.Event()
    running = asyncio.Event()

    async def stubborn() -> None:
        # Like a driver call waiting on a dead connection that swallows the cancellation.
        running.set()
        while True:
            try:
                await release.wait()
                return
            except asyncio.CancelledError:
                if release.is_set():  # the test is over: let it end
                    raise

    periodic = Periodic([Job("stubborn", stubborn, every=3600, at_start=True)])
    log_file = tmp_path / "log.jsonl"
    with log_file.open("w", encoding="utf-8") as sink:
        logs.configure("info", sink)
        try:
            periodic.start()
            await asyncio.wait_for(running.wait(), SAFETY_TIMEOUT)
            # Before: stop() waited until every job had ended, so the daemon never drained.
            await asyncio.wait_for(periodic.stop(), SAFETY_TIMEOUT)  # 5 s of grace
        finally:
            release.set()
            left = [t for t in asyncio.all_tasks() if t.get_name() == "job:stubborn"]
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            logs.configure("debug", quiet_logs)
    events = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()]
    stuck = [e for e in events if e["event"] == "tasks_did_not_stop"]
    assert stuck and stuck[0]["tasks"] == ["job:stubborn"]
