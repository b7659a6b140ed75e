"""The web console: an aiohttp application served by the daemon (off by default).

Security, in the order a request meets it: strict headers on every answer (CSP without any
script, no framing, no referrer, nosniff, no caching of pages that may show keys), the
session cookie (HttpOnly, SameSite=Strict, Secure behind https), login required on every
page but the login form, a CSRF token on every form and the Origin checked on every POST.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from agent.config import Config
from agent.console.data import EngineView, TimedCache
from agent.console.labels import (
    alert_kind_label,
    duration,
    event_label,
    severity_label,
    state_label,
)
from agent.console.passwords import verify_password
from agent.console.sessions import LoginThrottle, Session, SessionStore
from agent.console.settings import ConsoleSettings
from agent.console.uploads import ImportJobs
from agent.i18n import LANGUAGE_NAMES, LANGUAGES, Translator, translations
from agent.logs import get_logger
from agent.reasons import say_reason
from agent.store.base import Store

log = get_logger("kami.console")

PACKAGE = Path(__file__).parent
TEMPLATES = PACKAGE / "templates"
STATIC = PACKAGE / "static"
COOKIE = "kami_console"
MAX_FORM_BYTES = 64 * 1024
# Pages are built without a single script: the CSP forbids every script and inline style.
CSP = (
    "default-src 'self'; script-src 'none'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
# Reached without logging in: the login form, the language switch, the stylesheet.
PUBLIC_PATHS = frozenset({"/login", "/language"})
PUBLIC_PREFIX = "/static/"
# POST routes whose body is multipart: they check the CSRF field themselves while streaming.
MULTIPART_ROUTES = frozenset({"/stock/import"})

CONSOLE: web.AppKey[Console] = web.AppKey("console")
# Where the middleware leaves the visitor's session (None before the login page made one);
# a typed key where aiohttp offers one (3.14+), the plain name before.
SESSION: Any = web.RequestKey("session", object) if hasattr(web, "RequestKey") else "session"


def _when(ts: float | None) -> str:
    if ts is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


class Console:
    """The console's state: settings, the ledger, the engine, sessions and templates."""

    def __init__(
        self,
        config: Config,
        settings: ConsoleSettings,
        store: Store,
        engine: EngineView | None,
        token: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.settings = settings
        self.store = store
        self.engine = engine
        self._token = token
        self.clock = clock
        self.sessions = SessionStore(settings.session_hours * 3600)
        self.throttle = LoginThrottle()
        self.cache = TimedCache()
        self.imports = ImportJobs(store, clock, self.cache.clear)
        self._environments = {language: self._environment(language) for language in LANGUAGES}

    def _environment(self, language: str) -> Environment:
        env = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(default=True, default_for_string=True),
            extensions=["jinja2.ext.i18n"],
            undefined=StrictUndefined,
        )
        env.install_gettext_translations(translations(language), newstyle=True)  # type: ignore[attr-defined]
        t = Translator(language)
        env.filters.update(
            when=_when,
            duration=partial(duration, t),
            state=partial(state_label, t),
            alert_kind=partial(alert_kind_label, t),
            severity=partial(severity_label, t),
            event=partial(event_label, t),
            reason=partial(say_reason, gettext=t),
        )
        return env

    # --- per request ------------------------------------------------------------------------
    def language(self, request: web.Request) -> str:
        session: Session | None = request.get(SESSION)
        if session is not None and session.language:
            return session.language
        return self.settings.language

    def translator(self, request: web.Request) -> Translator:
        return Translator(self.language(request))

    def render(self, request: web.Request, template: str, **context: Any) -> web.Response:
        language = self.language(request)
        session: Session | None = request.get(SESSION)
        page = self._environments[language].get_template(template)
        html = page.render(
            language=language,
            languages=[(code, LANGUAGE_NAMES[code]) for code in LANGUAGES],
            csrf=session.csrf if session is not None else "",
            logged_in=session is not None and session.authenticated,
            flashes=session.take_flashes() if session is not None else [],
            path=request.path_qs,
            **context,
        )
        return web.Response(text=html, content_type="text/html", charset="utf-8")

    async def check_secret(self, given: str) -> bool:
        """The login token (constant-time compare) or the password (scrypt/pbkdf2, in a
        thread: a hash takes tens of milliseconds the delivery loop must not lose)."""
        if not given:
            return False
        if self._token is not None and hmac.compare_digest(given.encode(), self._token.encode()):
            return True
        if self.settings.password_hash is not None:
            import asyncio

            return await asyncio.to_thread(verify_password, given, self.settings.password_hash)
        return False

    def set_cookie(self, request: web.Request, response: web.StreamResponse, value: str) -> None:
        response.set_cookie(
            COOKIE,
            value,
            httponly=True,
            samesite="Strict",
            secure=self.settings.secure_cookie or request.secure,
            path="/",
        )


# --- middlewares --------------------------------------------------------------------------------
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        exc.headers["Cache-Control"] = "no-store"
        raise
    response.headers.update(SECURITY_HEADERS)
    if not request.path.startswith(PUBLIC_PREFIX):
        # A page may show card keys: never kept by the browser or a proxy.
        response.headers["Cache-Control"] = "no-store"
    return response


@web.middleware
async def sessions(request: web.Request, handler: Handler) -> web.StreamResponse:
    console = request.app[CONSOLE]
    request[SESSION] = console.sessions.get(request.cookies.get(COOKIE), console.clock())
    return await handler(request)


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX)


@web.middleware
async def login_required(request: web.Request, handler: Handler) -> web.StreamResponse:
    session: Session | None = request[SESSION]
    if _public(request.path) or (session is not None and session.authenticated):
        return await handler(request)
    if request.method in ("GET", "HEAD"):
        raise web.HTTPSeeOther("/login")
    raise web.HTTPForbidden(text="log in first")


def _same_origin(request: web.Request) -> bool:
    """A POST's Origin, when it names a site, must be this console. None at all (older
    clients, curl) and "null" (what browsers send under Referrer-Policy: no-referrer) are left
    to the CSRF token and the SameSite=Strict cookie."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return True
    return urlsplit(origin).netloc == request.host


@web.middleware
async def csrf(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return await handler(request)
    session: Session | None = request[SESSION]
    if session is None or not _same_origin(request):
        raise web.HTTPForbidden(text="form refused: reload the page and try again")
    if request.content_type == "multipart/form-data" and request.path in MULTIPART_ROUTES:
        return await handler(request)  # checks the token itself, before reading the file
    if request.content_type != "application/x-www-form-urlencoded":
        raise web.HTTPForbidden(text="form refused: unexpected content type")
    form = await request.post()
    if not session.csrf_ok(form.get("csrf")):
        log.warning("console_csrf_refused", path=request.path, session=session.fingerprint)
        raise web.HTTPForbidden(text="form refused: reload the page and try again")
    return await handler(request)


def build_app(console: Console) -> web.Application:
    from agent.console import actions, pages

    app = web.Application(
        middlewares=[security_headers, sessions, login_required, csrf],
        client_max_size=MAX_FORM_BYTES,
    )
    app[CONSOLE] = console
    pages.add_routes(app)
    actions.add_routes(app)
    app.router.add_static("/static/", STATIC, follow_symlinks=False, append_version=False)

    async def close(_: web.Application) -> None:
        await console.imports.close()

    app.on_cleanup.append(close)
    return app
