"""The web console over plain HTTP on 127.0.0.1: login, CSRF, security headers, the audit of a
key reveal, actions and imports, against a real SQLite ledger."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from aiohttp import FormData

from agent.console.app import CSP
from agent.console.passwords import hash_password
from agent.domain import LineState
from agent.sandbox.platform import SandboxPlatform
from agent.store.sqlite import SQLiteStore
from tests.conftest import stock
from tests.console_helpers import (
    TOKEN,
    FakeEngine,
    add_orders,
    console_client,
    csrf_of,
    log_in,
)
from tests.helpers import wait_for

SAMPLE_ID = "123"


def _concrete(path: str) -> str:
    """A route's path with its variables filled in."""
    path = re.sub(r"\{line_id[^}]*\}", SAMPLE_ID, path)
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_every_page_and_action_needs_a_login(tmp_path: Path, sqlite_store: SQLiteStore):
    async with console_client(tmp_path, sqlite_store) as client:
        routes = [
            (r.method, _concrete(r.resource.canonical))
            for r in client.app.router.routes()
            if r.resource is not None and r.method in ("GET", "POST")
        ]
        assert ("GET", "/") in routes and ("POST", f"/orders/{SAMPLE_ID}/keys") in routes
        public = {("GET", "/login"), ("POST", "/login"), ("POST", "/language")}
        for method, path in routes:
            if (method, path) in public or path.startswith("/static/"):
                continue
            response = await client.request(method, path, allow_redirects=False)
            if method == "GET":
                assert response.status == 303, path
                assert response.headers["Location"] == "/login"
            else:
                assert response.status == 403, path
        # A stranger's cookie is no session either.
        client.session.cookie_jar.update_cookies({"kami_console": "made-up"})
        assert (await client.get("/", allow_redirects=False)).status == 303


async def test_wrong_token_is_refused_and_the_right_one_lets_in(
    tmp_path: Path, sqlite_store: SQLiteStore
):
    async with console_client(tmp_path, sqlite_store) as client:
        page = await client.get("/login")
        csrf = csrf_of(await page.text())
        before = client.session.cookie_jar.filter_cookies(client.make_url("/"))["kami_console"]
        wrong = await client.post(
            "/login", data={"csrf": csrf, "secret": TOKEN + "x"}, allow_redirects=False
        )
        assert wrong.headers["Location"] == "/login"
        assert (await client.get("/", allow_redirects=False)).status == 303
        assert "Wrong token or password" in await (await client.get("/login")).text()
        await log_in(client)
        after = client.session.cookie_jar.filter_cookies(client.make_url("/"))["kami_console"]
        assert after.value != before.value  # a new session id at login: no fixation


async def test_password_hash_login(tmp_path: Path, sqlite_store: SQLiteStore):
    async with console_client(
        tmp_path,
        sqlite_store,
        token_secret=None,
        password_hash=hash_password("a long console password"),
    ) as client:
        client.server.app  # noqa: B018 - started
        csrf = csrf_of(await (await client.get("/login")).text())
        # The token is not configured for this console: the console was built with one, but
        # a password-only console must still accept the password.
        done = await client.post(
            "/login",
            data={"csrf": csrf, "secret": "a long console password"},
            allow_redirects=False,
        )
        assert done.headers["Location"] == "/"
        assert (await client.get("/", allow_redirects=False)).status == 200


async def test_login_attempts_are_throttled(tmp_path: Path, sqlite_store: SQLiteStore):
    async with console_client(tmp_path, sqlite_store) as client:
        csrf = csrf_of(await (await client.get("/login")).text())
        for _ in range(5):
            await client.post("/login", data={"csrf": csrf, "secret": "guess"})
        blocked = await client.post(
            "/login", data={"csrf": csrf, "secret": TOKEN}, allow_redirects=False
        )
        assert blocked.headers["Location"] == "/login"
        assert (await client.get("/", allow_redirects=False)).status == 303
        assert "Too many failed logins" in await (await client.get("/login")).text()


