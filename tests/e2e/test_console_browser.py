"""The console in a real browser: Debian's headless Chromium driven through its chromedriver
(selenium, no driver or browser download), against the real engine delivering from the
sandbox platform in a background thread.

Screenshots of the main pages go to $KAMI_SCREENSHOTS (docs/screenshots to refresh the
committed ones), else to the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.console.settings import ConsoleSettings, InterfaceSettings
from agent.domain import LineState, PlatformOrder
from agent.platforms.http import HttpPlatform
from agent.runtime import platform_connections, run_engine
from agent.sandbox.platform import SandboxPlatform
from agent.store.identity import Opening
from agent.store.sqlite import SQLiteStore
from tests.conftest import make_config, master_key_for_tests, platform_settings, stock
from tests.console_helpers import TOKEN

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REQUIRE_ENV = "KAMI_REQUIRE_BROWSER"  # .ci/run sets it: no browser is a failure there
WAIT = 30.0  # a hang guard, not a timing assertion
PARKED_ORDER = "SB-PARKED-1"
T = TypeVar("T")

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        message = (
            f"browser tests need {', '.join(missing)}: apt-get install chromium chromium-driver"
        )
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class BackgroundShop:
    """The sandbox platform, a ledger and the engine with its console, in their own thread and
    event loop (selenium's calls block)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.store: SQLiteStore | None = None
        self.sandbox: SandboxPlatform | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="console-shop", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(WAIT):
            raise RuntimeError("the shop did not start")
        if self._failure is not None:
            raise self._failure

    def call(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        assert self.loop is not None

        async def run() -> T:
            return await factory()

        future: Future[T] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return future.result(WAIT)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        sandbox = SandboxPlatform(api_key="test-key", secret="test-secret", seed=1)
        await sandbox.start()
        self.sandbox = sandbox
        store = SQLiteStore(self.folder / "kami.db", master_key_for_tests(), opening=Opening.CREATE)
        await store.open()
        self.store = store
        # Before the engine runs: an order the platform reported, parked by the ledger (a
        # platform refusal, say), waiting for the merchant to retry it.
        sandbox.add_order("VIP-30D", order_id=PARKED_ORDER)
        [line_id] = await store.ingest(
            "main",
            [PlatformOrder(order_id=PARKED_ORDER, status="paid", sku="VIP-30D", quantity=1)],
            time.time(),
        )
        await store.park(line_id, "platform answered 409 conflict (simulated)", time.time())
        await stock(store, "GAME-100", 40)
        await stock(store, "VIP-30D", 3)
        config = dataclasses.replace(
            make_config(self.folder, sandbox.base_url),
            interfaces=InterfaceSettings(
                console=ConsoleSettings(port=self.port, token_secret="console.token")
            ),
        )
        adapter = HttpPlatform(
            platform_settings(sandbox.base_url), sandbox.secret, platform_connections(config.agent)
        )
        engine = asyncio.create_task(run_engine(config, store, {"main": adapter}, self._stop))
        for _ in range(12):
            sandbox.add_order("GAME-100")
        for _ in range(int(WAIT / 0.05)):  # the console listens once the engine started it
            if await _listening(self.port):
                break
            await asyncio.sleep(0.05)
        self._ready.set()
        try:
            await engine
        finally:
            await adapter.close()
            await store.close()
            await sandbox.stop()


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


@pytest.fixture
def shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BackgroundShop]:
    _browser_or_skip()
    monkeypatch.setenv("KAMI_SECRET_CONSOLE_TOKEN", TOKEN)
    # A retry reads the parked order again from its platform (agent/aftersales.py).
    monkeypatch.setenv("KAMI_SECRET_PLATFORM_MAIN_SECRET", "test-secret")
    for name in ("LANGUAGE", "LC_ALL", "LC_MESSAGES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", "en_US.UTF-8")  # console.language defaults from the locale
    running = BackgroundShop(tmp_path)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    _browser_or_skip()
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("KAMI_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    # A click that navigates leaves the old page's elements stale for a moment: look again.
    # On a loaded machine Chromium may also answer "node does not belong to the document"
    # (a plain WebDriverException) while the new page replaces the old one; the wait still
    # fails, naming `what`, if the condition never holds.
    return WebDriverWait(
        driver,
        WAIT,
        poll_frequency=0.1,
        ignored_exceptions=(
            NoSuchElementException,
            StaleElementReferenceException,
            WebDriverException,
        ),
    ).until(condition, what)


def _text(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def _full_page(driver: WebDriver, path: Path, width: int = 1280) -> None:
    """A screenshot of the whole page: the window made as tall as the page's content (plus
    what the window itself takes)."""
    driver.set_window_size(width, 1000)
    content = driver.execute_script(
        "return [Math.ceil(document.body.getBoundingClientRect().height),"
        " window.outerHeight - window.innerHeight]"
    )
    driver.set_window_size(width, min(max(int(content[0]) + int(content[1]) + 16, 480), 4000))
    driver.save_screenshot(str(path))


def _log_in(driver: WebDriver, url: str) -> None:
    driver.get(f"{url}/")
    _wait(driver, lambda d: "/login" in d.current_url, "the login page")
    driver.find_element(By.ID, "secret").send_keys(TOKEN)
    driver.find_element(By.ID, "login").click()
    _wait(driver, lambda d: d.find_elements(By.ID, "delivered-today"), "the overview")


def test_merchant_runs_the_shop_from_the_browser(
    shop: BackgroundShop, browser: WebDriver, screenshots: Path, tmp_path: Path
):
    assert shop.sandbox is not None and shop.store is not None
    store = shop.store
    # The login page, and a wrong token.
    browser.get(f"{shop.url}/login")
    _full_page(browser, screenshots / "login.png")
    browser.find_element(By.ID, "secret").send_keys("not the token")
    browser.find_element(By.ID, "login").click()
    _wait(browser, lambda d: "Wrong token or password" in d.page_source, "the refusal")

    _log_in(browser, shop.url)

    # The overview: the engine delivers the twelve orders; the page shows them.
    def delivered_shown(d: WebDriver) -> bool:
        d.refresh()
        return _text(d, "delivered-today") == "12"

    _wait(browser, delivered_shown, "twelve deliveries on the overview")
    assert _text(browser, "needs-attention") == "1"
    assert "/" in _text(browser, "latency") and "–" not in _text(browser, "latency")
    _full_page(browser, screenshots / "overview.png")

    # The parked order: retry it, and watch it delivered.
    browser.get(f"{shop.url}/orders?state=needs_attention")
    browser.find_element(By.LINK_TEXT, PARKED_ORDER).click()
    _wait(
        browser,
        lambda d: "needs attention" in _text(d, "order-state-value"),
        "the parked order's page",
    )
    browser.find_element(By.ID, "retry").click()
    _wait(browser, lambda d: "is now:" in d.page_source, "the retry's message")

    def order_delivered(d: WebDriver) -> bool:
        d.refresh()
        return _text(d, "order-state-value") == "delivered"

    _wait(browser, order_delivered, "the retried order delivered")
    assert "retried by the merchant" in _text(browser, "timeline")
    line = shop.call(lambda: store.find_lines(PARKED_ORDER))[0]
    assert line.state == LineState.DELIVERED
    assert shop.sandbox.orders[PARKED_ORDER].delivery is not None
    _full_page(browser, screenshots / "order.png")

    # Which key went to that order: shown on an explicit click, recorded first.
    browser.find_element(By.ID, "reveal").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "keys"), "the keys")
    [item] = shop.call(lambda: store.bound_items(line.id))
    assert item.secret in _text(browser, "keys")
    kinds = [e.kind for e in shop.call(lambda: store.events(line.id))]
    assert "keys_revealed" in kinds

    # Orders list.
    browser.get(f"{shop.url}/orders")
    _wait(browser, lambda d: d.find_elements(By.ID, "orders"), "the orders")
    _full_page(browser, screenshots / "orders.png")

    # Import a stock file by upload.
    stock_file = tmp_path / "new-keys.csv"
    stock_file.write_text(
        "code,secret\n" + "".join(f"UP{i},UPLOADED-SECRET-{i:04d}\n" for i in range(25))
    )
    browser.get(f"{shop.url}/stock")
    browser.find_element(By.CSS_SELECTOR, "#import-sku option[value='VIP-30D']").click()
    browser.find_element(By.ID, "import-file").send_keys(str(stock_file))
    browser.find_element(By.ID, "import-submit").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "import-result"), "the import's result")
    assert "Added 25, duplicates 0, rejected 0." in _text(browser, "import-result")
    _full_page(browser, screenshots / "import.png")
    free = shop.call(store.free_counts)
    assert free["VIP-30D"] == 3 - 1 + 25  # one went to the retried order
    browser.get(f"{shop.url}/stock")
    _full_page(browser, screenshots / "stock.png")

    # The other language, by the switch on the page.
    browser.find_element(By.ID, "lang-zh-CN").click()
    _wait(browser, lambda d: "库存" in d.find_element(By.TAG_NAME, "h1").text, "Chinese")
    browser.get(f"{shop.url}/")
    assert "今日已发货" in browser.page_source and _text(browser, "delivered-today") == "13"
    _full_page(browser, screenshots / "overview-zh.png")
    browser.get(f"{shop.url}/stock")
    _full_page(browser, screenshots / "stock-zh.png")
    browser.get(f"{shop.url}/orders/{line.id}")
    assert _text(browser, "order-state-value") == "已发货"
    assert "商户已重试" in _text(browser, "timeline")
    # A phone's screen.
    browser.get(f"{shop.url}/")
    _full_page(browser, screenshots / "overview-phone-zh.png", width=390)
    browser.find_element(By.ID, "lang-en").click()
    _wait(browser, lambda d: "Overview" in d.find_element(By.TAG_NAME, "h1").text, "English")

    # Log out: the console is closed again.
    browser.find_element(By.ID, "logout").click()
    _wait(browser, lambda d: "/login" in d.current_url, "the login page")
    browser.get(f"{shop.url}/orders")
    assert "/login" in browser.current_url
    for png in screenshots.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
