"""Stock commands as a merchant runs them (subprocess, temp ledger): voiding safely, header
rows, real stock files (GBK, UTF-16, .xlsx, expiry dates), the rejected-line report and an
import stopped with Ctrl-C."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import STORE_KEY_ENV, TEST_STORE_KEY
from tests.unit.test_cli import cli, config_for

SKU = "GAME-100"


def stock_row(config: Path, sku: str = SKU) -> list[str]:
    listing = cli(config, "stock", "list").stdout.splitlines()
    return next((line.split() for line in listing if line.split()[:1] == [sku]), [])


def exported(config: Path, tmp_path: Path, name: str = "out.csv") -> list[list[str]]:
    target = tmp_path / name
    result = cli(config, "stock", "export", SKU, str(target))
    assert result.returncode == 0, result.stderr
    with target.open(encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle))[1:]


def imported(config: Path, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(config, "stock", "import", SKU, str(path), *extra)


# --- voiding ---------------------------------------------------------------------------------
def test_void_refuses_zero_and_negative_counts(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"K-{i:03}\n" for i in range(5)), encoding="utf-8")
    assert imported(config, keys).returncode == 0
    for count in ("-1", "0"):
        result = cli(config, "stock", "void", SKU, "--count", count, "--reason", "x")
        assert result.returncode != 0
        assert "--count" in result.stderr and "Traceback" not in result.stderr
    assert stock_row(config) == [SKU, "5", "0", "0"]  # nothing voided


def test_voiding_many_keys_needs_a_confirmation(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"K-{i:03}\n" for i in range(30)), encoding="utf-8")
    assert imported(config, keys).returncode == 0
    for how in (("--count", "15"), ("--all",)):
        refused = cli(config, "stock", "void", SKU, *how, "--reason", "leaked")
        assert refused.returncode == 1
        assert "--yes" in refused.stderr and "Traceback" not in refused.stderr
    assert stock_row(config) == [SKU, "30", "0", "0"]
    few = cli(config, "stock", "void", SKU, "--count", "3", "--reason", "leaked")
    assert few.returncode == 0 and "voided 3" in few.stdout  # a few: no question asked
    many = cli(config, "stock", "void", SKU, "--count", "15", "--reason", "leaked", "--yes")
    assert many.returncode == 0 and "voided 15" in many.stdout
    assert stock_row(config) == [SKU, "12", "0", "18"]


# --- header rows -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("card_no,card_pwd\nC1,S1\nC2,S2\n", [["C1", "S1"], ["C2", "S2"]]),
        ("账号,密码\nuser1,pw-1\n", [["user1", "pw-1"]]),
        ("卡号,卡密,有效期\nC1,S1,2099-12-31\n", [["C1", "S1"]]),
        ("code,secret\nC1,S1\n", [["C1", "S1"]]),
        ("Card PWD,Card No\nS1,C1\n", [["C1", "S1"]]),  # the header also names the columns
        ("卡密\nAAAA-1111\n", [["", "AAAA-1111"]]),
    ],
)
def test_header_rows_are_skipped_and_said(
    tmp_path: Path, content: str, expected: list[list[str]]
) -> None:
    config = config_for(tmp_path)
    keys = tmp_path / "keys.csv"
    keys.write_text(content, encoding="utf-8")
    result = imported(config, keys)
    assert result.returncode == 0, result.stderr
    assert f"added {len(expected)}," in result.stdout
    assert "skipped line 1: header row" in result.stdout
    assert exported(config, tmp_path) == expected


def test_a_first_row_that_may_be_a_header_needs_the_merchants_word(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    keys = tmp_path / "keys.csv"
    keys.write_text("Voucher Id,Voucher Secret\nV1,X7Q2-9981\nV2,K3P0-1120\n", encoding="utf-8")
    refused = imported(config, keys)
    assert refused.returncode == 1
    assert "--header" in refused.stderr and "--no-header" in refused.stderr
    assert stock_row(config) == [SKU, "0", "0", "0"]
    skipped = imported(config, keys, "--header")
    assert skipped.returncode == 0 and "added 2," in skipped.stdout
    assert "header row (as asked with --header)" in skipped.stdout
    as_key = tmp_path / "plain.txt"
    as_key.write_text("ABCDEFGHJKLM\nQ1W2E3R4T5Y6\n", encoding="utf-8")
    refused_plain = imported(config, as_key)
    assert refused_plain.returncode == 1  # letters only, then digits: it might be a title
    taken = imported(config, as_key, "--no-header")
    assert taken.returncode == 0 and "added 2," in taken.stdout


# --- real stock files ------------------------------------------------------------------------
def test_gbk_file_is_detected_and_read_whole(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    keys = tmp_path / "gbk.csv"
    keys.write_bytes("账号,密码\n张三,AAAA-1\n李四,BBBB-2\nplain,CCCC-3\n".encode("gbk"))
    result = imported(config, keys)
    assert result.returncode == 0, result.stderr
    assert "added 3, duplicates 0, rejected 0" in result.stdout
    assert "GBK/GB18030" in result.stdout
    assert exported(config, tmp_path) == [
        ["张三", "AAAA-1"],
        ["李四", "BBBB-2"],
        ["plain", "CCCC-3"],
    ]


def test_a_file_that_could_be_either_encoding_is_refused_until_named(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    keys = tmp_path / "mixed.csv"
    keys.write_bytes("张三,AAAA-1\n".encode() + "李四,BBBB-2\n".encode("gbk"))
    refused = imported(config, keys)
    assert refused.returncode == 1 and "--encoding" in refused.stderr
    named = imported(config, keys, "--encoding", "utf-8")
    assert named.returncode == 0 and "added 1, duplicates 0, rejected 1" in named.stdout
    assert "line 2: not valid utf-8" in named.stdout
    unknown = imported(config, keys, "--encoding", "klingon")
    assert unknown.returncode == 1 and "unknown encoding" in unknown.stderr


def test_excel_unicode_text_utf16_with_bom(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    keys = tmp_path / "unicode.txt"
    keys.write_bytes("卡号\t卡密\r\nC1\tS-1\r\nC2\tS-2\r\n".encode("utf-16"))
    result = imported(config, keys)
    assert result.returncode == 0, result.stderr
    assert "added 2, duplicates 0, rejected 0" in result.stdout and "UTF-16" in result.stdout
    assert exported(config, tmp_path) == [["C1", "S-1"], ["C2", "S-2"]]


def test_xlsx_with_numbers_dates_and_expired_keys(tmp_path: Path) -> None:
    openpyxl = pytest.importorskip("openpyxl")
    config = config_for(tmp_path)
    book = openpyxl.Workbook()
    sheet = book.active
    future = datetime.now() + timedelta(days=90)
    sheet.append(["卡号", "卡密", "有效期"])
    sheet.append([10001, "SEC-1", future])  # a number cell: the card number as text
    sheet.append(["C2", "SEC-2", datetime(2020, 1, 31)])  # expired
    sheet.append([1234567890123456789, "SEC-3", None])  # digits Excel already lost
    sheet.append(["C4", "SEC-4", future.strftime("%Y-%m-%d")])
    sheet.append(["C5", "SEC-5", "soon"])
    path = tmp_path / "keys.xlsx"
    book.save(path)
    result = imported(config, path)
    assert result.returncode == 0, result.stderr
    assert "added 2, duplicates 0, rejected 3" in result.stdout
    assert "rejected line 3: expired (1)" in result.stdout
    assert "rejected line 4: the code is a number of 16 or more digits" in result.stdout
    assert "rejected line 6: the expiry field is not a date" in result.stdout
    assert "expiry date, stored with them" in result.stdout
    assert exported(config, tmp_path) == [["10001", "SEC-1"], ["C4", "SEC-4"]]
    assert "SEC-" not in result.stdout + result.stderr


def test_a_workbook_is_read_by_its_content_whatever_its_name(tmp_path: Path) -> None:
    # A sheet saved (or renamed) as keys.csv is still a workbook: read as one, not refused
    # for its name; a file that only starts like one is refused in one line, no traceback.
    openpyxl = pytest.importorskip("openpyxl")
    config = config_for(tmp_path)
    book = openpyxl.Workbook()
    book.active.append(["C1", "SEC-1"])
    path = tmp_path / "keys.csv"
    book.save(path)
    result = imported(config, path)
    assert result.returncode == 0, result.stderr
    assert "added 1, duplicates 0, rejected 0" in result.stdout
    broken = tmp_path / "broken.txt"
    broken.write_bytes(b"PK\x03\x04")
    result = imported(config, broken)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "broken.txt is not a readable .xlsx workbook" in result.stderr


def test_every_rejected_line_is_reported_by_number_never_by_content(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    lines = ["GOOD-1"]
    lines += [f"a,b,c,SECRET-{i}" for i in range(30)]  # lines 2-31
    lines += ["GOOD-2", "C9,", "ctl\x01SECRET-X", "GOOD-3", "x" * 600]  # 33, 34, 36
    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rejects = tmp_path / "rejects.csv"
    result = imported(config, keys, "--rejects", str(rejects))
    assert result.returncode == 0, result.stderr
    assert "added 3, duplicates 0, rejected 33" in result.stdout
    assert "rejected lines 2-31: 4 fields" in result.stdout
    assert "rejected line 33: empty secret (1)" in result.stdout
    assert "rejected line 34: contains control characters (1)" in result.stdout
    assert "rejected line 36: longer than 512 characters (1)" in result.stdout
    assert "SECRET" not in result.stdout + result.stderr and "xxxx" not in result.stdout
    written = rejects.read_text(encoding="utf-8").splitlines()
    assert len(written) == 34 and written[1].startswith("2,4 fields")
    assert oct(rejects.stat().st_mode & 0o777) == "0o600"


# --- an import stopped by Ctrl-C --------------------------------------------------------------
def test_ctrl_c_stops_an_import_cleanly(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    total = 400_000
    keys = tmp_path / "big.txt"
    with keys.open("w", encoding="utf-8") as handle:
        handle.writelines(f"KEY-{i:09d}\n" for i in range(total))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAMI_")}
    env[STORE_KEY_ENV] = TEST_STORE_KEY
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(config), "stock", "import", SKU, str(keys)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while True:  # wait until the first keys are committed, then press Ctrl-C
        assert proc.poll() is None, "the import ended before it could be interrupted"
        row = stock_row(config)
        if row and int(row[1]) > 0:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    assert "interrupted at line" in out and "run the same import again" in out
    added = int(out.split("added ")[1].split(",")[0])
    assert 0 < added < total
    assert stock_row(config) == [SKU, str(added), "0", "0"]  # what it said it added, committed
    again = imported(config, keys)  # and the rest comes in when run again
    assert again.returncode == 0
    assert f"added {total - added}, duplicates {added}" in again.stdout