async def test_forms_without_the_csrf_token_are_refused(tmp_path: Path, sqlite_store: SQLiteStore):
    [line_id] = await add_orders(sqlite_store, ("A-1", "GAME-100", 1))
    await sqlite_store.park(line_id, "test", time.time())
    async with console_client(tmp_path, sqlite_store) as client:
        # Not even the login form is taken without the token of the visitor's session.
        await client.get("/login")
        assert (await client.post("/login", data={"secret": TOKEN})).status == 403
        csrf = await log_in(client)
        # A forged token: the real one with its last character changed (to "A", unless it
        # already was "A": then it would be the real token, and the post rightly taken).
        forged = csrf[:-1] + ("B" if csrf.endswith("A") else "A")
        for data in ({}, {"csrf": ""}, {"csrf": forged}):
            refused = await client.post(f"/orders/{line_id}/retry", data=data)
            assert refused.status == 403
        # The right token, but posted from another site's page.
        foreign = await client.post(
            f"/orders/{line_id}/retry",
            data={"csrf": csrf},
            headers={"Origin": "http://evil.example"},
        )
        assert foreign.status == 403
        # A body of another type (JSON) is no form.
        assert (await client.post(f"/orders/{line_id}/retry", json={"csrf": csrf})).status == 403
        assert (await sqlite_store.get_line(line_id)).state == LineState.NEEDS_ATTENTION  # type: ignore[union-attr]
        # The upload checks its token before it stores a byte.
        form = FormData()
        form.add_field("sku", "GAME-100")
        form.add_field("file", b"KEY-1\nKEY-2\n", filename="keys.txt")
        assert (await client.post("/stock/import", data=form)).status == 403
        assert await sqlite_store.free_counts() == {}
        done = await client.post(
            f"/orders/{line_id}/retry", data={"csrf": csrf}, allow_redirects=False
        )
        assert done.status == 303


async def test_security_headers_on_every_answer(tmp_path: Path, sqlite_store: SQLiteStore):
    async with console_client(tmp_path, sqlite_store) as client:
        answers = [
            await client.get("/login"),
            await client.get("/", allow_redirects=False),
            await client.post("/orders/1/retry"),
            await client.get("/static/console.css"),
            await client.get("/no-such-page", allow_redirects=False),
        ]
        await log_in(client)
        answers += [await client.get(p) for p in ("/", "/stock", "/orders", "/alerts")]
        for response in answers:
            h = response.headers
            assert h["Content-Security-Policy"] == CSP, response.url
            assert "default-src 'self'" in CSP and "script-src 'none'" in CSP
            assert h["X-Frame-Options"] == "DENY"
            assert h["Referrer-Policy"] == "no-referrer"
            assert h["X-Content-Type-Options"] == "nosniff"
        for response in answers[5:]:
            assert response.headers["Cache-Control"] == "no-store"
            html = await response.text()
            assert (
                "<script" not in html
                and "style=" not in html
                and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
            )


async def test_session_cookie_flags(tmp_path: Path, sqlite_store: SQLiteStore):
    async with console_client(tmp_path, sqlite_store) as client:
        cookie = (await client.get("/login")).headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    async with console_client(tmp_path, sqlite_store, secure_cookie=True) as client:
        cookie = (await client.get("/login")).headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" in cookie


async def test_revealing_keys_takes_a_post_and_is_written_in_the_audit_trail(
    tmp_path: Path, sqlite_store: SQLiteStore
):
    await stock(sqlite_store, "GAME-100", 2)
    [line_id] = await add_orders(sqlite_store, ("R-1", "GAME-100", 2))
    await sqlite_store.allocate(line_id, time.time())
    secrets_bound = {item.secret for item in await sqlite_store.bound_items(line_id)}
    async with console_client(tmp_path, sqlite_store) as client:
        csrf = await log_in(client)
        page = await (await client.get(f"/orders/{line_id}")).text()
        assert not any(s in page for s in secrets_bound)  # not on the order's page
        assert (await client.get(f"/orders/{line_id}/keys")).status == 405
        events = [e.kind for e in await sqlite_store.events(line_id)]
        assert "keys_revealed" not in events
        shown = await client.post(f"/orders/{line_id}/keys", data={"csrf": csrf})
        assert shown.status == 200 and shown.headers["Cache-Control"] == "no-store"
        html = await shown.text()
        assert all(s in html for s in secrets_bound)
        revealed = [e for e in await sqlite_store.events(line_id) if e.kind == "keys_revealed"]
        assert len(revealed) == 1 and "2 key(s) shown in the console" in revealed[0].detail
        assert not any(s in revealed[0].detail for s in secrets_bound)
        timeline = await (await client.get(f"/orders/{line_id}")).text()
        assert "keys shown to the merchant" in timeline


