"""Reads card keys from a stock file as merchants have them.

One key per line, CSV or tab-separated `code,secret` or `code,secret,expiry`, in UTF-8 (with or
without BOM), UTF-16/32 with a BOM (Excel's "Unicode text"), GBK/GB18030 (detected, or named
with `encoding`), or an Excel workbook (.xlsx, with the `xlsx` extra: openpyxl).

Header rows (`card_no,card_pwd`, `账号,密码`, `卡号,卡密,有效期`) are recognised and skipped,
and name the columns; a first row that only may be one is refused until the merchant says
(`header=True/False`). Bad lines are counted and described by line number and reason, never
by content: a rejected line may still be a real key. Keys whose expiry date has passed are
rejected the same way.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from agent.domain import AgentError, CardItem
from agent.i18n import ENGLISH, N_, Translator

MAX_FIELD_LENGTH = 512
MAX_SAMPLES = 10
# Per reason, how many runs of line numbers are kept for the report (counts are kept whole).
MAX_RANGES_PER_REASON = 200
# Excel keeps 15 significant digits of a number: a longer card number typed into a number
# cell has already lost its last digits.
EXCEL_DIGITS = 10**15


class StockFileError(AgentError):
    """The file cannot be read as a stock file at all, or needs the merchant's word first."""


# Header words, normalised (lower case, without spaces, '_', '-', '.', ':' and brackets).
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_CODE_WORDS = _words(
    "code card cardno cardnum cardnumber cardid number no serial serialno serialnumber sn "
    "account acct user username login id 卡号 账号 帐号 账户 帐户 用户名 序列号 编号 卡编号"
)
_SECRET_WORDS = _words(
    "secret key cdkey cdk cardkey pwd password pass passwd pin cardpwd cardpass cardpassword "
    "cardsecret redeemcode activationcode giftcode voucher license licensekey serialkey token "
    "密码 卡密 密钥 兑换码 激活码 卡券 券码 口令"
)
_EXPIRY_WORDS = _words(
    "expiry expires expire expiration expirydate expirationdate expiresat expireat validuntil "
    "validto valid exp date 有效期 有效期至 过期时间 到期时间 失效时间 截止日期 到期日 过期日期 "
    "有效日期"
)
_HEADER_WORDS = _CODE_WORDS | _SECRET_WORDS | _EXPIRY_WORDS
_NORMALISE = re.compile(r"[\s_\-.:()（）\[\]：]+")
# A field made of words only (any script), no digits: what a header cell looks like.
_WORDY = re.compile(r"^[^\W\d]+(?:[ _\-./][^\W\d]+)*$")

# (byte order mark, codec, how the report describes the file: translated where shown)
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32", N_("UTF-32 (BOM)")),
    (codecs.BOM_UTF32_BE, "utf-32", N_("UTF-32 (BOM)")),
    (codecs.BOM_UTF8, "utf-8-sig", N_("UTF-8 (BOM)")),
    (codecs.BOM_UTF16_LE, "utf-16", N_("UTF-16 (BOM, Excel Unicode text)")),
    (codecs.BOM_UTF16_BE, "utf-16", N_("UTF-16 (BOM)")),
)


def _word(text: str) -> str:
    return _NORMALISE.sub("", text.strip().lower())


