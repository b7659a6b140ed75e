"""The console's actions (POST, each behind the CSRF check): log in and out, language,
retry, resend, refund, reveal an order's keys (recorded in its audit trail), void keys, import."""

from __future__ import annotations

import shutil

from aiohttp import BodyPartReader, web

from agent.aftersales import AfterSales, operator_action, with_platforms
from agent.console.app import CONSOLE, SESSION, Console
from agent.console.labels import state_label
from agent.console.sessions import Session
from agent.console.uploads import UploadTooLarge, private_folder, save_upload
from agent.domain import AgentError, OrderLine
from agent.i18n import LANGUAGES
from agent.logs import get_logger
from agent.phrased import say
from agent.textsafe import printable

log = get_logger("kami.console")
MAX_FIELD_BYTES = 1024
MAX_REASON = 200


def _console(request: web.Request) -> Console:
    return request.app[CONSOLE]


def _session(request: web.Request) -> Session:
    session: Session | None = request[SESSION]
    assert session is not None  # the csrf middleware let no POST through without one
    return session


def _local_path(target: str) -> str:
    """Where to go back to: a path on this console only (never //host or a scheme)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def login(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    session = _session(request)
    _ = console.translator(request)
    address = request.remote or "?"
    now = console.clock()
    wait = console.throttle.blocked_for(address, now)
    if wait > 0:
        session.flash("error", _("Too many failed logins; try again in %(n)d s") % {"n": wait})
        raise web.HTTPSeeOther("/login")
    form = await request.post()
    given = form.get("secret")
    if not await console.check_secret(given if isinstance(given, str) else ""):
        console.throttle.failed(address, now)
        log.warning("console_login_failed", remote=address)
        session.flash("error", _("Wrong token or password."))
        raise web.HTTPSeeOther("/login")
    console.throttle.succeeded(address)
    fresh = console.sessions.log_in(session, now)
    log.info("console_login", remote=address, session=fresh.fingerprint)
    response = web.HTTPSeeOther("/")
    console.set_cookie(request, response, fresh.id)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    console.sessions.drop(_session(request))
    response = web.HTTPSeeOther("/login")
    response.del_cookie(
        "kami_console", path="/", samesite="Strict", secure=console.settings.secure_cookie
    )
    raise response


async def language(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    form = await request.post()
    chosen = form.get("language")
    if chosen in LANGUAGES:
        session.language = str(chosen)
    back = form.get("next")
    raise web.HTTPSeeOther(_local_path(back if isinstance(back, str) else "/"))


def _line_id(request: web.Request) -> int:
    return int(request.match_info["line_id"])


async def _operator(request: web.Request, action: str) -> web.StreamResponse:
    console = _console(request)
    session = _session(request)
    _ = console.translator(request)
    line_id = _line_id(request)
    try:
        updated = await operator_action(
            console.config, console.store, console.clock, action, line_id
        )
    except AgentError as exc:
        session.flash("error", printable(say(exc, _)))
    else:
        if console.engine is not None:
            console.engine.dispatch([line_id])  # now, not at the next sweep
        console.cache.clear()
        log.info(f"console_{action}", line_id=line_id, session=session.fingerprint)
        session.flash(
            "ok",
            _("Order %(order)s is now: %(state)s")
            % {"order": printable(updated.order_id), "state": state_label(_, updated.state)},
        )
    raise web.HTTPSeeOther(f"/orders/{line_id}")


async def retry(request: web.Request) -> web.StreamResponse:
    return await _operator(request, "retry")


async def resend(request: web.Request) -> web.StreamResponse:
    return await _operator(request, "resend")


async def refund(request: web.Request) -> web.StreamResponse:
    """A merchant's refund through the order's platform (agent/aftersales.py), with the
    reason typed in the form; the platform's refusal is shown as it came."""
    return await _aftersales(request, "refund")


async def replace_key(request: web.Request) -> web.StreamResponse:
    """A bad key of a delivered order replaced with a fresh one and the buyer told
    (agent/aftersales.py), with the reason and the key's slot (blank: the only key)."""
    return await _aftersales(request, "replace_key")


async def _aftersales(request: web.Request, action: str) -> web.StreamResponse:
    console = _console(request)
    session = _session(request)
    _ = console.translator(request)
    line_id = _line_id(request)
    form = await request.post()
    reason = str(form.get("reason", "")).strip()[:MAX_REASON]
    line = await console.store.get_line(line_id)
    if line is None:
        raise web.HTTPNotFound(text="no such order line")
    if not reason:
        asked = (
            _("Say why the order is refunded.")
            if action == "refund"
            else _("Say what is wrong with the key.")
        )
        session.flash("error", asked)
        raise web.HTTPSeeOther(f"/orders/{line_id}")
    slot_text = str(form.get("slot", "")).strip()
    slot = int(slot_text) if slot_text.isdigit() and len(slot_text) < 6 else None

    async def act(a: AfterSales) -> OrderLine:
        if action == "refund":
            return await a.refund(line, reason)
        return await a.replace_key(line, reason, slot)

    try:
        updated = await with_platforms(console.config, console.store, console.clock, act)
    except AgentError as exc:
        session.flash("error", printable(say(exc, _)))
    else:
        console.cache.clear()
        log.info(f"console_{action}", line_id=line_id, session=session.fingerprint)
        session.flash(
            "ok",
            _("Order %(order)s is now: %(state)s")
            % {"order": printable(updated.order_id), "state": state_label(_, updated.state)},
        )
    raise web.HTTPSeeOther(f"/orders/{line_id}")


