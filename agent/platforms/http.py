"""Adapter for the platform HTTP protocol (docs/protocol/platform-http.md)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from agent.config import PlatformSettings, Section
from agent.domain import (
    Ambiguous,
    AuthFailed,
    BadResponse,
    CardItem,
    DeliveryConflict,
    OrderClosed,
    OrderPage,
    Permanent,
    RemoteDelivery,
    StockNotOffered,
    Transient,
)
from agent.logs import get_logger
from agent.platforms.parsing import (
    ParseError,
    parse_items,
    parse_order_page,
    parse_remote_order,
)
from agent.reasons import CLOSED_BEFORE_DELIVERY, DELIVERED_WITH_OTHER_ITEMS, english
from agent.signed_http import (
    DEFAULT_CONNECTIONS,
    HttpResponse,
    SignedClient,
    quote_segment,
    raise_for_status,
)

log = get_logger("kami.platform.http")


def read_order_page(resp: HttpResponse, what: str) -> OrderPage:
    """The page of orders in a listing's body. BadResponse (naming `what`) when the page as a
    whole cannot be read; a single bad order in it is the page's to reject, not a failure."""
    try:
        return parse_order_page(resp.json())
    except ParseError as exc:
        raise BadResponse(f"{what}: {exc}") from None


# In-call retries only (seconds); anything longer is scheduled in the order row.
IN_CALL_RETRY_AFTER = 2.0


def _worth_retrying_now(exc: BaseException) -> bool:
    # A GET has no side effect, so an ambiguous read is just a failed read. Bad credentials
    # will not fix themselves within seconds, and a platform that asks for a longer pause
    # (429/503 Retry-After) gets it: the caller schedules the next try.
    if isinstance(exc, AuthFailed) or not isinstance(exc, Transient | Ambiguous):
        return False
    return (exc.retry_after or 0.0) <= IN_CALL_RETRY_AFTER


_backoff = wait_exponential(multiplier=0.2, max=2)


def _wait_for_retry(state: RetryCallState) -> float:
    """The backoff, but never less than the platform's Retry-After."""
    exc = state.outcome.exception() if state.outcome is not None else None
    asked = getattr(exc, "retry_after", None) or 0.0
    return max(_backoff(state), asked)


def _read_retrying() -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception(_worth_retrying_now),
        stop=stop_after_attempt(3),
        wait=_wait_for_retry,
        reraise=True,
    )


def _error_code(resp: HttpResponse) -> str | None:
    """The protocol's `error.code`, or None when the body carries none."""
    try:
        body = resp.json()
    except BadResponse:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _conflict_delivery(resp: HttpResponse) -> tuple[CardItem, ...] | None:
    """The items of the `delivery` a 409 already_delivered carries; None when it has none."""
    try:
        body = resp.json()
    except BadResponse:
        return None
    delivery = body.get("delivery") if isinstance(body, dict) else None
    if not isinstance(delivery, dict) or "items" not in delivery:
        return None
    try:
        return parse_items(delivery["items"])
    except ParseError:
        return None


