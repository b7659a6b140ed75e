from __future__ import annotations

import io
import re

from agent import logs
from agent.demo import DemoPlan, run_demo


async def test_demo_delivers_the_whole_burst() -> None:
    out = io.StringIO()
    try:
        code = await run_demo(DemoPlan(steady_orders=100, steady_rate=100, burst=200), out)
    finally:
        logs.configure("debug", io.StringIO())  # the demo closed its own log file
    text = out.getvalue()
    assert code == 0, text
    assert "burst delivered         200/200" in text
    assert "invariants              ok" in text
    assert "needs attention         " in text  # the two hostile orders were parked
    # GIFT-50 orders outnumber its 40 local keys: the supplier took over
    bought = re.search(r"GIFT-50: 40 local keys ran out; (\d+) purchases", text)
    assert bought is not None and int(bought.group(1)) > 0, text
    # TOPUP-10 runs out: the alert came before any order had to wait
    assert re.search(r"TOPUP-10 alert at t=[\d.]+s, [\d.]+s before the first order", text), text
