"""The Agiso (阿奇索) open platform gateway: signed form POSTs, the response envelope, its error
codes mapped into our error classes, a client-side limit of 20 calls a second shared by every
shop of one AppId, and shops (or a whole AppId) held after a refusal (docs/platforms/agiso.md).

What the documentation says (tomwptgb/agiso-open-platform-workspace, knowledge-base/docs and
the rendered guide pages): `POST https://gw-api.agiso.com/{service}{path}`, form-encoded,
headers `Authorization: Bearer <AccessToken>` and `ApiVersion: 1`; the public parameters
`timestamp` (Unix seconds, the server allows 10 minutes of skew) and `sign`:
md5(AppSecret + every other parameter as name+value, sorted by name + AppSecret), hex.
Answers are `{IsSuccess, Data, Error_Code, Error_Msg, AllowRetry, RequestId}` (some services
write the names in camel case: isSuccess, error_Code, ...). 20 calls a second per AppId.
Every call is billed against the developer's prepaid deposit; code 16 means it ran out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from agent.domain import (
    AgentError,
    Ambiguous,
    AuthFailed,
    BadResponse,
    CallsUnpaid,
    Permanent,
    Transient,
)
from agent.logs import get_logger
from agent.platforms.rest_client import Reply, RestClient
from agent.redact import fingerprint, register, safe_url
from agent.storable import escaped

log = get_logger("kami.agiso")

GATEWAY = "https://gw-api.agiso.com"
API_VERSION = "1"
# "接口调用配额，20次/秒" (guide, section 3). By default ours stays a little under it: the
# gateway counts arrivals, and network jitter can bunch calls sent a second apart.
MAX_CALLS_PER_SECOND = 20
DEFAULT_CALLS_PER_SECOND = 18
# "API服务端允许客户端请求最大时间误差为10分钟" (guide, public parameters).
TIMESTAMP_WINDOW = 600.0
# A held shop (or AppId) is asked again this often: one call, whose answer lifts the hold.
DEFAULT_PROBE_INTERVAL = 60.0
MAX_MESSAGE = 200
# The service of the open platform itself (no AccessToken, an appId parameter instead).
OPEN_SERVICE = "open"


# --- error classes -------------------------------------------------------------------------------
class AgisoRefused(AuthFailed):
    """Agiso refused the shop's token, our signature or an authorisation: nothing took effect,
    and calls stop (for the shop, or for every shop of the AppId) until a probe passes. It is
    an AuthFailed, so the engine raises its credentials alert and keeps the orders."""

    def __init__(self, message: str, scope: str, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after)
        self.scope = scope  # "shop" (this AccessToken) or "app" (every shop of the AppId)


class BalanceExhausted(AgisoRefused, CallsUnpaid):
    """Code 16, 预存款余额不足了，限制接口调用: the developer's prepaid deposit at Agiso ran out.
    Every shop of the AppId stops until it is topped up; orders wait, none is lost. A
    CallsUnpaid: the alert asks for a top-up, not for new credentials."""


class AgisoError(Permanent):
    """Agiso answered IsSuccess false for a reason retrying the same request will not fix."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.code = code


class AlreadySent(AgisoError):
    """Code 12, 已经发过旺旺消息."""


class MessageLimit(AgisoError):
    """Code 25, 发送消息限制: the order's message cap is used up."""


class TradeNotFound(AgisoError):
    """Code 9, 交易不存在."""


