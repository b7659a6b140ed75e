from __future__ import annotations

import io

from agent import logs
from agent.demo import DemoPlan, run_demo


async def test_demo_delivers_the_whole_burst() -> None:
    out = io.StringIO()
    try:
        code = await run_demo(DemoPlan(steady_orders=30, steady_rate=100, burst=120), out)
    finally:
        logs.configure("debug", io.StringIO())  # the demo closed its own log file
    text = out.getvalue()
    assert code == 0, text
    assert "burst delivered         120/120" in text
    assert "invariants              ok" in text
    assert "needs attention         " in text  # the two hostile orders were parked
