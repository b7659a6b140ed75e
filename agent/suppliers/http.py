"""Adapter for the supplier HTTP protocol (docs/protocol/supplier-http.md)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from agent.config import Section, SupplierSettings
from agent.domain import (
    Ambiguous,
    BadResponse,
    PurchaseResult,
)
from agent.platforms.parsing import ParseError, parse_items
from agent.signed_http import Redirected, SignedClient, quote_segment, raise_for_status
from agent.storable import escaped, storable
from agent.suppliers.base import Balance, SupplierProduct

PURCHASE_STATUSES = ("completed", "processing", "failed")


def parse_purchase(body: Any) -> PurchaseResult:
    if not isinstance(body, dict):
        raise BadResponse("purchase response is not an object")
    status = body.get("status")
    purchase_id = body.get("purchase_id")
    merchant_ref = body.get("merchant_ref")
    if status not in PURCHASE_STATUSES:
        raise BadResponse(f"purchase status {str(status)[:40]!r} is not one of {PURCHASE_STATUSES}")
    if not isinstance(purchase_id, str) or not isinstance(merchant_ref, str):
        raise BadResponse("purchase response lacks purchase_id or merchant_ref")
    if not storable(purchase_id):
        raise BadResponse("purchase_id holds characters no ledger can store")
    try:
        items = parse_items(body.get("items") or [])
    except ParseError as exc:
        raise BadResponse(f"purchase items: {exc}") from None
    if not all(storable(item.code) and storable(item.secret) for item in items):
        # Keys are stored (sealed) as they come: one we cannot store is no key to deliver.
        raise BadResponse("purchase items hold characters no ledger can store")
    failure = body.get("failure") if isinstance(body.get("failure"), dict) else {}
    assert isinstance(failure, dict)
    code, message = failure.get("code"), failure.get("message")
    return PurchaseResult(
        purchase_id=purchase_id,
        merchant_ref=merchant_ref,
        status=status,
        items=items,
        # Free text, kept as a reason: what no ledger stores is written escaped.
        failure_code=escaped(str(code)[:60]) if code else None,
        failure_message=escaped(str(message)[:200]) if message else None,
    )


def _ours(result: PurchaseResult, merchant_ref: str) -> PurchaseResult:
    """The purchase, if it is the one made under `merchant_ref`: the keys of another one
    (a supplier answering with the wrong purchase) are not this line's to bind."""
    if result.merchant_ref != merchant_ref:
        raise BadResponse("the supplier answered with a purchase under another merchant_ref")
    return result


def parse_product(body: Any) -> SupplierProduct:
    """A product answer; `available` must be a count >= 0 or null (the supplier does not say)."""
    if not isinstance(body, dict):
        raise BadResponse("product response is not an object")
    available = body.get("available")
    if available is not None and (
        not isinstance(available, int) or isinstance(available, bool) or available < 0
    ):
        raise BadResponse("product 'available' is not a count or null")
    try:
        price = Decimal(str(body["price"]))
    except (KeyError, InvalidOperation):
        raise BadResponse("product response lacks a decimal 'price'") from None
    if not price.is_finite() or price < 0:
        raise BadResponse("product 'price' is not a price")
    return SupplierProduct(price, str(body.get("currency", ""))[:10], available)


class HttpSupplier:
    def __init__(self, settings: SupplierSettings, secret: str) -> None:
        self.name = settings.name
        self._client = SignedClient(settings.base_url, settings.api_key, secret, settings.timeout)

    async def purchase(
        self, merchant_ref: str, sku: str, quantity: int, max_price: Decimal | None
    ) -> PurchaseResult:
        payload: dict[str, Any] = {"merchant_ref": merchant_ref, "sku": sku, "quantity": quantity}
        if max_price is not None:
            payload["max_price"] = str(max_price)
        try:
            resp = await self._client.request(
                "POST", "/api/v1/purchases", payload=payload, unknown_outcome=True
            )
        except Redirected as exc:
            # Not followed, so surely nothing was bought through it; but a refusal would let
            # the need be bought again under a new reference. Asking about this reference
            # first costs one query and can never buy twice.
            raise Ambiguous(f"purchase: {exc}") from None
        raise_for_status(resp, "supplier", unknown_outcome=True)
        try:
            return _ours(parse_purchase(resp.json()), merchant_ref)
        except BadResponse as exc:
            # A 2xx we cannot read may well be a purchase that went through.
            raise Ambiguous(f"unreadable purchase response: {exc}") from None

    async def find_purchase(self, merchant_ref: str) -> PurchaseResult | None:
        resp = await self._client.request(
            "GET", "/api/v1/purchases", params={"merchant_ref": merchant_ref}
        )
        if resp.status == 404:
            return None
        raise_for_status(resp, "supplier", unknown_outcome=False)
        return _ours(parse_purchase(resp.json()), merchant_ref)

    async def get_purchase(self, purchase_id: str, merchant_ref: str) -> PurchaseResult:
        resp = await self._client.request("GET", f"/api/v1/purchases/{quote_segment(purchase_id)}")
        raise_for_status(resp, "supplier", unknown_outcome=False)
        return _ours(parse_purchase(resp.json()), merchant_ref)

    async def product(self, sku: str) -> SupplierProduct:
        """GET /api/v1/products/{sku}: price and availability (stock sync)."""
        resp = await self._client.request("GET", f"/api/v1/products/{quote_segment(sku)}")
        raise_for_status(resp, "supplier", unknown_outcome=False)
        return parse_product(resp.json())

    async def balance(self) -> Balance:
        resp = await self._client.request("GET", "/api/v1/balance")
        raise_for_status(resp, "supplier", unknown_outcome=False)
        body = resp.json()
        try:
            return Balance(Decimal(str(body["balance"])), str(body.get("currency", "")))
        except (KeyError, TypeError, InvalidOperation):
            raise BadResponse("balance response lacks a decimal 'balance'") from None

    async def close(self) -> None:
        await self._client.close()


# --- registration (agent.suppliers.KINDS) -------------------------------------------------------
def parse_options(section: Section) -> None:
    """This kind has no keys beyond those every supplier shares."""
    return None


def build(settings: SupplierSettings, secret: str) -> HttpSupplier:
    """An adapter for the supplier-http v1 protocol."""
    return HttpSupplier(settings, secret)