# Codes from knowledge-base/docs/*/errorCode.md (the same table for every service).
TOKEN_INVALID = 1
RATE_LIMITED = 2
SIGNATURE_FAILED = 4
AUTHORISATION_FAILED = 8
TRADE_NOT_FOUND = 9
NO_DATA = (11, 114)  # 没有数据: a read that found nothing (see AgisoClient.read's `empty_ok`)
ALREADY_SENT = 12
UPSTREAM_TIMEOUT = 13
BALANCE_EXHAUSTED = 16
APP_DISABLED = 17
SITE_NOT_AUTHORISED = 18
MESSAGE_LIMIT = 25
NO_API_PERMISSION = 28
# The marketplace behind Agiso answered with an error (淘宝 10, 闲鱼 23, 拼多多 26, 京东 27,
# 快手 30, 有赞 31, 微盟 32, 微店 33, 微信小店 35) or Agiso failed in a way it names
# (14 生成旺旺消息失败, 24 更新订单状态失败): the call failed; trying again later may work.
UPSTREAM_ERRORS = frozenset({10, 14, 23, 24, 26, 27, 30, 31, 32, 33, 35})
# A batch call (/Trade/LogisticsDummySend, ...) that failed as a whole (6 部分失败, 7 全部失败)
# names each item's failure in Data.ErrorInfos[{Tid, ErrorCode, AllowRetry, ErrorMsg}], while
# the envelope's own AllowRetry stays null (alds/api.md; DummySendErrorInfo in the rendered
# pages: "-85:可重试的错误 -50:重复发货 -86:不可重试的错误 ... -90:授权失败").
BATCH_FAILED = (6, 7)
ITEM_RETRYABLE = -85
ITEM_AUTH_FAILED = -90
SHOP_REFUSALS = {
    TOKEN_INVALID: "the shop's AccessToken is invalid or expired (无效AccessToken): the merchant"
    " must authorise the AppId again (or renew the Agiso subscription)",
    AUTHORISATION_FAILED: "authorisation failed (授权失败)",
    SITE_NOT_AUTHORISED: "the shop has not authorised this service (业务站点未授权)",
    NO_API_PERMISSION: "the merchant did not grant this API (无API接口权限): authorise again"
    " with that permission ticked",
}
APP_REFUSALS = {
    SIGNATURE_FAILED: "Agiso refused our signature (验签失败): check the AppSecret and this"
    " machine's clock (Agiso allows 10 minutes)",
    APP_DISABLED: "the AppId is disabled (应用已被禁用)",
    BALANCE_EXHAUSTED: "the prepaid deposit of the AppId ran out (预存款余额不足，限制接口调用):"
    " top it up at open.agiso.com; orders wait meanwhile",
}


# --- signing and the envelope --------------------------------------------------------------------
def sign(params: Mapping[str, str], app_secret: str) -> str:
    """md5(AppSecret + name1 + value1 + name2 + value2 ... + AppSecret), names in ASCII order,
    `sign` itself left out; UTF-8; lower-case hex (Agiso compares without case)."""
    body = "".join(f"{name}{params[name]}" for name in sorted(params) if name != "sign")
    text = f"{app_secret}{body}{app_secret}"
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class Envelope:
    success: bool
    data: Any
    code: int | None
    message: str
    allow_retry: bool | None
    request_id: str | None

    def item_errors(self) -> list[tuple[int | None, bool | None]]:
        """A batch call's per-item failures, (ErrorCode, AllowRetry) each, from
        Data.ErrorInfos (a list, or one object)."""
        infos = _field(self.data, "ErrorInfos") if isinstance(self.data, dict) else None
        if isinstance(infos, dict):
            infos = [infos]
        found: list[tuple[int | None, bool | None]] = []
        for info in infos if isinstance(infos, list) else ():
            if not isinstance(info, dict):
                continue
            code, allow = _field(info, "ErrorCode"), _field(info, "AllowRetry")
            found.append(
                (
                    code if isinstance(code, int) and not isinstance(code, bool) else None,
                    allow if isinstance(allow, bool) else None,
                )
            )
        return found


def _field(body: Mapping[str, Any], name: str) -> Any:
    """A field whatever its case: services write IsSuccess or isSuccess, Error_Code or
    error_Code."""
    wanted = name.lower()
    for key, value in body.items():
        if isinstance(key, str) and key.lower() == wanted:
            return value
    return None


def parse_envelope(body: Any) -> Envelope:
    """The answer's envelope; BadResponse when it is not one."""
    if not isinstance(body, dict):
        raise BadResponse("Agiso answered something other than a JSON object")
    success = _field(body, "IsSuccess")
    if not isinstance(success, bool):
        raise BadResponse("Agiso answered without IsSuccess")
    code = _field(body, "Error_Code")
    message = _field(body, "Error_Msg")
    allow = _field(body, "AllowRetry")
    request_id = _field(body, "RequestId")
    return Envelope(
        success=success,
        data=_field(body, "Data"),
        code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        message=" ".join(message.split())[:MAX_MESSAGE] if isinstance(message, str) else "",
        allow_retry=allow if isinstance(allow, bool) else None,
        request_id=str(request_id)[:40] if isinstance(request_id, str | int) else None,
    )


