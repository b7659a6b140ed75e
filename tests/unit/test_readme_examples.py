"""The README's platform configuration examples are what a new merchant copies: each must load
as written (with a ledger path and the SKU it names)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from agent.config import parse_config

README = Path(__file__).resolve().parents[2] / "README.md"


def _platform_examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Selling platforms") : text.index("## Platforms that call")]
    return re.findall(r"```toml\n(.*?)```", section, re.S)


@pytest.mark.parametrize("block", _platform_examples())
def test_each_platform_example_loads(block: str, tmp_path: Path) -> None:
    data = tomllib.loads(block)
    data.setdefault("store", {"path": "kami.db"})
    data.setdefault("skus", {"GAME-100": {}})
    config = parse_config(data, tmp_path / "config.toml")
    assert config.platforms


def test_every_platform_kind_has_an_example_or_a_page() -> None:
    from agent.platforms import KINDS

    text = README.read_text(encoding="utf-8")
    for kind in KINDS:
        assert f"| `{kind}` |" in text, kind
