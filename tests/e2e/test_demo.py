from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TextIO

from agent import logs
from agent.demo import DemoPlan, run_demo
from agent.sandbox.platform import SandboxPlatform
from tests.helpers import ledger_bytes


def files_to_scan(log_path: Path) -> dict[str, bytes]:
    return {"log file": log_path.read_bytes(), "ledger": ledger_bytes(log_path.parent)}


async def test_demo_delivers_the_whole_burst(quiet_logs: TextIO) -> None:
    out = io.StringIO()
    witness: list[SandboxPlatform] = []
    try:
        code = await run_demo(DemoPlan(steady_orders=100, steady_rate=100, burst=200), out, witness)
    finally:
        logs.configure("debug", quiet_logs)  # the demo closed its own log file
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

    # Log scan: no delivered card key appears in clear in the output, the JSON log or the ledger
    (sandbox,) = witness
    delivered = [s for keys in sandbox.delivered_secrets().values() for s in keys]
    codes = [i["code"] for o in sandbox.orders.values() if o.delivery for i in o.delivery["items"]]
    assert len(delivered) > 300
    log_path = Path(re.search(r"logs\s+(\S+)", text).group(1))  # type: ignore[union-attr]
    scanned = {"demo output": text.encode(), **files_to_scan(log_path)}
    assert len(scanned["log file"]) > 10_000  # the log really has content
    for where, blob in scanned.items():
        leaked = [k for k in delivered + codes if k.encode() in blob]
        assert leaked == [], f"{len(leaked)} card keys in clear in the {where}"
