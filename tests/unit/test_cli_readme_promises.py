"""What the README promises a merchant, checked by running the CLI as a subprocess: found by
following the README on a fresh machine (each test failed before its fix)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sandbox.platform import SandboxPlatform
from agent.settings import markdown_table
from tests.conftest import STORE_KEY_ENV, TEST_STORE_KEY
from tests.unit.test_cli import cli, serve_in_thread


@pytest.fixture
def sandbox_thread() -> Iterator[SandboxPlatform]:
    sandbox = SandboxPlatform(api_key="test-key", secret="cli-secret")
    for _ in serve_in_thread(sandbox):
        yield sandbox


def test_check_tests_the_platforms_before_the_ledger_exists(
    tmp_path: Path, sandbox_thread: SandboxPlatform
) -> None:
    """`check` "tests the ledger and every platform's and supplier's credentials": the Agiso
    steps run it before `init`, and a missing ledger says nothing about a platform's key."""
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[store]
path = "kami.db"

[platforms.main]
base_url = "{sandbox_thread.base_url}"
api_key = "test-key"
secret = "platform.main.secret"

[skus."GAME-100"]
""",
        encoding="utf-8",
    )
    result = cli(config, "check", secret="cli-secret")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no ledger at" in result.stdout  # the one problem
    assert f"platform main ({sandbox_thread.base_url}): reachable, auth ok" in result.stdout
    wrong = cli(config, "check", secret="wrong")
    assert f"platform main ({sandbox_thread.base_url}): FAILED" in wrong.stdout
    assert not (tmp_path / "kami.db").exists()  # check never creates a ledger


@pytest.mark.parametrize(
    ("command", "choices"),
    [
        ("orders", "{list,show,retry,resend,refund,replace-key}"),
        ("stock", "{import,list,export,void,unvoid}"),
        ("secrets", "{set,delete,list-missing,where}"),
        ("keys", "{init,rotate}"),
        ("notify", "{test}"),
    ],
)
def test_a_missing_subcommand_is_named_by_its_choices(command: str, choices: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAMI_")}
    result = subprocess.run(
        [sys.executable, "-m", "agent", command],
        capture_output=True,
        text=True,
        env=env | {"LANG": "C.UTF-8", "LANGUAGE": "", "LC_ALL": ""},
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"kami-agent {command}: error: the following arguments are required: {choices}"
    ), result.stderr
    assert "_cmd" not in result.stderr and "Traceback" not in result.stderr


def test_demo_without_a_steady_stream_is_no_violation(tmp_path: Path) -> None:
    """`kami-agent demo --orders 0` sells nothing of the SKU that runs low: no alert is owed,
    and the run whose invariants all hold ends ok (it said VIOLATED and exited 1)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAMI_")}
    env[STORE_KEY_ENV] = TEST_STORE_KEY
    env["TMPDIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--orders", "0", "--burst", "20"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert "invariants              ok:" in result.stdout, result.stdout + result.stderr
    assert "VIOLATED" not in result.stdout
    assert result.returncode == 0


def test_every_setting_row_says_its_default_and_what_it_allows() -> None:
    """The settings table's default and allowed columns are filled in on every row (store.path
    and store.url showed "path or url" as their default and nothing as allowed)."""
    rows = markdown_table().splitlines()[2:]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        key, default, allowed = cells[0], cells[1], cells[2]
        assert default, key
        assert allowed, key
    [path] = [row for row in rows if row.startswith("| `store.path` ")]
    assert "| required (or url) | file path |" in path


def run_bare(
    config: Path, *args: str, tmp_path: Path, lang: str = "C.UTF-8"
) -> subprocess.CompletedProcess[str]:
    """The CLI with no secret anywhere: no KAMI_ variable, an empty credential store, a keyring
    that has nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAMI_", "LC_", "LANG"))}
    env |= {
        "LANG": lang,
        "KAMI_CREDSTORE": str(tmp_path / "credstore"),
        "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring",
    }
    return subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def small_config(tmp_path: Path, agent: str = "") -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[agent]
{agent}

[store]
path = "kami.db"

[platforms.main]
base_url = "http://127.0.0.1:9"
api_key = "test-key"
secret = "platform.main.secret"

[skus."GAME-100"]
""",
        encoding="utf-8",
    )
    return config


def test_a_missing_store_key_names_keys_init_before_the_ledger_exists(tmp_path: Path) -> None:
    """README: "`kami-agent keys init`, then `kami-agent init`". A merchant who skips the first
    is told so (not `secrets set store.key`, which takes any text and fails to parse it)."""
    config = small_config(tmp_path)
    init = run_bare(config, "init", tmp_path=tmp_path)
    assert init.returncode == 1
    assert init.stderr.strip() == (
        "kami-agent: error: secret 'store.key' is not set: it is the store key; make it with"
        " `kami-agent keys init` (once, before `kami-agent init`), or provide environment"
        " variable KAMI_SECRET_STORE_KEY"
    )
    check = run_bare(config, "check", tmp_path=tmp_path)
    assert "`kami-agent keys init`" in check.stdout and check.returncode == 1
    chinese = run_bare(config, "init", tmp_path=tmp_path, lang="zh_CN.UTF-8")
    assert "请用 `kami-agent keys init` 生成" in chinese.stderr, chinese.stderr
    # With a ledger sealed by a key, a new key would lock it: the key must come back.
    (tmp_path / "kami.db").write_bytes(b"")
    lost = run_bare(config, "stock", "list", tmp_path=tmp_path)
    assert lost.returncode == 1
    assert "restore it from your backup" in lost.stderr and "keys init" not in lost.stderr


def test_a_utf16_config_is_converted_from_utf16(tmp_path: Path) -> None:
    """The README: a config saved in GBK or UTF-16 "is refused with how to save it again";
    the iconv line named GBK for a UTF-16 file too."""
    config = small_config(tmp_path)
    text = config.read_text(encoding="utf-8")
    config.write_bytes(text.encode("utf-16"))
    result = run_bare(config, "check", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "iconv -f UTF-16 -t UTF-8 config.toml > config.utf8" in result.stderr
    config.write_bytes(text.replace("[skus", "# 卡密\n[skus").encode("gbk"))
    gbk = run_bare(config, "check", tmp_path=tmp_path)
    assert "iconv -f GBK -t UTF-8 config.toml > config.utf8" in gbk.stderr


def test_secrets_where_says_missing_in_chinese(tmp_path: Path) -> None:
    config = small_config(tmp_path, 'language = "zh-CN"')
    result = run_bare(config, "secrets", "where", tmp_path=tmp_path)
    assert result.returncode == 0
    assert "platform.main.secret：缺失" in result.stdout, result.stdout
