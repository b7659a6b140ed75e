"""The README's configuration table is the one agent.settings generates from the settings'
field metadata (issue 14, item 5): one table, every setting, with its range and unit."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from agent import notify
from agent.settings import SECTIONS, markdown_table, spec_of, toml_key

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- settings table:"
END = "<!-- end of settings table -->"


def readme_table() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n", text.index(BEGIN)) + 1
    return text[start : text.index(END)]


def test_the_readme_table_is_the_generated_one() -> None:
    assert readme_table() == markdown_table(), (
        "README.md's configuration table is stale: replace it with the output of"
        " `python -m agent.settings --markdown`"
    )


def test_the_command_prints_the_table() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "agent.settings", "--markdown"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert printed == markdown_table()


def test_one_table_with_every_setting_its_range_and_unit() -> None:
    table = readme_table()
    lines = table.splitlines()
    assert all(line.startswith("| ") for line in lines), "a blank line would split the table"
    keys = {line.split(" | ")[0].removeprefix("| ") for line in lines[2:]}
    for prefix, cls in SECTIONS:
        for f in dataclasses.fields(cls):
            if spec_of(f) is not None:
                assert f"`{prefix}.{toml_key(f)}`" in keys
    for kind in notify.KINDS:
        for f in dataclasses.fields(notify.kind_module(kind).Options):
            assert f"`notify.<name>.{toml_key(f)}` ({kind})" in keys
    [outbox] = [line for line in lines if line.startswith("| `alerts.outbox_interval`")]
    assert outbox == (
        "| `alerts.outbox_interval` | 5 | 0.05 to 3600 seconds"
        " | between attempts to send the alert messages waiting in the outbox |"
    )