def refusal_for(envelope: Envelope, what: str, *, write: bool) -> AgentError:
    """The error class of an IsSuccess-false answer. `write`: the call changes something (an
    upstream timeout then leaves its outcome unknown)."""
    code, text = envelope.code, escaped(envelope.message)
    said = f"Agiso {what}: {code} {text}".rstrip()
    if code in SHOP_REFUSALS:
        return AgisoRefused(f"{said} ({SHOP_REFUSALS[code]})", "shop")
    if code == BALANCE_EXHAUSTED:
        return BalanceExhausted(f"{said} ({APP_REFUSALS[code]})", "app")
    if code in APP_REFUSALS:
        return AgisoRefused(f"{said} ({APP_REFUSALS[code]})", "app")
    if code == RATE_LIMITED:
        return Transient(f"{said} (Api调用限制: over 20 calls a second)", retry_after=1.0)
    if code == UPSTREAM_TIMEOUT and write:
        return Ambiguous(f"{said} (超时: the marketplace may or may not have done it)")
    if envelope.allow_retry is True:
        return Transient(said)
    if code in BATCH_FAILED and envelope.allow_retry is None:
        batch = _batch_refusal(envelope, said)
        if batch is not None:
            return batch
    if code == ALREADY_SENT:
        return AlreadySent(said, code)
    if code == MESSAGE_LIMIT:
        return MessageLimit(said, code)
    if code == TRADE_NOT_FOUND:
        return TradeNotFound(said, code)
    if envelope.allow_retry is None and (code in UPSTREAM_ERRORS or code == UPSTREAM_TIMEOUT):
        return Transient(said)
    return AgisoError(said, code)


def _batch_refusal(envelope: Envelope, said: str) -> AgentError | None:
    """A failed batch call judged by its items: every item retryable (AllowRetry true, or
    ErrorCode -85) is Transient; an item refused for the shop's authorisation (-90) holds the
    shop; anything else is left to the envelope (None)."""
    items = envelope.item_errors()
    if not items:
        return None
    codes = sorted({str(code) for code, _ in items})
    said = f"{said} (items: {', '.join(codes)[:60]})"
    if any(code == ITEM_AUTH_FAILED for code, _ in items):
        return AgisoRefused(f"{said} ({SHOP_REFUSALS[AUTHORISATION_FAILED]})", "shop")
    if all(allow is True or (allow is None and code == ITEM_RETRYABLE) for code, allow in items):
        return Transient(said)
    return None


