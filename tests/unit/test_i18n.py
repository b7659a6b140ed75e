"""Chinese and English: the catalogs are complete and compiled, the language is chosen from
the config or the locale, and tables line up with CJK text."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.util import pathmatch

from agent.i18n import (
    CHINESE,
    ENGLISH,
    LOCALE_DIR,
    Translator,
    display_width,
    format_table,
    language_from_environment,
    normalise_language,
    pad,
    truncate,
)

ROOT = Path(__file__).resolve().parents[2]
PO = LOCALE_DIR / "zh_CN" / "LC_MESSAGES" / "kami.po"
MO = PO.with_suffix(".mo")


def _catalog():  # type: ignore[no-untyped-def]
    with PO.open("rb") as handle:
        return read_po(handle, locale="zh_CN")


def _extracted() -> set[str]:
    with (LOCALE_DIR / "babel.cfg").open() as handle:
        method_map, options_map = parse_mapping_cfg(handle)
    found = set()
    for _file, _line, message, _comments, _context in extract_from_dir(
        str(ROOT), method_map, options_map
    ):
        found.add(message if isinstance(message, str) else message[0])
    return found


def test_every_message_in_the_code_has_a_chinese_translation():
    catalog = _catalog()
    extracted = _extracted()
    assert len(extracted) > 100  # the extraction saw the console's templates and modules
    missing = sorted(m for m in extracted if not (catalog.get(m) and catalog.get(m).string))
    assert not missing, f"untranslated (pybabel extract/update, see docs/console.md): {missing}"
    fuzzy = sorted(m.id for m in catalog if m.id and m.fuzzy)
    assert not fuzzy, f"fuzzy translations to review: {fuzzy}"


def test_the_template_holds_every_message_and_every_speaking_module_is_extracted():
    """kami.pot is the extraction of today's code (pybabel extract, docs/console.md), and
    babel.cfg names every module that speaks through a translator (CLI, alerts, buyer
    notices, settings, console, bot): a module left out would ship English only."""
    from babel.messages.pofile import read_po as read_template

    with (LOCALE_DIR / "kami.pot").open("rb") as handle:
        template = {m.id if isinstance(m.id, str) else m.id[0] for m in read_template(handle)}
    assert template - {""} == _extracted()
    with (LOCALE_DIR / "babel.cfg").open() as handle:
        method_map, _options = parse_mapping_cfg(handle)
    speaking = {"agent/cli/common.py", "agent/alerts.py", "agent/buyer.py", "agent/domain.py"}
    for path in (ROOT / "agent").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if "Translator(" in text or ("from agent.cli.common import" in text and " _," in text):
            speaking.add(path.relative_to(ROOT).as_posix())
    patterns = [pattern for pattern, method in method_map if method == "python"]
    missing = sorted(p for p in speaking if not any(pathmatch(pat, p) for pat in patterns))
    assert not missing, f"add to agent/locale/babel.cfg: {missing}"


def test_placeholders_match_between_english_and_chinese():
    problems = [(m.id, errors) for m, errors in _catalog().check() if errors]
    assert not problems


def test_committed_mo_is_the_po_compiled():
    compiled = io.BytesIO()
    write_mo(compiled, _catalog())
    assert MO.read_bytes() == compiled.getvalue(), "run pybabel compile (docs/console.md)"


def test_translator():
    zh, en = Translator(CHINESE), Translator(ENGLISH)
    assert zh("Overview") == "概览" and en("Overview") == "Overview"
    assert zh("%(n)d min") % {"n": 5} == "5 分钟"
    assert Translator("fr").language == ENGLISH
    assert zh("a message nobody translated") == "a message nobody translated"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, ENGLISH),
        ({"LANG": "zh_CN.UTF-8"}, CHINESE),
        ({"LANG": "zh_TW.UTF-8"}, CHINESE),
        ({"LANG": "en_US.UTF-8"}, ENGLISH),
        ({"LANG": "C.UTF-8"}, ENGLISH),
        ({"LANG": "de_DE.UTF-8"}, ENGLISH),
        ({"LANG": "en_US.UTF-8", "LC_ALL": "zh_CN.UTF-8"}, CHINESE),
        ({"LANGUAGE": "fr:zh_CN", "LANG": "en_US.UTF-8"}, CHINESE),
        ({"LC_MESSAGES": "en_GB", "LANG": "zh_CN"}, ENGLISH),
    ],
)
def test_language_from_the_environment(environ: dict[str, str], expected: str):
    assert language_from_environment(environ) == expected


def test_normalise_language():
    assert normalise_language("zh-CN") == CHINESE
    assert normalise_language("zh_cn.utf8") == CHINESE
    assert normalise_language("EN") == ENGLISH
    assert normalise_language("ja") is None


def test_display_width_counts_cjk_as_two_cells():
    assert display_width("GAME-100") == 8
    assert display_width("王者荣耀点券") == 12
    assert display_width("Ｖ") == 2  # fullwidth Latin
    assert display_width("e\u0301") == 1  # a combining accent takes no cell
    assert pad("点券", 6) == "点券  " and pad("点券", 6, ">") == "  点券"
    assert truncate("王者荣耀点券100元", 9) == "王者荣耀…"
    assert display_width(truncate("王者荣耀点券100元", 9)) <= 9


def _column_starts(line: str, values: list[str]) -> list[int]:
    """The display offset where each value starts in the line."""
    starts, search_from = [], 0
    for value in values:
        index = line.index(value, search_from)
        starts.append(display_width(line[:index]))
        search_from = index + len(value)
    return starts


def test_table_columns_line_up_with_chinese_skus():
    rows = [
        ["GAME-100", "12", "3.5"],
        ["王者荣耀点券", "7", "10.0"],
        ["Steam 钱包 ¥50", "1234", "0.0"],
    ]
    lines = format_table(["SKU", "stock", "rate/h"], rows, aligns="<>>")
    widths = {display_width(line) for line in lines}
    assert len(widths) == 1  # every right-aligned row ends in the same cell
    starts = [_column_starts(line, row)[0] for line, row in zip(lines[1:], rows, strict=True)]
    assert set(starts) == {0}
    # The second column's right edge is the same on every row.
    edges = []
    for line, row in zip(lines[1:], rows, strict=True):
        start = _column_starts(line, row)[1]
        edges.append(start + display_width(row[1]))
    assert len(set(edges)) == 1
    # The naive way (what `status` does today) does not line up.
    naive = {display_width(f"{r[0]:<16}{r[1]:>6}") for r in rows}
    assert len(naive) > 1


def test_every_line_state_has_a_label() -> None:
    """A state added to the transition table shows under a name, in both languages."""
    from agent.console.labels import STATE_LABELS
    from agent.domain import LineState

    assert set(STATE_LABELS) == set(LineState)
