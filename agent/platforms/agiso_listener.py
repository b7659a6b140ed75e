"""Agiso pushes (推送) through the inbound listener: `POST <push_path>?timestamp=&aopic=&sign=&
fromPlatform=` with the form field `json` (agent/platforms/agiso_push.py reads it).

The signature (md5 over the `json` field and the query's timestamp) and the timestamp's window
are checked before the json is parsed. A paid-order push becomes the shop's PlatformOrders,
taken into the ledger through the engine's own intake (records, claims, hands the deliveries
to the workers: the path the poller uses) and COMMITTED before the answer: an answered push is
one the ledger holds. Agiso may push an order again ("有可能消息重复推送", keyed on Tid and
status): the ledger's unique order line makes the repeat a no-op and it gets the same answer.
A push that cannot be taken in now (the order could not be read, the ledger failed, the engine
is not running) is answered with a failure, never a success, so that a retry or (淘宝) the
polling backstop brings it again. Other pushes (淘宝's "自动发货成功" of a consigned SKU, aopic
2048) go where accept_push sends them. The log names the Tid and the outcome only.

Agiso's examples answer a push with an empty body and HTTP 200; that is the success answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from agent.domain import AgentError, OrderPage
from agent.listener_routes import Inbound, ListenerContext, Mount, Outbound, Route
from agent.logs import get_logger
from agent.platforms.agiso_push import MAX_PUSH_BYTES, PushRejected

if TYPE_CHECKING:
    from agent.platforms.agiso import AgisoPlatform

log = get_logger("kami.agiso")

TEXT = "text/plain; charset=utf-8"
# The form-encoded body: `json` percent-encoded (up to three bytes a byte) and a few names.
MAX_FORM_BYTES = 3 * MAX_PUSH_BYTES + 4096
MAX_FORM_FIELDS = 16


def _answer(status: int, tid: str | None, outcome: str) -> Outbound:
    return Outbound(status, b"", TEXT, order_id=tid, action="push", outcome=outcome)


class QueryAuth:
    """Agiso signs the query and the form, not the headers: nothing to check before the body
    is read (the route's body cap applies); the handler checks the signature before it parses
    the json."""

    def before_body(
        self, method: str, path: str, headers: Mapping[str, str], now: float
    ) -> str | None:
        """Always None: the credentials are in the query and the form."""
        return None

    def after_body(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> str | None:
        """Always None: the signature is checked by the handler, before the json is parsed."""
        return None

    def refusal(self, reason: str) -> Outbound:
        """Never used (nothing is refused here)."""
        return _answer(403, None, "refused")


def read_form(body: bytes) -> dict[str, str]:
    """The push's form fields (application/x-www-form-urlencoded): the first of each name.
    PushRejected when it is not a form."""
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(
            text, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_FORM_FIELDS
        )
    except (UnicodeDecodeError, ValueError):
        raise PushRejected("push body is not a form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form


class PushReceiver:
    """The handler of one shop's pushes."""

    def __init__(self, platform: AgisoPlatform, context: ListenerContext) -> None:
        self.platform = platform
        self.context = context

    def _intake(self) -> Any:
        intakes = self.context.extra.get("intakes") or {}
        return intakes.get(self.platform.name)

    async def handle(self, inbound: Inbound) -> Outbound:
        """Verifies, reads and commits the push, then answers 200 (empty body); 403 for a
        push whose signature or timestamp is wrong; 503 when it could not be committed."""
        name = self.platform.name
        try:
            form = read_form(inbound.body)
            event, orders = await self.platform.read_pushed(inbound.query, form)
        except PushRejected as exc:
            log.warning("agiso_push_refused", platform=name, reason=str(exc))
            return _answer(403, None, "refused")
        except AgentError as exc:
            # The order could not be read: answered as a failure, for Agiso to push again.
            log.warning("agiso_push_not_read", platform=name, error_class=type(exc).__name__)
            return _answer(503, None, "failed")
        tid = event.tid
        if not orders:
            log.info("agiso_push_answered", platform=name, tid=tid, outcome="nothing_to_take")
            return _answer(200, tid, "answered")
        intake = self._intake()
        if intake is None:
            log.warning("agiso_push_not_taken", platform=name, tid=tid, reason="engine not running")
            return _answer(503, tid, "failed")
        # Transient/store errors propagate: the listener answers 503, nothing was promised.
        taken = await intake.take_page(OrderPage(list(orders), None, False))
        outcome = "taken" if taken else "already_taken"
        log.info("agiso_push_answered", platform=name, tid=tid, outcome=outcome)
        return _answer(200, tid, "answered" if taken else "replayed")


def push_routes(platform: AgisoPlatform, context: ListenerContext) -> Mount:
    """The route of one shop's pushes: POST <push_path> (default /agiso/<name>)."""
    receiver = PushReceiver(platform, context)
    path = platform.options.push_path or f"/agiso/{platform.name}"
    route = Route(platform.name, "POST", path, QueryAuth(), receiver.handle, MAX_FORM_BYTES)
    return Mount(routes=[route])
