"""The command line without surprises: orders named without ambiguity, never a traceback,
--version, --json on every listing, shell completion, `notify test`, and `check` asking
every supplier."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from agent.domain import PlatformOrder, RejectedOrder
from agent.sandbox.supplier import SandboxSupplier
from agent.store.sqlite import SQLiteStore
from tests.conftest import STORE_KEY_ENV, TEST_STORE_KEY, master_key_for_tests, stock
from tests.unit.test_cli import cli, config_for, serve_in_thread

SKU = "GAME-100"


def agent_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "agent", "--config", str(config)]


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line


def two_platforms(tmp_path: Path) -> Path:
    config = config_for(tmp_path)
    text = config.read_text(encoding="utf-8")
    extra = (
        '\n[platforms.shop2]\nbase_url = "http://127.0.0.1:9"\napi_key = "k2"\n'
        'secret = "platform.shop2.secret"\n'
    )
    config.write_text(text + extra, encoding="utf-8")
    return config


def seed(tmp_path: Path, orders: list[tuple[str, PlatformOrder | RejectedOrder]]) -> None:
    async def run() -> None:
        store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
        await store.open()
        for platform, order in orders:
            await store.ingest(platform, [order], 1.0)
        await store.close()

    asyncio.run(run())


# --- orders named without ambiguity ---------------------------------------------------------
def test_orders_are_named_explicitly_and_ambiguity_is_refused(tmp_path: Path) -> None:
    config = two_platforms(tmp_path)
    seed(
        tmp_path,
        [
            ("main", RejectedOrder("A-1", "unknown SKU 'X'")),  # ledger line 1
            ("main", RejectedOrder("1", "unknown SKU 'X'")),  # line 2: order id "1" on main
            ("shop2", RejectedOrder("1", "unknown SKU 'X'")),  # line 3: order id "1" on shop2
            ("main", RejectedOrder("7", "unknown SKU 'X'")),  # line 4
        ],
    )
    both = cli(config, "orders", "retry", "1")
    assert both.returncode == 1
    no_traceback(both)
    assert "--line 2 (main:1" in both.stderr and "--line 3 (shop2:1" in both.stderr
    # Each way of naming a line names exactly one (shown without touching any platform)...
    by_line = cli(config, "orders", "show", "--line", "1")
    assert by_line.returncode == 0 and "line #1: platform main" in by_line.stdout
    scoped = cli(config, "orders", "show", "shop2:1")
    assert scoped.returncode == 0 and "line #3: platform shop2" in scoped.stdout
    flag = cli(config, "orders", "show", "--platform", "main", "1")
    assert flag.returncode == 0 and "line #2: platform main" in flag.stdout
    # ...and retry acts on that one: a line parked before it held anything is read again from
    # its own platform first (issue 19), so it asks for that platform's credentials here
    retried = cli(config, "orders", "retry", "shop2:1")
    assert retried.returncode == 1 and "platform.shop2.secret" in retried.stderr
    no_traceback(retried)
    hashed = cli(config, "orders", "show", "#4")
    assert hashed.returncode == 0 and "line #4: platform main" in hashed.stdout
    # a bare number is an order id, never a ledger line: line 3 exists, order "3" does not
    not_a_row = cli(config, "orders", "show", "3")
    assert not_a_row.returncode == 1 and "no order '3'" in not_a_row.stderr
    assert "--line 3" in not_a_row.stderr
    no_traceback(not_a_row)
    missing = cli(config, "orders", "show", "--line", "99")
    assert missing.returncode == 1 and "no ledger line 99" in missing.stderr


# --- never a traceback ------------------------------------------------------------------------
def _without_root_powers() -> tuple[str, ...]:
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be tested")
    caps = "-dac_override,-dac_read_search"
    return ("setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}")


def test_clear_lines_instead_of_tracebacks(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    keys = tmp_path / "keys.txt"
    keys.write_text("K-1\n", encoding="utf-8")
    assert cli(config, "stock", "import", SKU, str(keys)).returncode == 0
    export = cli(config, "stock", "export", SKU, str(tmp_path / "no" / "such" / "out.csv"))
    assert export.returncode == 1 and "does not exist" in export.stderr
    no_traceback(export)
    limit = cli(config, "orders", "list", "--limit", "99999999999999999999")
    assert limit.returncode == 2 and "--limit" in limit.stderr and "between" in limit.stderr
    assert "Traceback" not in limit.stderr
    folder = cli(config, "stock", "import", SKU, str(tmp_path))
    assert folder.returncode == 1 and "is a directory" in folder.stderr
    no_traceback(folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("K-2\n", encoding="utf-8")
    secret.chmod(0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAMI_")}
    env[STORE_KEY_ENV] = TEST_STORE_KEY
    unreadable = subprocess.run(
        [*_without_root_powers(), *agent_command(config), "stock", "import", SKU, str(secret)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert unreadable.returncode == 1 and "permission denied" in unreadable.stderr
    no_traceback(unreadable)


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    seed(tmp_path, [("main", PlatformOrder(f"O-{i:05}", "paid", SKU, 1)) for i in range(3000)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAMI_")}
    env[STORE_KEY_ENV] = TEST_STORE_KEY
    proc = subprocess.Popen(  # as `kami-agent orders list --limit 3000 | head -1`
        [*agent_command(config), "orders", "list", "--limit", "3000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert err == ""


# --- --version, --json, completion ---------------------------------------------------------------
def test_version_json_listings_and_completion(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    version = cli(config, "--version")
    assert version.returncode == 0 and version.stdout.startswith("kami-agent ")

    async def run() -> None:
        store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
        await store.open()
        await stock(store, SKU, 2)
        await store.ingest("main", [PlatformOrder("O-\x1b[2J", "paid", SKU, 2)], 1.0)
        await store.close()

    asyncio.run(run())
    assert json.loads(cli(config, "stock", "list", "--json").stdout) == [
        {"sku": SKU, "free": 2, "bound": 0, "void": 0, "expired": 0}
    ]
    (line,) = json.loads(cli(config, "orders", "list", "--json").stdout)
    assert line["order_id"] == "O-\x1b[2J" and line["quantity"] == 2 and line["line"] == 1
    (shown,) = json.loads(cli(config, "orders", "show", "--line", "1", "--json").stdout)
    assert shown["events"] and shown["sku"] == SKU
    status = json.loads(cli(config, "status", "--json").stdout)
    assert status["skus"][0]["sku"] == SKU and status["alerts"] == []
    for text in (cli(config, "orders", "list", "--json").stdout, status.__repr__()):
        assert "\x1b" not in text  # JSON escapes it
    pytest.importorskip("shtab")
    bash = cli(config, "completion", "bash")
    assert bash.returncode == 0 and "kami-agent" in bash.stdout and "unvoid" in bash.stdout


# --- notify test and check --------------------------------------------------------------------
class Receiver:
    """A webhook endpoint on loopback that records what it gets."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, object]] = []
        self.runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> None:
        app = web.Application()

        async def hook(request: web.Request) -> web.Response:
            self.bodies.append(await request.json())
            return web.json_response({"ok": True})

        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    loop = asyncio.new_event_loop()
    hook = Receiver()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(hook.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    yield hook
    asyncio.run_coroutine_threadsafe(hook.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_notify_test_sends_on_every_channel(tmp_path: Path, receiver: Receiver) -> None:
    config = config_for(tmp_path)
    config.write_text(
        config.read_text(encoding="utf-8")
        + f'\n[notify.ops]\nkind = "webhook"\nurl = "{receiver.base_url}/hook"\n'
        'secret = "notify.ops.secret"\n'
        '\n[notify.down]\nkind = "webhook"\nurl = "http://127.0.0.1:9/hook"\n'
        'secret = "notify.ops.secret"\n',
        encoding="utf-8",
    )
    env = {"KAMI_SECRET_NOTIFY_OPS_SECRET": "hook-secret"}
    result = cli(config, "notify", "test", "--timeout", "5", extra_env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "notify ops (webhook): sent" in result.stdout
    assert "notify down (webhook): FAILED" in result.stdout
    assert "hook-secret" not in result.stdout + result.stderr
    assert len(receiver.bodies) == 1 and "test message" in json.dumps(receiver.bodies[0])
    only = cli(config, "notify", "test", "--channel", "ops", extra_env=env)
    assert only.returncode == 0 and "notify test: ok" in only.stdout
    (tmp_path / "bare").mkdir()
    none = cli(config_for(tmp_path / "bare"), "notify", "test")
    assert none.returncode == 1 and "no alert channels" in none.stderr


@pytest.fixture
def supplier() -> Iterator[SandboxSupplier]:
    upstream = SandboxSupplier(name="up", api_key="up-key", secret="up-secret", balance="42.00")
    upstream.add_product(SKU, price="3.00")
    for _ in serve_in_thread(upstream):
        yield upstream


def test_check_asks_every_supplier(tmp_path: Path, supplier: SandboxSupplier) -> None:
    config = config_for(tmp_path)
    config.write_text(
        config.read_text(encoding="utf-8")
        + f'\n[suppliers.up]\nbase_url = "{supplier.base_url}"\napi_key = "up-key"\n'
        'secret = "supplier.up.secret"\n',
        encoding="utf-8",
    )
    base = {"KAMI_SECRET_PLATFORM_MAIN_SECRET": "x"}
    good = cli(config, "check", extra_env={**base, "KAMI_SECRET_SUPPLIER_UP_SECRET": "up-secret"})
    assert "supplier up" in good.stdout and "auth ok (balance 42.00 CNY)" in good.stdout
    bad = cli(config, "check", extra_env={**base, "KAMI_SECRET_SUPPLIER_UP_SECRET": "wrong"})
    assert bad.returncode == 1
    assert "supplier up" in bad.stdout and "FAILED" in bad.stdout and "wrong" not in bad.stdout
