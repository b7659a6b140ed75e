"""The inbound listener: HTTP for platforms that call the merchant and want the keys in the
reply (Eneba's declared stock, a dujiao-next shop buying from us; Agiso's pushes later).

Off by default ([listener]). It binds 127.0.0.1 (or takes the socket systemd hands over,
LISTEN_FDS: systemd/kami-agent.socket) and sits behind the merchant's TLS reverse proxy
(README: Caddy). Each platform module that has `listener_routes` mounts its routes
(agent/listener_routes.py). For every request, in this order:

1. the method and path must be a route's, else 404 with an empty body;
2. a compressed body is refused (415): nothing is inflated;
3. the route's authentication is checked on the headers alone (a bearer value, an API key
   and a timestamp's window), in constant time, before a byte of the body is read;
4. the body is read capped (413 past the route's limit, however it is framed) within
   `body_timeout`;
5. a signature over the body is checked before it is parsed;
6. the route's handler commits what it decides and returns the reply, sent as it is.

A client trickling its headers (slowloris) is cut off after `header_timeout`; connections
beyond `max_connections` are closed as they come. The listener never follows anything: it
makes no request on a caller's word. Every request reaching a handler is logged by platform,
action, order id and outcome; refusals before one (unknown paths, bad credentials, oversized
bodies) are logged as counts, so a flood cannot fill the log. No header value, body, key or
token is ever logged.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler

from agent.domain import AgentError, Transient
from agent.listener_routes import Inbound, Job, ListenerContext, Mount, Outbound, Route
from agent.listener_settings import ListenerSettings
from agent.logs import get_logger
from agent.periodic import Job as PeriodicJob
from agent.periodic import Periodic
from agent.storable import escaped

log = get_logger("kami.listener")
SD_LISTEN_FDS_START = 3
REFUSAL_LOG_EVERY = 10.0  # seconds between summaries of refused requests
MAX_LOGGED_ID = 80
_EMPTY_404 = (404, b"")
SERVER = "kami-agent"  # not aiohttp's name and version: nothing said about what answers


class _Guard:
    """Deadlines and a cap on connections. A connection must deliver a request's headers
    within `timeout` of opening (or of its last reply, kept alive); more than `limit` open
    connections are aborted as they come.

    A connection holds one timer at a time: a request only moves its deadline (a reply
    sets it, the next request's headers clear it), and the timer, when it fires, aborts the
    connection if the deadline has passed or waits for the one it finds. No timer is made
    or cancelled per request."""

    def __init__(self, timeout: float, limit: int) -> None:
        self.timeout = timeout
        self.limit = limit
        # By connection: the loop time its headers are due by (None while a request it sent
        # is being answered), and its timer.
        self._due: dict[RequestHandler, float | None] = {}
        self._timers: dict[RequestHandler, asyncio.TimerHandle] = {}
        self.cut_off = 0  # connections closed for being slow
        self.turned_away = 0  # connections closed for being too many

    def opened(self, proto: RequestHandler, transport: asyncio.Transport) -> None:
        if len(self._due) >= self.limit:
            self.turned_away += 1
            transport.abort()
            return
        loop = asyncio.get_running_loop()
        due = self._due[proto] = loop.time() + self.timeout
        self._timers[proto] = loop.call_at(due, self._check, proto, transport)

    def arm(self, proto: RequestHandler, transport: asyncio.Transport | None) -> None:
        if proto in self._due and transport is not None:
            self._due[proto] = asyncio.get_running_loop().time() + self.timeout

    def disarm(self, proto: RequestHandler) -> None:
        if proto in self._due:
            self._due[proto] = None

    def closed(self, proto: RequestHandler) -> None:
        self._due.pop(proto, None)
        timer = self._timers.pop(proto, None)
        if timer is not None:
            timer.cancel()

    def _check(self, proto: RequestHandler, transport: asyncio.Transport) -> None:
        if proto not in self._due:
            return
        loop = asyncio.get_running_loop()
        due = self._due[proto]
        if due is not None and due <= loop.time():
            self.closed(proto)
            self.cut_off += 1
            transport.abort()
            return
        # Busy (a request being answered: no deadline until its reply), or due later.
        at = loop.time() + self.timeout if due is None else due
        self._timers[proto] = loop.call_at(at, self._check, proto, transport)

    @property
    def open(self) -> int:
        return len(self._due)


class _GuardedHandler(RequestHandler):
    """aiohttp's connection protocol, telling the guard when a connection opens and closes."""

    guard: _Guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        self.guard.opened(self, transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.closed(self)
        super().connection_lost(exc)


class _TooLarge(Exception):
    pass


def systemd_socket() -> socket.socket | None:
    """The listening socket systemd passed to this process (socket activation), if any: the
    one named `listener` (FileDescriptorName=) or else the first."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if count < 1:
        return None
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    index = names.index("listener") if "listener" in names else 0
    sock = socket.socket(fileno=SD_LISTEN_FDS_START + index)
    sock.setblocking(False)
    return sock


class Listener:
    def __init__(
        self,
        settings: ListenerSettings,
        mounts: Sequence[Mount],
        store: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.routes: list[Route] = [r for m in mounts for r in m.routes]
        self.jobs: list[Job] = [j for m in mounts for j in m.jobs]
        self._exact: dict[tuple[str, str], Route] = {}
        self._patterns: list[Route] = []
        for route in self.routes:
            if "{" in route.path:
                self._patterns.append(route)
            else:
                key = (route.method, settings.path_prefix + "/" + "/".join(route.segments))
                if key in self._exact:
                    raise AgentError(f"listener: two platforms claim {route.method} {key[1]}")
                self._exact[key] = route
        self._guard = _Guard(settings.header_timeout, settings.max_connections)
        self._server: asyncio.AbstractServer | None = None
        self._web: web.Server | None = None
        self._periodic: Periodic | None = None
        self._refused: Counter[tuple[str, str]] = Counter()
        self._refused_logged_at = 0.0
        self.answered = 0  # requests a handler answered
        self.address: tuple[str, int] | None = None

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._web = web.Server(self._handle, access_log=None, handler_cancellation=False)
        server = self._web
        guard = self._guard

        def factory() -> RequestHandler:
            proto = _GuardedHandler(
                server,
                loop=loop,
                keepalive_timeout=self.settings.header_timeout,
                access_log=None,  # type: ignore[arg-type]  # aiohttp takes None for "no log"
                max_headers=64,
                max_field_size=8190,
                max_line_size=8190,
                auto_decompress=False,  # nothing is inflated: compressed bodies are refused
                lingering_time=1.0,
            )
            proto.guard = guard
            return proto

        sock = systemd_socket()
        try:
            if sock is not None:
                self._server = await loop.create_server(factory, sock=sock)
            else:
                self._server = await loop.create_server(
                    factory, self.settings.host, self.settings.port, reuse_address=True
                )
        except OSError as exc:
            raise AgentError(
                f"listener: cannot listen on {self.settings.host}:{self.settings.port}:"
                f" {exc.strerror or exc}"
            ) from None
        bound = self._server.sockets[0].getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        if self.jobs:
            self._periodic = Periodic(
                [
                    PeriodicJob(j.name, self._singleton(j), j.interval, at_start=True)
                    for j in self.jobs
                ]
            )
            self._periodic.start()
        log.info(
            "listener_listening",
            host=self.address[0],
            port=self.address[1],
            systemd_socket=sock is not None,
            routes=len(self.routes),
            platforms=sorted({r.platform for r in self.routes}),
        )

    def _singleton(self, job: Job) -> Callable[[], Any]:
        async def run() -> None:
            if self.store is None:
                await job.run()
                return
            async with self.store.singleton(f"listener:{job.name}") as ours:
                if ours:
                    await job.run()

        return run

    async def stop(self) -> None:
        if self._periodic is not None:
            await self._periodic.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._web is not None:
            # Idle kept-alive connections close now; a request being answered finishes first
            # (its reply is committed already: it should reach the platform).
            for connection in list(self._web.connections):
                connection.close()
            await self._web.shutdown(timeout=5.0)
        self._flush_refusals(force=True)

    # --- one request ----------------------------------------------------------------------
    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        route = self._exact.get((method, path))
        if route is not None:
            return route, {}
        prefix = self.settings.path_prefix
        if prefix:
            if not path.startswith(prefix + "/"):
                return None
            path = path[len(prefix) :]
        parts = tuple(path.strip("/").split("/"))
        for candidate in self._patterns:
            if candidate.method != method or len(candidate.segments) != len(parts):
                continue
            params: dict[str, str] = {}
            for want, got in zip(candidate.segments, parts, strict=True):
                if want.startswith("{") and want.endswith("}"):
                    if not got:
                        break
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return candidate, params
        return None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        proto = request.protocol
        self._guard.disarm(proto)  # the headers are in: the body has a deadline of its own
        try:
            return await self._answer(request)
        finally:
            self._guard.arm(proto, request.transport)

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        raw_path = request.raw_path.split("?", 1)[0]
        found = self._match(request.method, raw_path)
        if found is None:
            return self._refuse("-", "unknown_path", _EMPTY_404, request)
        route, params = found
        wire_path = (
            raw_path[len(self.settings.path_prefix) :] if self.settings.path_prefix else raw_path
        )
        headers = request.headers
        encoding = headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
        if encoding not in ("", "identity"):
            return self._refuse(route.platform, "compressed_body", (415, b""), request)
        now = self.clock()
        reason = route.auth.before_body(request.method, wire_path, headers, now)
        if reason is not None:
            refused = route.auth.refusal(reason)
            # The body is left unread: the connection goes, not kept for a next request.
            answer = (refused.status, refused.body)
            return self._refuse(route.platform, reason, answer, request, close=request.body_exists)
        cap = route.max_body or self.settings.max_body_bytes
        try:
            body = await self._read_body(request, cap)
        except _TooLarge:
            return self._refuse(route.platform, "body_too_large", (413, b""), request, close=True)
        except TimeoutError:
            return self._refuse(route.platform, "body_too_slow", (408, b""), request, close=True)
        reason = route.auth.after_body(request.method, wire_path, headers, body)
        if reason is not None:
            refused = route.auth.refusal(reason)
            return self._refuse(route.platform, reason, (refused.status, refused.body), request)
        inbound = Inbound(
            method=request.method,
            path=wire_path,
            params=params,
            query=dict(request.query) if "?" in request.raw_path else {},
            headers=headers,
            body=body,
            received_at=now,
        )
        try:
            reply = await route.handle(inbound)
        except Transient as exc:
            # Nothing was committed: the platform's retry is answered anew.
            reply = Outbound(503, b"", outcome="failed")
            log.warning("listener_unavailable", platform=route.platform, error=str(exc))
        except Exception:
            reply = Outbound(500, b"", outcome="failed")
            log.exception("listener_handler_failed", platform=route.platform)
        self.answered += 1
        log.info(
            "listener_request",
            platform=route.platform,
            action=reply.action,
            order_id=_shown(reply.order_id),
            outcome=reply.outcome,
            status=reply.status,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return web.Response(
            status=reply.status,
            body=reply.body,
            headers={hdrs.CONTENT_TYPE: reply.content_type, hdrs.SERVER: SERVER},
        )

    async def _read_body(self, request: web.BaseRequest, cap: int) -> bytes:
        length = request.content_length
        if length is not None and length > cap:
            raise _TooLarge
        if not request.body_exists:
            return b""
        content = request.content
        if length is not None and content.is_eof():
            return content.read_nowait(-1)  # all of it arrived with the headers (the usual)
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(self.settings.body_timeout):
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > cap:
                    raise _TooLarge
                chunks.append(chunk)
        return b"".join(chunks)

    def _refuse(
        self,
        platform: str,
        reason: str,
        reply: tuple[int, bytes],
        request: web.BaseRequest,
        *,
        close: bool = False,
    ) -> web.Response:
        self._refused[platform, reason] += 1
        self._flush_refusals()
        headers = {hdrs.SERVER: SERVER}
        if reply[1]:
            headers[hdrs.CONTENT_TYPE] = "application/json"
        response = web.Response(status=reply[0], body=reply[1], headers=headers)
        if close:
            response.force_close()
        return response

    def _flush_refusals(self, force: bool = False) -> None:
        """Refusals as counts, at most every REFUSAL_LOG_EVERY seconds (the first at once)."""
        now = time.monotonic()
        if not self._refused or (not force and now - self._refused_logged_at < REFUSAL_LOG_EVERY):
            return
        self._refused_logged_at = now
        for (platform, reason), count in sorted(self._refused.items()):
            log.warning("listener_refused", platform=platform, reason=reason, count=count)
        self._refused.clear()
        if self._guard.cut_off or self._guard.turned_away:
            log.warning(
                "listener_connections_closed",
                slow=self._guard.cut_off,
                too_many=self._guard.turned_away,
            )
            self._guard.cut_off = self._guard.turned_away = 0


def _shown(order_id: str | None) -> str | None:
    """An order id as a log line may carry it: escaped and cut short."""
    if order_id is None:
        return None
    return escaped(order_id[:MAX_LOGGED_ID])


def listener_mounts(
    platforms: Mapping[str, Any], kinds: Mapping[str, str], context: ListenerContext
) -> list[Mount]:
    """The mounts of every platform whose module takes part (`listener_routes`)."""
    from agent.platforms import kind_module

    mounts = []
    for name, platform in platforms.items():
        module = kind_module(kinds[name])
        hook = getattr(module, "listener_routes", None)
        if hook is not None:
            mounts.append(hook(platform, context))
    return mounts


def build_listener(
    config: Any,
    store: Any,
    platforms: Mapping[str, Any],
    clock: Callable[[], float],
    intakes: Mapping[str, Any] | None = None,
) -> Listener | None:
    """The listener the config asks for ([listener]), with every taking-part platform's
    routes; None when off. A responder platform without it is said once in the log: its
    platform cannot reach the agent. `intakes`: the engine's, by platform name (a platform
    whose calls carry paid orders, Agiso's pushes, takes them in through its own)."""
    kinds = {p.name: p.kind for p in config.platforms}
    context = ListenerContext(store, clock, {"intakes": dict(intakes or {})})
    mounts = listener_mounts(platforms, kinds, context)
    wanted = sorted({r.platform for m in mounts for r in m.routes})
    if config.listener is None:
        if wanted:
            log.warning(
                "listener_off",
                platforms=wanted,
                hint="these platforms call the agent: add a [listener] table",
            )
        return None
    return Listener(config.listener, mounts, store, clock)
