"""The engine's clock: wall-clock time that never steps back while the daemon runs.

The ledger keeps wall-clock times (when a line was seen, when its next attempt is due), since
they must outlive the process and mean the same to every agent sharing a PostgreSQL ledger.
But a wall clock can be stepped back (NTP correcting a fast clock, an operator's `date -s`):
with plain time.time(), a retry or a delayed delivery due in five seconds would wait for the
clock to come back to where it was, the size of the step (200 s in issue 13's audit). The
periodic jobs already run on the monotonic clock (agent/periodic.py); this is the rest.

ForwardClock reads the wall clock and carries it forward on the monotonic clock: a step
forward is taken at once (time only gains), a step back is ignored until the wall clock has
caught up, so what is due is due when it was due. Times written meanwhile continue the
timeline from before the step. A restart takes the wall clock as it is.
"""

from __future__ import annotations

import time

from agent.logs import get_logger

log = get_logger("kami.clock")
NOTICED_STEP = 1.0  # seconds back before the step is logged (slews move far less)


class ForwardClock:
    """time.time() that does not go back (see the module docstring)."""

    __slots__ = ("_behind", "_mono", "_wall")

    def __init__(self) -> None:
        self._wall = time.time()
        self._mono = time.monotonic()
        self._behind = False

    def __call__(self) -> float:
        wall, mono = time.time(), time.monotonic()
        carried = self._wall + (mono - self._mono)
        if wall >= carried:
            self._wall, self._mono = wall, mono
            if self._behind:
                self._behind = False
                log.info("wall_clock_caught_up")
            return wall
        if not self._behind and carried - wall > NOTICED_STEP:
            self._behind = True
            log.warning(
                "wall_clock_stepped_back",
                seconds=round(carried - wall, 3),
                action="timing carried on the monotonic clock until it catches up",
            )
        return carried