async def test_retry_moves_a_parked_order_and_hands_it_to_the_engine(
    tmp_path: Path,
    sqlite_store: SQLiteStore,
    sandbox: SandboxPlatform,
    monkeypatch: pytest.MonkeyPatch,
):
    """As `kami-agent orders retry` does (agent/aftersales.py): a line parked before it held
    anything is read again from its platform first, and one cancelled meanwhile is closed."""
    monkeypatch.setenv("KAMI_SECRET_PLATFORM_MAIN_SECRET", sandbox.secret)
    paid, gone = sandbox.add_order("GAME-100"), sandbox.add_order("GAME-100")
    sandbox.set_status(gone, "cancelled")
    line_id, gone_id = await add_orders(sqlite_store, (paid, "GAME-100", 1), (gone, "GAME-100", 1))
    for parked in (line_id, gone_id):
        await sqlite_store.park(parked, "platform said no", time.time())
    engine = FakeEngine()
    async with console_client(tmp_path, sqlite_store, engine, sandbox.base_url) as client:
        csrf = await log_in(client)
        page = await (await client.get(f"/orders/{line_id}")).text()
        assert "needs attention" in page and 'id="retry"' in page
        done = await client.post(f"/orders/{line_id}/retry", data={"csrf": csrf})
        html = await done.text()
        assert "is now: new" in html
        assert (await sqlite_store.get_line(line_id)).state == LineState.NEW  # type: ignore[union-attr]
        assert engine.dispatched == [line_id]
        # Twice is refused by the ledger, said in one line on the page.
        again = await (await client.post(f"/orders/{line_id}/retry", data={"csrf": csrf})).text()
        assert "only needs_attention can be retried" in again
        closed = await (await client.post(f"/orders/{gone_id}/retry", data={"csrf": csrf})).text()
        assert "platform reports cancelled" in closed
        assert (await sqlite_store.get_line(gone_id)).state == LineState.CANCELLED  # type: ignore[union-attr]
        assert engine.dispatched == [line_id]


async def test_refusals_are_flashed_in_the_merchants_language(
    tmp_path: Path, sqlite_store: SQLiteStore, sandbox: SandboxPlatform
):
    """The after-sales refusals (agent/aftersales.py) and the ledger's (a resend) are raised
    without the merchant's language and said in it on the page (issue 18)."""
    order = sandbox.add_order("GAME-100")
    (line_id,) = await add_orders(sqlite_store, (order, "GAME-100", 1))
    async with console_client(
        tmp_path, sqlite_store, FakeEngine(), sandbox.base_url, language="zh-CN"
    ) as client:
        csrf = await log_in(client)
        retried = await (await client.post(f"/orders/{line_id}/retry", data={"csrf": csrf})).text()
        refusal = f"订单 {order} 当前为 new；只有 needs_attention（需人工处理）的订单可以重试"
        assert refusal in retried
        resent = await (await client.post(f"/orders/{line_id}/resend", data={"csrf": csrf})).text()
        assert f"订单 {order} 当前为 new；只有已发货的订单可以重发" in resent
        assert "can be retried" not in retried and "can be resent" not in resent
    assert (await sqlite_store.get_line(line_id)).state == LineState.NEW  # type: ignore[union-attr]


async def test_import_by_upload_with_progress_page(tmp_path: Path, sqlite_store: SQLiteStore):
    async with console_client(tmp_path, sqlite_store) as client:
        csrf = await log_in(client)
        form = FormData()
        form.add_field("csrf", csrf)
        form.add_field("sku", "GAME-100")
        body = "code,secret\n" + "".join(f"C{i},SECRET-{i:05d}\n" for i in range(300)) + "bad,x,y\n"
        form.add_field("file", body.encode(), filename="batch.csv")
        started = await client.post("/stock/import", data=form, allow_redirects=False)
        assert started.status == 303
        progress_url = started.headers["Location"]
        assert progress_url.startswith("/stock/import/")

        async def finished() -> bool:
            page = await (await client.get(progress_url)).text()
            return 'id="import-result"' in page

        await wait_for(finished, "the import to finish")
        page = await (await client.get(progress_url)).text()
        assert "Added 300, duplicates 0, rejected 1." in page
        assert await sqlite_store.free_counts() == {"GAME-100": 300}
        assert 'http-equiv="refresh"' not in page  # done: no more refreshing


async def test_void_keys(tmp_path: Path, sqlite_store: SQLiteStore):
    await stock(sqlite_store, "VIP-30D", 5)
    async with console_client(tmp_path, sqlite_store) as client:
        csrf = await log_in(client)
        no_reason = await client.post(
            "/stock/void", data={"csrf": csrf, "sku": "VIP-30D", "count": "2", "reason": " "}
        )
        assert "A reason is required" in await no_reason.text()
        done = await client.post(
            "/stock/void",
            data={"csrf": csrf, "sku": "VIP-30D", "count": "2", "reason": "leaked"},
        )
        assert "Voided 2 free key(s) of VIP-30D" in await done.text()
        assert await sqlite_store.free_counts() == {"VIP-30D": 3}