async def reveal(request: web.Request) -> web.StreamResponse:
    """The keys bound to a line, shown once on an explicit click, and written in the line's
    audit trail (when, which session) before they are shown."""
    console = _console(request)
    session = _session(request)
    line_id = _line_id(request)
    line = await console.store.get_line(line_id)
    if line is None:
        raise web.HTTPNotFound(text="no such order line")
    items = await console.store.bound_items(line_id)
    await console.store.add_event(
        line_id,
        "keys_revealed",
        f"{len(items)} key(s) shown in the console, session {session.fingerprint}"
        f" from {request.remote or '?'}",
        console.clock(),
    )
    log.info(
        "console_keys_revealed", line_id=line_id, count=len(items), session=session.fingerprint
    )
    return console.render(request, "keys.html", line=line, items=items)


async def void(request: web.Request) -> web.StreamResponse:
    console = _console(request)
    session = _session(request)
    _ = console.translator(request)
    form = await request.post()
    sku = str(form.get("sku", ""))
    reason = str(form.get("reason", "")).strip()[:MAX_REASON]
    every = form.get("all") == "1"
    try:
        count = None if every else int(str(form.get("count", "")))
    except ValueError:
        count = -1
    if sku not in console.config.skus:
        session.flash("error", _("Choose a SKU from the list."))
    elif count is not None and count < 1:
        session.flash("error", _("Say how many free keys to void, or tick “all”."))
    elif not reason:
        session.flash("error", _("A reason is required to void keys."))
    else:
        voided = await console.store.void_free_keys(
            sku, count, f"console: {reason}", console.clock()
        )
        console.cache.clear()
        log.info("console_void", sku=sku, voided=voided, session=session.fingerprint)
        session.flash(
            "ok", _("Voided %(n)d free key(s) of %(sku)s.") % {"n": voided, "sku": printable(sku)}
        )
    raise web.HTTPSeeOther("/stock")


async def _text_field(part: BodyPartReader) -> str:
    raw = await part.read_chunk(MAX_FIELD_BYTES + 1)
    if len(raw) > MAX_FIELD_BYTES or await part.read_chunk(1):
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_FIELD_BYTES, actual_size=len(raw))
    return raw.decode("utf-8", "replace")


async def import_upload(request: web.Request) -> web.StreamResponse:
    """Multipart: csrf, sku, then the file. The token is checked before a byte of the file is
    stored; the file goes to a private temporary folder, then the import runs in the
    background and the page shows its progress."""
    console = _console(request)
    session = _session(request)
    _ = console.translator(request)
    reader = await request.multipart()
    fields: dict[str, str] = {}
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise web.HTTPBadRequest(text="nested multipart")
        if part.name != "file":
            fields[part.name or ""] = await _text_field(part)
            continue
        if not session.csrf_ok(fields.get("csrf")):
            log.warning("console_csrf_refused", path=request.path, session=session.fingerprint)
            raise web.HTTPForbidden(text="form refused: reload the page and try again")
        sku = fields.get("sku", "")
        if sku not in console.config.skus:
            session.flash("error", _("Choose a SKU from the list."))
            raise web.HTTPSeeOther("/stock")
        if not part.filename:
            session.flash("error", _("Choose a file to import."))
            raise web.HTTPSeeOther("/stock")
        filename = printable(part.filename[-100:])
        folder = private_folder()
        try:
            path = await save_upload(part, folder)
        except UploadTooLarge as exc:
            shutil.rmtree(folder, ignore_errors=True)
            session.flash(
                "error",
                _("The file is too large (larger than %(n)d MiB).") % {"n": exc.limit_mib},
            )
            raise web.HTTPSeeOther("/stock") from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = console.imports.start(sku, filename, folder, path, _)
        log.info("console_import_started", sku=sku, session=session.fingerprint)
        raise web.HTTPSeeOther(f"/stock/import/{job.id}")
    if not session.csrf_ok(fields.get("csrf")):
        raise web.HTTPForbidden(text="form refused: reload the page and try again")
    session.flash("error", _("Choose a file to import."))
    raise web.HTTPSeeOther("/stock")


def add_routes(app: web.Application) -> None:
    line = r"/orders/{line_id:\d{1,18}}"
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_post("/language", language)
    app.router.add_post(f"{line}/retry", retry)
    app.router.add_post(f"{line}/resend", resend)
    app.router.add_post(f"{line}/keys", reveal)
    app.router.add_post(f"{line}/refund", refund)
    app.router.add_post(f"{line}/replace-key", replace_key)
    app.router.add_post("/stock/void", void)
    app.router.add_post("/stock/import", import_upload)