class HttpPlatform:
    def __init__(
        self, settings: PlatformSettings, secret: str, max_connections: int = DEFAULT_CONNECTIONS
    ) -> None:
        """`max_connections`: see agent.runtime.platform_connections."""
        self.name = settings.name
        self._page_size = settings.page_size
        self._client = SignedClient(
            settings.base_url, settings.api_key, secret, settings.timeout, max_connections
        )
        # False once the platform refused a count with its watermark (a platform built to the
        # plain `{"available": n}` body): its counts go out plain from then on.
        self._takes_as_of = True

    async def _read(self, path: str, params: dict[str, str | int] | None = None) -> HttpResponse:
        async for attempt in _read_retrying():
            with attempt:
                resp = await self._client.request("GET", path, params=params)
                raise_for_status(resp, "platform", unknown_outcome=False)
                return resp
        raise AssertionError("unreachable: tenacity reraises")

    async def list_paid(self, cursor: str | None) -> OrderPage:
        params: dict[str, str | int] = {"status": "paid", "limit": self._page_size}
        if cursor:
            params["cursor"] = cursor
        resp = await self._read("/api/v1/orders", params)
        return read_order_page(resp, "order list")

    async def wait_for_orders(self, cursor: str | None, wait_seconds: float) -> OrderPage:
        params: dict[str, str | int] = {"timeout": int(wait_seconds), "limit": self._page_size}
        if cursor:
            params["cursor"] = cursor
        resp = await self._client.request(
            "GET", "/api/v1/orders/wait", params=params, read_timeout=wait_seconds + 10
        )
        raise_for_status(resp, "platform", unknown_outcome=False)
        return read_order_page(resp, "order wait")

    async def get_order(self, order_id: str) -> RemoteDelivery:
        resp = await self._read(f"/api/v1/orders/{quote_segment(order_id)}")
        try:
            return parse_remote_order(resp.json())
        except ParseError as exc:
            raise BadResponse(f"order {order_id}: {exc}") from None

    async def deliver(
        self, order_id: str, idempotency_key: str, items: Sequence[CardItem], message: str
    ) -> None:
        payload = {
            "items": [{"code": item.code, "secret": item.secret} for item in items],
            "message": message,
        }
        resp = await self._client.request(
            "POST",
            f"/api/v1/orders/{quote_segment(order_id)}/delivery",
            payload=payload,
            headers={"Idempotency-Key": idempotency_key},
            unknown_outcome=True,
        )
        if resp.status == 409:
            code = _error_code(resp)
            if code in ("order_cancelled", "order_refunded"):
                status = code.removeprefix("order_")
                raise OrderClosed(CLOSED_BEFORE_DELIVERY[status], status)
            if await self._holds_these_items(order_id, resp, items):
                return  # delivered already, with exactly our keys (an earlier attempt)
            raise DeliveryConflict(english(DELIVERED_WITH_OTHER_ITEMS, error=resp.error_text()))
        raise_for_status(resp, "platform", unknown_outcome=True)
        try:
            body = resp.json()
        except BadResponse:
            raise Ambiguous("delivery answered 2xx with malformed JSON") from None
        if not isinstance(body, dict) or body.get("status") != "delivered":
            raise Ambiguous(f"delivery answered {resp.status} without status 'delivered'")

    async def _holds_these_items(
        self, order_id: str, conflict: HttpResponse, items: Sequence[CardItem]
    ) -> bool:
        """A 409 already_delivered: True when the delivery the platform holds is exactly
        `items` (ours, sent before under another key or with the answer lost), so the order
        is delivered, not in conflict. The 409 carries the existing `delivery`; a body without
        a readable one is settled by reading the order."""
        delivery = _conflict_delivery(conflict)
        if delivery is None:
            try:
                remote = await self.get_order(order_id)
            except (Transient, Ambiguous) as exc:
                raise Ambiguous(f"409 on delivery, and the order cannot be read: {exc}") from None
            if remote.status != "delivered":
                return False
            delivery = remote.items
        return Counter((i.code, i.secret) for i in delivery) == Counter(
            (i.code, i.secret) for i in items
        )

    async def replace_delivery(
        self,
        order_id: str,
        idempotency_key: str,
        replaces: str,
        items: Sequence[CardItem],
        message: str,
    ) -> None:
        """platform-http v1.1: the delivery body with `replaces`, the idempotency key of the
        delivery it replaces. A 1.0 platform ignores the field and answers 409
        already_delivered: refused as Permanent, saying the platform cannot replace."""
        payload = {
            "items": [{"code": item.code, "secret": item.secret} for item in items],
            "message": message,
            "replaces": replaces,
        }
        resp = await self._client.request(
            "POST",
            f"/api/v1/orders/{quote_segment(order_id)}/delivery",
            payload=payload,
            headers={"Idempotency-Key": idempotency_key},
            unknown_outcome=True,
        )
        if resp.status == 409:
            code = _error_code(resp)
            if code in ("order_cancelled", "order_refunded"):
                status = code.removeprefix("order_")
                raise OrderClosed(f"platform: order {status}; no replacement", status)
            if code == "replaces_stale":
                raise DeliveryConflict(f"platform: {resp.error_text()}")
            raise Permanent(
                "the platform refused the replacement (a platform-http 1.0 platform cannot"
                f" replace delivered keys): {resp.error_text()}"
            )
        raise_for_status(resp, "platform", unknown_outcome=True)
        try:
            body = resp.json()
        except BadResponse:
            raise Ambiguous("replacement answered 2xx with malformed JSON") from None
        if not isinstance(body, dict) or body.get("status") != "delivered":
            raise Ambiguous(f"replacement answered {resp.status} without status 'delivered'")

    async def notice(self, order_id: str, message: str, idempotency_key: str | None = None) -> None:
        """platform-http v1.1: the same Idempotency-Key again -> 204 and no second message
        (a v1 platform ignores the header)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        resp = await self._client.request(
            "POST",
            f"/api/v1/orders/{quote_segment(order_id)}/notice",
            payload={"message": message},
            headers=headers,
            unknown_outcome=True,
        )
        raise_for_status(resp, "platform", unknown_outcome=True)

    async def refund(self, order_id: str, idempotency_key: str, reason: str) -> None:
        resp = await self._client.request(
            "POST",
            f"/api/v1/orders/{quote_segment(order_id)}/refund",
            payload={"reason": reason},
            headers={"Idempotency-Key": idempotency_key},
            unknown_outcome=True,
        )
        raise_for_status(resp, "platform", unknown_outcome=True)
        try:
            body = resp.json()
        except BadResponse:
            raise Ambiguous("refund answered 2xx with malformed JSON") from None
        if not isinstance(body, dict) or body.get("status") != "refunded":
            raise Ambiguous(f"refund answered {resp.status} without status 'refunded'")

    async def publish_stock(self, sku: str, available: int) -> None:
        """platform-http v1.1 without a watermark: the platform takes the count as of now."""
        await self._put_stock(sku, {"available": max(0, available)})

    async def publish_stock_as_of(self, sku: str, available: int, as_of: str) -> None:
        """platform-http v1.1: PUT /api/v1/skus/{sku}/stock {"available": n, "as_of": cursor};
        the platform subtracts the sales listed after `as_of` before it sells. A platform
        that refuses the body with `as_of` (400, or 422 for anything but the count) gets
        the plain count, as a v1.1 platform without watermarks expects; one that refuses
        only this cursor (`bad_as_of`) gets it plain this once."""
        if not self._takes_as_of:
            await self.publish_stock(sku, available)
            return
        await self._put_stock(sku, {"available": max(0, available), "as_of": as_of})

    async def _put_stock(self, sku: str, payload: dict[str, object]) -> None:
        resp = await self._client.request(
            "PUT",
            f"/api/v1/skus/{quote_segment(sku)}/stock",
            payload=payload,
            unknown_outcome=True,
        )
        # The error code decides only a refusal (204, the common answer, has no body).
        code = _error_code(resp) if resp.status in (400, 404, 422) else None
        if "as_of" in payload and (
            resp.status == 400 or (resp.status == 422 and code != "bad_available")
        ):
            if code != "bad_as_of":
                self._takes_as_of = False
                log.warning(
                    "stock_as_of_refused",
                    platform=self.name,
                    status=resp.status,
                    code=(code or "")[:64],
                )
            await self._put_stock(sku, {"available": payload["available"]})
            return
        if resp.status == 404:
            if code == "unknown_sku":
                raise StockNotOffered(f"platform sells no SKU {sku!r}", sku)
            raise StockNotOffered("platform has no stock endpoint (platform-http v1)")
        # A PUT of an absolute count: a 5xx after the change leaves it applied or not, and
        # either is a count we published; the sync only needs to know it is unsure.
        raise_for_status(resp, "platform", unknown_outcome=True)

    async def ping(self) -> None:
        params: dict[str, str | int] = {"status": "paid", "limit": 1}
        await self._read("/api/v1/orders", params)

    async def close(self) -> None:
        await self._client.close()


def parse_options(section: Section) -> None:
    """The http kind has no keys beyond those every platform shares."""
    return None


def build(settings: PlatformSettings, secret: str, max_connections: int) -> HttpPlatform:
    """An adapter for the platform-http v1 protocol."""
    return HttpPlatform(settings, secret, max_connections)