async def test_both_languages(tmp_path: Path, sqlite_store: SQLiteStore):
    await add_orders(sqlite_store, ("L-1", "GAME-100", 1))
    async with console_client(tmp_path, sqlite_store, language="zh-CN") as client:
        login_page = await (await client.get("/login")).text()
        assert "登录商户控制台" in login_page and '<html lang="zh-CN">' in login_page
        csrf = await log_in(client)
        overview = await (await client.get("/")).text()
        assert "今日已发货" in overview and "新订单" in overview
        switched = await client.post(
            "/language", data={"csrf": csrf, "language": "en", "next": "/orders"}
        )
        assert str(switched.url).endswith("/orders")
        assert "Orders" in await switched.text()
        assert "Delivered today" in await (await client.get("/")).text()
        # "next" never leads off the console.
        away = await client.post(
            "/language",
            data={"csrf": csrf, "language": "zh-CN", "next": "//evil.example/"},
            allow_redirects=False,
        )
        assert away.headers["Location"] == "/"


async def test_orders_search_filters_and_escaping(tmp_path: Path, sqlite_store: SQLiteStore):
    await add_orders(
        sqlite_store,
        ("F-1", "GAME-100", 1),
        ("F-2", "VIP-30D", 1),
        ("<script>alert(1)</script>", "GAME-100", 1),
    )
    async with console_client(tmp_path, sqlite_store) as client:
        await log_in(client)
        everything = await (await client.get("/orders")).text()
        assert "F-1" in everything and "F-2" in everything
        assert "<script>alert(1)</script>" not in everything
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in everything
        by_sku = await (await client.get("/orders", params={"sku": "VIP-30D"})).text()
        assert "F-2" in by_sku and "F-1" not in by_sku
        by_id = await (await client.get("/orders", params={"q": "F-1"})).text()
        assert "F-1" in by_id and "F-2" not in by_id
        by_state = await (await client.get("/orders", params={"state": "delivered"})).text()
        assert "No orders match" in by_state


async def test_pages_render_with_data(tmp_path: Path, sqlite_store: SQLiteStore):
    await stock(sqlite_store, "GAME-100", 10)
    ids = await add_orders(sqlite_store, ("D-1", "GAME-100", 1), ("D-2", "GAME-100", 1))
    now = time.time()
    for line_id in ids:
        await sqlite_store.claim_for_delivery(line_id, now)
        await sqlite_store.mark_delivered(line_id, now + 0.5, "ok")
    async with console_client(tmp_path, sqlite_store, FakeEngine()) as client:
        await log_in(client)
        overview = await (await client.get("/")).text()
        assert re.search(r'id="delivered-today">2<', overview)
        stock_page = await (await client.get("/stock", params={"range": "week"})).text()
        assert "<svg" in stock_page and 'class="free">8<' in stock_page
        assert "<svg" in await (await client.get("/stock")).text()
        suppliers = await (await client.get("/suppliers")).text()
        assert "No suppliers configured" in suppliers
        alerts = await (await client.get("/alerts")).text()
        assert "No open alerts" in alerts


@pytest.mark.parametrize("path", ["/orders/99999", "/stock/import/nope"])
async def test_unknown_things_are_404(tmp_path: Path, sqlite_store: SQLiteStore, path: str):
    async with console_client(tmp_path, sqlite_store) as client:
        await log_in(client)
        assert (await client.get(path)).status == 404


async def test_logout_ends_the_session(tmp_path: Path, sqlite_store: SQLiteStore):
    async with console_client(tmp_path, sqlite_store) as client:
        csrf = await log_in(client)
        jar = client.session.cookie_jar
        old = jar.filter_cookies(client.make_url("/"))["kami_console"].value
        await client.post("/logout", data={"csrf": csrf})
        jar.update_cookies({"kami_console": old})  # even the old cookie no longer works
        assert (await client.get("/", allow_redirects=False)).status == 303
        await asyncio.sleep(0)


def test_the_screenshots_the_docs_link_to_exist():
    root = Path(__file__).resolve().parents[2]
    linked = []
    for doc, base in ((root / "README.md", root), (root / "docs" / "console.md", root / "docs")):
        for target in re.findall(r"\]\(((?:docs/)?screenshots/[^)]+\.png)\)", doc.read_text()):
            linked.append(target)
            assert (base / target).is_file(), f"{doc.name} links to missing {target}"
    assert len(linked) >= 10
