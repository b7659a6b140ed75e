from __future__ import annotations

from pathlib import Path

from agent.domain import CardItem
from agent.stockfile import StockFileReader


def read(tmp_path: Path, content: bytes) -> tuple[list[CardItem], StockFileReader]:
    path = tmp_path / "keys.txt"
    path.write_bytes(content)
    reader = StockFileReader(path)
    return list(reader), reader


def test_one_key_per_line(tmp_path: Path) -> None:
    items, reader = read(tmp_path, b"AAAA-1111\n\n  BBBB-2222  \n# comment\nCCCC-3333")
    assert [i.secret for i in items] == ["AAAA-1111", "BBBB-2222", "CCCC-3333"]
    assert all(i.code == "" for i in items)
    assert reader.rejected == 0
    assert reader.count_lines() == 5  # the last line has no newline: still a line


def test_csv_with_header_and_quotes(tmp_path: Path) -> None:
    content = '\ufeffcode,secret\nC1,S1\n"C,2","S 2"\nC3\tS3\n'.encode()
    items, reader = read(tmp_path, content)
    assert items == [CardItem("C1", "S1"), CardItem("C,2", "S 2"), CardItem("C3", "S3")]
    assert reader.rejected == 0


def test_chinese_header_is_skipped(tmp_path: Path) -> None:
    items, _ = read(tmp_path, "卡号,密码\n1001,abc\n".encode())
    assert items == [CardItem("1001", "abc")]


def test_bad_lines_are_rejected_by_number_not_content(tmp_path: Path) -> None:
    content = b"GOOD1\na,b,c\nC1,\n" + b"x" * 600 + b"\n\xff\xfe\nctl\x01x\nGOOD2\n"
    items, reader = read(tmp_path, content)
    assert [i.secret for i in items] == ["GOOD1", "GOOD2"]
    assert reader.rejected == 5
    assert reader.samples[0] == "line 2: the expiry field is not a date (YYYY-MM-DD)"
    assert all("GOOD" not in s and "xxx" not in s for s in reader.samples)