# --- the 20 calls a second, shared by every shop of an AppId -------------------------------------
class CallWindow:
    """At most `limit` calls reach the gateway in any `window` seconds. A call holds its slot
    from before it is sent until `window` seconds after its answer: the gateway counts
    arrivals, which fall somewhere in between (a call may wait for a connection after it got
    its slot), so every call arriving within any one window held a slot at the same moment.
    A token bucket would let a burst of its capacity through on top of its rate."""

    def __init__(
        self,
        limit: int,
        window: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._sleep = sleep
        self._until: dict[int, float] = {}  # slot -> when it frees (inf while in flight)
        self._ids = itertools.count()
        self._lock = asyncio.Lock()
        self.waited = 0.0

    async def _acquire(self) -> int:
        async with self._lock:  # one waiter at a time: the others queue behind it, in order
            while True:
                now = self._clock()
                for slot in [s for s, until in self._until.items() if until <= now]:
                    del self._until[slot]
                if len(self._until) < self.limit:
                    slot = next(self._ids)
                    self._until[slot] = math.inf
                    return slot
                wait = min(self._until.values()) - now
                wait = 0.02 if math.isinf(wait) else max(wait, 0.001)
                self.waited += wait
                await self._sleep(wait)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Holds a slot around one call."""
        slot = await self._acquire()
        try:
            yield
        finally:
            self._until[slot] = self._clock() + self.window


_LIMITERS: dict[tuple[str, int], CallWindow] = {}


def limiter_for(app_id: str, per_second: int) -> CallWindow:
    """The process's limiter of `app_id` (one per event loop: asyncio primitives belong to
    theirs). Shops asking for different limits share the lowest."""
    key = (app_id, id(asyncio.get_running_loop()))
    limiter = _LIMITERS.get(key)
    if limiter is None:
        limiter = _LIMITERS[key] = CallWindow(per_second)
    limiter.limit = min(limiter.limit, per_second)
    return limiter


# --- holds: calls stopped after a refusal --------------------------------------------------------
@dataclass
class Hold:
    error: AgisoRefused
    next_probe: float


class Holds:
    """A refusal stops calls (each is billed and would be refused the same way); one call per
    probe interval goes through to see whether it still holds. The AppId's hold is shared by
    its shops (a deposit or a signature is the AppId's), a shop's is its own."""

    def __init__(self, probe_interval: float, clock: Callable[[], float]) -> None:
        self.probe_interval = probe_interval
        self._clock = clock
        self.shop: Hold | None = None

    def admit(self, app: dict[str, Hold], app_id: str) -> None:
        """Raises the refusal while a hold stands, except for the call that probes."""
        now = self._clock()
        for hold in (app.get(app_id), self.shop):
            if hold is None:
                continue
            if now < hold.next_probe:
                wait = hold.next_probe - now
                raise type(hold.error)(str(hold.error), hold.error.scope, retry_after=wait)
            hold.next_probe = now + self.probe_interval  # this call is the probe

    def refused(self, app: dict[str, Hold], app_id: str, error: AgisoRefused) -> None:
        hold = Hold(error, self._clock() + self.probe_interval)
        if error.scope == "app":
            app[app_id] = hold
        else:
            self.shop = hold

    def answered(self, app: dict[str, Hold], app_id: str, *, shop: bool = True) -> bool:
        """An answer that got past Agiso's checks: the AppId's hold lifts, and the shop's
        when the call carried its token (`shop`). True when one did."""
        lifted = app.pop(app_id, None) is not None
        if shop and self.shop is not None:
            self.shop = None
            lifted = True
        return lifted


_APP_HOLDS: dict[str, Hold] = {}  # AppId -> its hold, shared by the process's shops


# --- the client ----------------------------------------------------------------------------------
def _worth_retrying_now(exc: BaseException) -> bool:
    return isinstance(exc, Transient | Ambiguous) and not isinstance(exc, AuthFailed)


class AgisoClient:
    """One shop (one AccessToken) of one AppId. Never follows a redirect; bodies are capped
    and read by the bounded decoder; the token and the AppSecret are never logged (their
    fingerprints are) and are registered with agent.redact so no error text shows them."""

    def __init__(
        self,
        base_url: str,
        app_id: str,
        app_secret: str,
        access_token: str,
        *,
        timeout: float,
        max_connections: int,
        calls_per_second: int = DEFAULT_CALLS_PER_SECOND,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
        shop: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock`: the wall clock of `timestamp` and of holds (tests move it)."""
        register(app_secret, access_token)
        self._base = base_url.rstrip("/")
        self.app_id = app_id
        self._secret = app_secret
        self._token = access_token
        self._http = RestClient(timeout, max_connections)
        self._per_second = calls_per_second
        self._clock = clock
        self.holds = Holds(probe_interval, clock)
        self.shop = shop
        self.calls = 0

    def __repr__(self) -> str:
        return f"AgisoClient({self.shop}, app {self.app_id}, token {fingerprint(self._token)})"

    def signed_form(self, params: Mapping[str, str | int], *, with_app_id: bool) -> dict[str, str]:
        """The form of a call: its parameters, `timestamp` (and `appId` for the open
        platform's own service), and `sign` over all of them."""
        form = {name: str(value) for name, value in params.items()}
        if with_app_id:
            form["appId"] = self.app_id
        form["timestamp"] = str(int(self._clock()))
        form["sign"] = sign(form, self._secret)
        return form

    async def call(
        self,
        service: str,
        path: str,
        params: Mapping[str, str | int],
        *,
        write: bool,
        empty_ok: bool = False,
    ) -> Envelope:
        """One call. Returns the envelope of a successful answer; raises the error class of
        any other (see refusal_for). A write whose answer is lost or a 5xx is Ambiguous; a
        read's is Transient (it changed nothing). `empty_ok`: a read whose nothing-found is an
        answer (a sent log, a listing): 没有数据 (11, 114) comes back as success, Data None."""
        what = f"{service}{path}"
        self.holds.admit(_APP_HOLDS, self.app_id)
        is_open = service == OPEN_SERVICE
        headers = {"ApiVersion": API_VERSION}
        if not is_open:
            headers["Authorization"] = f"Bearer {self._token}"
        self.calls += 1
        try:
            async with limiter_for(self.app_id, self._per_second).slot():
                reply = await self._http.request(
                    "POST",
                    f"{self._base}/{service}{path}",
                    form=self.signed_form(params, with_app_id=is_open),
                    headers=headers,
                )
        except Ambiguous as exc:
            if write:
                raise
            raise Transient(str(exc)) from None
        envelope = self._envelope(reply, what, write=write)
        if not envelope.success and empty_ok and envelope.code in NO_DATA:
            envelope = dataclasses.replace(envelope, success=True, data=None)
        if envelope.success:
            if self.holds.answered(_APP_HOLDS, self.app_id, shop=not is_open):
                log.warning("agiso_calls_resumed", shop=self.shop, app_id=self.app_id)
            return envelope
        error = refusal_for(envelope, what, write=write)
        if isinstance(error, AgisoRefused):
            self.holds.refused(_APP_HOLDS, self.app_id, error)
            log.error(
                "agiso_calls_stopped",
                shop=self.shop,
                app_id=self.app_id,
                scope=error.scope,
                code=envelope.code,
                reason=str(error),
                token_fp=fingerprint(self._token),
            )
        elif envelope.code not in (ALREADY_SENT, RATE_LIMITED):
            # Past the token and signature checks: a hold on them lifts.
            self.holds.answered(_APP_HOLDS, self.app_id, shop=not is_open)
        raise error

    def _envelope(self, reply: Reply, what: str, *, write: bool) -> Envelope:
        if 300 <= reply.status < 400:
            raise Permanent(
                f"Agiso {what} redirects to {safe_url(reply.location or '')}; redirects are"
                " never followed (check base_url)"
            )
        if reply.status in (401, 403):
            error = AgisoRefused(f"Agiso {what}: HTTP {reply.status}", "shop")
            self.holds.refused(_APP_HOLDS, self.app_id, error)
            raise error
        if reply.status == 429:
            raise Transient(f"Agiso {what}: HTTP 429", retry_after=reply.retry_after or 1.0)
        if reply.status >= 500:
            if write:
                raise Ambiguous(f"Agiso {what}: HTTP {reply.status}, outcome unknown")
            raise Transient(f"Agiso {what}: HTTP {reply.status}", retry_after=reply.retry_after)
        if reply.status != 200:
            raise Permanent(f"Agiso {what}: HTTP {reply.status}")
        try:
            return parse_envelope(reply.json())
        except BadResponse as exc:
            if write:
                raise Ambiguous(f"Agiso {what} answered 200 with {exc}") from None
            raise BadResponse(f"Agiso {what}: {exc}") from None

    async def read(
        self,
        service: str,
        path: str,
        params: Mapping[str, str | int],
        *,
        empty_ok: bool = False,
    ) -> Envelope:
        """A call that changes nothing, tried up to three times over a few seconds.
        `empty_ok`: 没有数据 (11, 114) is an empty answer, Data None (see call)."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_worth_retrying_now),
            stop=stop_after_attempt(3),
            wait=wait_exponential(multiplier=0.1, max=1),
            reraise=True,
        ):
            with attempt:
                return await self.call(service, path, params, write=False, empty_ok=empty_ok)
        raise AssertionError("unreachable: tenacity reraises")

    async def write(self, service: str, path: str, params: Mapping[str, str | int]) -> Envelope:
        """A call that changes something: sent once; the adapter decides what follows."""
        return await self.call(service, path, params, write=True)

    def app_held(self) -> bool:
        """Calls of every shop of the AppId stand stopped (deposit, signature, AppId)."""
        return self.app_id in _APP_HOLDS

    async def deposit(self) -> float:
        """The AppId's prepaid deposit in yuan (open platform, /Bankroll/QueryDeposit). None
        left: BalanceExhausted, and the AppId's calls stop as for code 16."""
        envelope = await self.read(OPEN_SERVICE, "/Bankroll/QueryDeposit", {})
        data = envelope.data
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise BadResponse("Agiso /Bankroll/QueryDeposit answered no number")
        if data <= 0:
            error = BalanceExhausted(
                f"Agiso deposit is {data:.3f} yuan ({APP_REFUSALS[BALANCE_EXHAUSTED]})", "app"
            )
            self.holds.refused(_APP_HOLDS, self.app_id, error)
            raise error
        return float(data)

    async def close(self) -> None:
        await self._http.close()
