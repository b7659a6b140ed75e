"""The demo leaves nothing readable by other users of the machine in its temp folder."""

from __future__ import annotations

import io
import re
import stat
from pathlib import Path
from typing import TextIO

from agent import logs
from agent.demo import DemoPlan, run_demo


async def test_the_demo_log_and_ledger_are_private(quiet_logs: TextIO) -> None:
    out = io.StringIO()
    try:
        await run_demo(DemoPlan(steady_orders=20, steady_rate=100, burst=20), out)
    finally:
        logs.configure("debug", quiet_logs)  # the demo closed its own log file
    found = re.search(r"logs\s+(\S+)", out.getvalue())
    assert found is not None, out.getvalue()
    assert_private(Path(found.group(1)))


def assert_private(log_path: Path) -> None:
    assert log_path.stat().st_size > 0
    for path in [log_path.parent, *log_path.parent.iterdir()]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.name} is {oct(mode)}: readable by others"
