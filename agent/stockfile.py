"""Reads card keys from a stock file: one key per line, or CSV `code,secret`.

Bad lines are counted and described (by line number, never by content: a rejected line may
still be a real key), good lines are yielded as CardItems.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.domain import CardItem

MAX_FIELD_LENGTH = 512
MAX_SAMPLES = 10
_HEADER_WORDS = {"code", "secret", "card", "key", "password", "卡号", "密码", "卡密"}


@dataclass
class StockFileReader:
    path: Path
    rejected: int = 0
    samples: list[str] = field(default_factory=list)

    def count_lines(self) -> int:
        total = 0
        with self.path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                total += chunk.count(b"\n")
        return total

    def _reject(self, line_number: int, why: str) -> None:
        self.rejected += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(f"line {line_number}: {why}")

    def __iter__(self) -> Iterator[CardItem]:
        with self.path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                item = self._parse(number, raw)
                if item is not None:
                    yield item

    def _parse(self, number: int, raw: bytes) -> CardItem | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._reject(number, "not valid UTF-8")
            return None
        if number == 1:
            text = text.removeprefix("\ufeff")
        text = text.strip()
        if not text or text.startswith("#"):
            return None
        if "," in text or "\t" in text or '"' in text:
            fields = [f.strip() for f in next(csv.reader([text], dialect=_dialect(text)))]
        else:
            fields = [text]
        if number == 1 and {f.lower() for f in fields} <= _HEADER_WORDS:
            return None  # a header row
        if len(fields) == 1:
            code, secret = "", fields[0]
        elif len(fields) == 2:
            code, secret = fields
        else:
            self._reject(number, f"{len(fields)} fields (expected secret, or code,secret)")
            return None
        if not secret:
            self._reject(number, "empty secret")
            return None
        if len(secret) > MAX_FIELD_LENGTH or len(code) > MAX_FIELD_LENGTH:
            self._reject(number, f"longer than {MAX_FIELD_LENGTH} characters")
            return None
        if any(ch < " " or ch == "\x7f" for ch in code + secret):
            self._reject(number, "contains control characters")
            return None
        return CardItem(code=code, secret=secret)


def _dialect(text: str) -> type[csv.Dialect]:
    return csv.excel_tab if "\t" in text and "," not in text else csv.excel
