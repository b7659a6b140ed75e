"""The JSON log lines: sensitive fields never carry their value, everything else does."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import TextIO

import pytest

from agent import logs


@pytest.fixture
def captured(quiet_logs: TextIO) -> Iterator[io.StringIO]:
    sink = io.StringIO()
    logs.configure("info", sink)
    yield sink
    logs.configure("debug", quiet_logs)  # back to the session's sink, which is still open


def test_sensitive_fields_are_redacted_every_time(captured: io.StringIO) -> None:
    log = logs.get_logger("kami.test")
    for _ in range(2):  # the second line goes through the cached judgement of each name
        log.warning(
            "probe",
            secret="s3cr3t",
            API_SECRET="k",
            db_password="pw",
            Token="t",
            card_key="CARD-1",
            order_id="A-1",
            price=Decimal("9.90"),
            ledger=Path("/var/lib/kami"),
        )
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert len(lines) == 2
    for line in lines:
        for field in ("secret", "API_SECRET", "db_password", "Token", "card_key"):
            assert line[field] == "[redacted]", field
        assert line["order_id"] == "A-1"
        assert line["price"] == "Decimal('9.90')"  # not JSON: written as its repr
        assert line["ledger"] == repr(Path("/var/lib/kami"))
        assert line["event"] == "probe" and line["level"] == "warning"
    assert "s3cr3t" not in captured.getvalue() and "CARD-1" not in captured.getvalue()


def test_below_the_level_nothing_is_written(captured: io.StringIO) -> None:
    logs.get_logger("kami.test").debug("noise", detail="x")
    assert captured.getvalue() == ""