@dataclass
class Rejections:
    """Every rejected line, by reason: a count and the runs of line numbers (never content)."""

    total: int = 0
    by_reason: dict[str, list[list[int]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    sink: IO[str] | None = None  # every rejected line, one `line,reason` row, when asked
    # The reasons arrive already in the merchant's language; the report's own words too.
    translator: Translator = field(default_factory=lambda: Translator(ENGLISH))

    def add(self, line: int, why: str) -> None:
        self.total += 1
        self.counts[why] = self.counts.get(why, 0) + 1
        runs = self.by_reason.setdefault(why, [])
        if runs and runs[-1][1] == line - 1:
            runs[-1][1] = line
        elif len(runs) < MAX_RANGES_PER_REASON:
            runs.append([line, line])
        if self.sink is not None:
            self.sink.write(f"{line},{why}\n")

    def report(self) -> list[str]:
        """One line per reason: `lines 2, 7-9: why (3 lines)`."""
        out = []
        for why, runs in self.by_reason.items():
            shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
            listed = sum(b - a + 1 for a, b in runs)
            more = self.counts[why] - listed
            _ = self.translator
            if more:
                shown = _("%(lines)s, and %(n)d more") % {"lines": shown, "n": more}
            out.append(
                _.ngettext(
                    "line %(lines)s: %(why)s (%(n)d)",
                    "lines %(lines)s: %(why)s (%(n)d)",
                    self.counts[why],
                )
                % {"lines": shown, "why": why, "n": self.counts[why]}
            )
        return out


@dataclass(frozen=True)
class Columns:
    """Which field holds what; -1: none."""

    code: int
    secret: int
    expiry: int
    width: int


def _positional(width: int) -> Columns | None:
    if width == 1:
        return Columns(-1, 0, -1, 1)
    if width == 2:
        return Columns(0, 1, -1, 2)
    if width == 3:
        return Columns(0, 1, 2, 3)
    return None


def _columns_from_header(fields: Sequence[Any]) -> Columns | None:
    """The columns a recognised header names, or None when it does not say clearly."""
    words = [_word(str(f)) for f in fields]
    roles: dict[str, int] = {}
    for index, w in enumerate(words):
        # "code" names the card number beside a secret column ("code,secret"), the key itself
        # when it stands alone.
        if w in _EXPIRY_WORDS:
            role = "expiry"
        elif w in _SECRET_WORDS:
            role = "secret"
        elif w in _CODE_WORDS:
            role = "code"
        else:
            return None
        if role in roles:
            return _positional(len(fields))
        roles[role] = index
    if "secret" not in roles:
        if "code" not in roles:
            return None
        roles = {"secret": roles["code"], **{k: v for k, v in roles.items() if k != "code"}}
    return Columns(roles.get("code", -1), roles["secret"], roles.get("expiry", -1), len(fields))


def is_header(fields: Sequence[Any]) -> bool:
    return bool(fields) and all(_word(str(f)) in _HEADER_WORDS for f in fields)


def _looks_like_header(fields: Sequence[Any]) -> bool:
    return bool(fields) and all(_WORDY.match(str(f).strip()) for f in fields if str(f).strip())


def _has_digit(fields: Sequence[Any]) -> bool:
    return any(any(ch.isdigit() for ch in str(f)) for f in fields)


def parse_expiry(value: Any) -> datetime | None:
    """The moment a key stops being valid, or None when `value` is no date. A date without
    a time is valid through that whole day (local time)."""
    if isinstance(value, datetime):
        if (value.hour, value.minute, value.second) == (0, 0, 0) and value.tzinfo is None:
            return value + timedelta(days=1)
        return value
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day) + timedelta(days=1)
    text = str(value).strip()
    for form in ("%Y-%m-%d", "%Y/%m/%d", "%Y.%m.%d", "%Y%m%d", "%Y年%m月%d日"):
        try:
            return datetime.strptime(text, form) + timedelta(days=1)
        except ValueError:
            pass
    for form in ("%Y/%m/%d %H:%M:%S", "%Y/%m/%d %H:%M"):
        try:
            return datetime.strptime(text, form)
        except ValueError:
            pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _is_past(moment: datetime, now: datetime) -> bool:
    if moment.tzinfo is not None:
        return moment <= now.astimezone()
    return moment <= now


@dataclass
class StockFileReader:
    """Iterate it for the good keys; `prepare()` first decides (and may refuse) how the file
    is read. Without `prepare()`, iteration reads what it can and rejects the rest."""

    path: Path
    encoding: str | None = None  # None: detect
    header: bool | None = None  # None: detect; True: the first row is one; False: no header
    sheet: str | None = None  # .xlsx: which sheet (default: the first)
    now: datetime = field(default_factory=datetime.now)
    rejections: Rejections = field(default_factory=Rejections)
    skipped: list[str] = field(default_factory=list)  # header rows, described
    lines_read: int = 0
    expiring: int = 0  # keys with an expiry date still ahead (stored with the key)
    described: str = ""  # how the file was read, for the report
    stop_requested: bool = False
    # The merchant's language for reasons, skipped rows and errors (the CLI's, the console's).
    translator: Translator = field(default_factory=lambda: Translator(ENGLISH))
    _kind: str | None = None  # "text" | "xlsx"
    _columns: Columns | None = None
    _first_is_header: bool = False

    # --- what callers read ---------------------------------------------------------------
    @property
    def rejected(self) -> int:
        return self.rejections.total

    @property
    def samples(self) -> list[str]:
        """The first rejected lines as `line N: why` (at most MAX_SAMPLES)."""
        out: list[tuple[int, str]] = []
        for why, runs in self.rejections.by_reason.items():
            for a, b in runs:
                out.extend((n, why) for n in range(a, min(b, a + MAX_SAMPLES) + 1))
        return [
            self._("line %(n)d: %(why)s") % {"n": n, "why": why}
            for n, why in sorted(out)[:MAX_SAMPLES]
        ]

    @property
    def _(self) -> Translator:
        return self.translator

    def prepare(self) -> None:
        """Opens the file and decides its format, encoding and header; raises StockFileError
        with one line when it cannot be read or when only the merchant can decide."""
        self._decide(strict=True)

    def count_lines(self) -> int:
        """Rows in the file (for progress): lines of text, or the sheet's rows."""
        if self._kind is None:
            self._decide(strict=False)
        if self._kind == "xlsx":
            book, sheet, handle = self._worksheet()
            with handle:
                rows = int(sheet.max_row or 0)
                book.close()
            return rows
        if (self.encoding or "").startswith(("utf-16", "utf-32")):
            with self._text() as text:
                return sum(1 for _ in text)
        total = 0
        last = b"\n"
        with self._open_binary() as handle:
            while chunk := handle.read(1 << 20):
                total += chunk.count(b"\n")
                last = chunk[-1:]
        return total + (last != b"\n")

    def __iter__(self) -> Iterator[CardItem]:
        if self._kind is None:
            self._decide(strict=False)
        self.rejections.translator = self.translator
        started = False
        for number, fields in self._rows():
            self.lines_read = number
            if self.stop_requested:
                return
            if not fields:
                continue
            if not started:
                started = True
                if self._first_is_header:
                    # forced with header=True, the row may be anything: never shown
                    self._skip_header(number, fields, show=self.header is not True)
                    continue
            elif self.header is not False and len(fields) > 1 and is_header(fields):
                # files put together from several exports repeat their header
                self._skip_header(number, fields, show=True)
                continue
            item = self._item(number, fields)
            if item is not None:
                yield item

    def chunks(self, size: int) -> Iterator[list[CardItem]]:
        """The good keys in lists of `size` (the last shorter); stops when asked to."""
        chunk: list[CardItem] = []
        for item in self:
            chunk.append(item)
            if len(chunk) >= size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    # --- deciding how to read --------------------------------------------------------------
    def _decide(self, *, strict: bool) -> None:
        _, file = self._, {"file": self.path}
        if not self.path.exists():
            raise StockFileError(_("stock file %(file)s does not exist") % file)
        if self.path.is_dir():
            raise StockFileError(_("stock file %(file)s is a directory, not a file") % file)
        if not self.path.is_file():
            raise StockFileError(_("stock file %(file)s is not a regular file") % file)
        try:
            with self.path.open("rb") as handle:
                head = handle.read(8)
        except OSError as exc:
            raise StockFileError(self._unreadable(exc)) from None
        if head.startswith(b"\xd0\xcf\x11\xe0"):
            raise StockFileError(
                _("%(file)s is an old Excel .xls workbook: save it as .xlsx or CSV (UTF-8)") % file
            )
        if head.startswith(b"PK\x03\x04"):
            self._kind = "xlsx"
            self.described = _("Excel workbook")
        else:
            self._kind = "text"
            self._choose_encoding(head, strict=strict)
        self._decide_header(strict=strict)

    def _unreadable(self, exc: OSError) -> str:
        return self._("cannot read stock file %(file)s: %(why)s") % {
            "file": self.path,
            "why": _why(exc),
        }

    def _choose_encoding(self, head: bytes, *, strict: bool) -> None:
        _ = self._
        if self.encoding is not None:
            try:
                self.encoding = codecs.lookup(self.encoding).name
            except LookupError:
                raise StockFileError(
                    _("unknown encoding %(name)r (e.g. utf-8, gb18030, utf-16)")
                    % {"name": self.encoding}
                ) from None
            self.described = _("%(encoding)s (as asked)") % {"encoding": self.encoding}
            return
        for bom, name, text in _BOMS:
            if head.startswith(bom):
                self.encoding, self.described = name, _(text)
                return
        utf8_ok = utf8_bad = gb_ok = 0
        nul = False
        with self._open_binary() as handle:
            while chunk := handle.read(1 << 20):
                nul = nul or b"\x00" in chunk
                if chunk.isascii():
                    continue
                for line in chunk.splitlines():  # a line cut by the chunk edge: judged twice
                    if line.isascii():
                        continue
                    try:
                        line.decode("utf-8")
                        utf8_ok += 1
                        continue
                    except UnicodeDecodeError:
                        utf8_bad += 1
                    try:
                        line.decode("gb18030")
                        gb_ok += 1
                    except UnicodeDecodeError:
                        pass
        if nul and strict:
            raise StockFileError(
                _(
                    "%(file)s holds NUL bytes: UTF-16 without a byte order mark? Pass"
                    " --encoding utf-16-le (or utf-16-be), or save it as UTF-8"
                )
                % {"file": self.path}
            )
        if not utf8_ok and gb_ok and gb_ok == utf8_bad:
            self.encoding, self.described = "gb18030", _("GBK/GB18030 (detected)")
            return
        # No line reads as GB either: UTF-8 with broken lines, which are rejected one by one.
        if not utf8_bad or not gb_ok or not strict:
            self.encoding, self.described = "utf-8", "UTF-8"
            return
        raise StockFileError(
            _(
                "cannot tell the encoding of %(file)s: %(ok)d line(s) with non-ASCII text read"
                " as UTF-8 and %(bad)d do not (GBK?); pass --encoding utf-8 or --encoding gb18030"
            )
            % {"file": self.path, "ok": utf8_ok, "bad": utf8_bad}
        )

    def _decide_header(self, *, strict: bool) -> None:
        first: list[str] | None = None
        second: list[str] | None = None
        for _, fields in self._rows():
            if not fields:
                continue
            if first is None:
                first = fields
                continue
            second = fields
            break
        self._first_is_header = False
        if first is None:
            return
        if self.header is True:
            self._first_is_header = True
            self._columns = _columns_from_header(first)
            return
        if self.header is False:
            return
        if is_header(first):
            self._first_is_header = True
            self._columns = _columns_from_header(first)
            return
        doubtful = (
            _looks_like_header(first)
            and not _has_digit(first)
            and second is not None
            and _has_digit(second)
        )
        if doubtful and strict:
            raise StockFileError(
                self._(
                    "the first row of %(file)s may be a header (no digits, unlike the next row):"
                    " pass --header to skip it, or --no-header to import it as a key"
                )
                % {"file": self.path}
            )

    # --- reading rows -------------------------------------------------------------------------
    def _open_binary(self) -> IO[bytes]:
        try:
            return self.path.open("rb")
        except OSError as exc:
            raise StockFileError(self._unreadable(exc)) from None

    def _text(self) -> io.TextIOWrapper:
        # Undecodable bytes become U+FFFD: such a line is rejected, the rest read on.
        return io.TextIOWrapper(
            self._open_binary(), encoding=self.encoding or "utf-8", errors="replace"
        )

    def _rows(self) -> Iterator[tuple[int, list[str]]]:
        if self._kind == "xlsx":
            yield from self._sheet_rows()
            return
        try:
            with self._text() as text:
                for number, line in enumerate(text, start=1):
                    stripped = line.strip()
                    # a comment line is no row, whatever it holds
                    yield number, [] if stripped.startswith("#") else _split(stripped)
        except OSError as exc:
            raise StockFileError(self._unreadable(exc)) from None

    def _worksheet(self) -> tuple[Any, Any, IO[bytes]]:
        try:
            import openpyxl
        except ImportError:
            raise StockFileError(
                self._(
                    "reading .xlsx needs openpyxl: pip install 'kami-agent[xlsx]' (or save the"
                    " sheet as CSV UTF-8)"
                )
            ) from None
        # Read from the open file, not by its name: openpyxl refuses a workbook by its
        # extension (one saved as keys.csv), and what it is was decided by its content.
        handle = self._open_binary()
        try:
            book = openpyxl.load_workbook(handle, read_only=True, data_only=True)
        except (OSError, zipfile.BadZipFile, KeyError, ValueError) as exc:
            handle.close()
            raise StockFileError(
                self._("%(file)s is not a readable .xlsx workbook: %(why)s")
                % {"file": self.path, "why": exc}
            ) from None
        if self.sheet is None:
            return book, book.worksheets[0], handle
        if self.sheet not in book.sheetnames:
            names = ", ".join(book.sheetnames)
            book.close()
            handle.close()
            raise StockFileError(
                self._("%(file)s has no sheet %(sheet)r (it has: %(names)s)")
                % {"file": self.path, "sheet": self.sheet, "names": names}
            )
        return book, book[self.sheet], handle

    def _sheet_rows(self) -> Iterator[tuple[int, list[Any]]]:
        book, sheet, handle = self._worksheet()
        try:
            for number, row in enumerate(sheet.iter_rows(values_only=True), start=1):
                values = list(row)
                while values and values[-1] in (None, ""):
                    values.pop()
                yield number, [v.strip() if isinstance(v, str) else v for v in values]
        finally:
            book.close()
            handle.close()

    # --- one row ------------------------------------------------------------------------------
    def _skip_header(self, number: int, fields: Sequence[Any], *, show: bool) -> None:
        """`show`: only header words, which are safe to print (never a key)."""
        _ = self._
        shown = ",".join(str(f) for f in fields)[:80] if show else _("as asked with --header")
        self.skipped.append(_("line %(n)d: header row (%(shown)s)") % {"n": number, "shown": shown})

    def _reject(self, number: int, why: str) -> None:
        self.rejections.add(number, why)

    def _cell(self, number: int, value: Any, what: str) -> str | None:
        """A cell as text; None (rejected) when it cannot be a key's text. `what`: the
        column's name, already in the merchant's language."""
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, bool | datetime | date):
            self._reject(
                number,
                self._("the %(column)s cell holds a date or a truth value, not text")
                % {"column": what},
            )
            return None
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            if value.is_integer() and abs(value) >= EXCEL_DIGITS:
                self._reject(
                    number,
                    self._(
                        "the %(column)s is a number of 16 or more digits, of which Excel keeps 15"
                        " (format the column as text and enter the keys again)"
                    )
                    % {"column": what},
                )
                return None
            return str(int(value)) if value.is_integer() else repr(value)
        return str(value)

    def _item(self, number: int, fields: list[Any]) -> CardItem | None:
        _ = self._
        columns = self._columns if self._columns is not None else _positional(len(fields))
        if columns is None or len(fields) > columns.width:
            self._reject(
                number,
                _("%(n)d fields (expected secret; code,secret; or code,secret,expiry)")
                % {"n": len(fields)},
            )
            return None
        fields = fields + [None] * (columns.width - len(fields))
        code = self._cell(number, fields[columns.code], _("code")) if columns.code >= 0 else ""
        secret = self._cell(number, fields[columns.secret], _("secret"))
        if code is None or secret is None:
            return None
        code, secret = code.strip(), secret.strip()
        if columns.expiry >= 0 and fields[columns.expiry] not in (None, ""):
            expires = parse_expiry(fields[columns.expiry])
            if expires is None:
                self._reject(number, _("the expiry field is not a date (YYYY-MM-DD)"))
                return None
            if _is_past(expires, self.now):
                self._reject(number, _("expired"))
                return None
            self.expiring += 1
            expires_at: float | None = expires.timestamp()
        else:
            expires_at = None
        if not secret:
            self._reject(number, _("empty secret"))
            return None
        if len(secret) > MAX_FIELD_LENGTH or len(code) > MAX_FIELD_LENGTH:
            self._reject(number, _("longer than %(n)d characters") % {"n": MAX_FIELD_LENGTH})
            return None
        if "\ufffd" in code + secret:
            self._reject(
                number, _("not valid %(encoding)s") % {"encoding": self.encoding or "text"}
            )
            return None
        if any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in code + secret):
            self._reject(number, _("contains control characters"))
            return None
        return CardItem(code=code, secret=secret, expires_at=expires_at)


def _split(text: str) -> list[str]:
    if not text:
        return []
    tabs = "\t" in text and "," not in text
    if '"' in text:
        dialect: type[csv.Dialect] = csv.excel_tab if tabs else csv.excel
        return [f.strip() for f in next(csv.reader([text], dialect=dialect))]
    if tabs:
        return [f.strip() for f in text.split("\t")]
    if "," in text:
        return [f.strip() for f in text.split(",")]
    return [text]


def _why(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()
