"""福禄 (Fulu) open platform adapter for card-key (卡密) purchases.

Protocol, per the Fulu open platform documentation and its public SDKs:
- every call is a JSON POST to one gateway URL with the public parameters app_key, method,
  timestamp ("yyyy-MM-dd HH:mm:ss", China time), version "2.0", format "json",
  charset "utf-8", sign_type "md5", app_auth_token "" and biz_content (the business parameters
  as a JSON string), plus sign;
- sign = md5(the characters of the compact JSON of all parameters but sign, sorted, then
  AppSecret appended), lower-case hex;
- the answer is {"code": 0, "message": ..., "result": "<JSON string>"}; code != 0 is an error;
- fulu.order.card.add {product_id, buy_num, customer_order_no} places the order (asynchronous:
  it never returns the cards); fulu.order.info.get {customer_order_no} reports order_state
  (untreated | processing | success | failed) and, on success, the cards, whose card_number and
  card_pwd are AES-256-ECB (PKCS#7) encrypted with the AppSecret as key, base64-encoded;
- customer_order_no is unique per merchant: placing it again cannot buy twice.

The merchant_ref of our purchase state machine is the customer_order_no, so an unclear
outcome is resolved with fulu.order.info.get before anything else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent import safejson
from agent.config import Section, SupplierSettings
from agent.domain import Ambiguous, BadResponse, CardItem, Permanent, PurchaseResult, Transient
from agent.signed_http import Redirected, SignedClient
from agent.suppliers.base import Balance

CHINA = timezone(timedelta(hours=8))
FINAL_FAILED = "failed"
STATE_MAP = {
    "success": "completed",
    "failed": "failed",
    "processing": "processing",
    "untreated": "processing",
}
# Messages Fulu uses when a customer_order_no is unknown or already used (matched loosely:
# a wrong guess only costs one more query, never a second purchase).
NOT_FOUND_HINTS = ("不存在", "not exist", "not found")
DUPLICATE_HINTS = ("重复", "已存在", "duplicate", "exists")
# Refusals that surely come before any order is made (the request itself, the product, the
# money). Any other error of card.add may follow an order Fulu made (its busy or internal
# errors are not documented): it is asked about by customer_order_no, never bought again
# under a new one on a guess (invariant 4).
REFUSED_HINTS = (
    "余额不足",
    "商品不存在",
    "库存不足",
    "下架",
    "签名",
    "app_key",
    "参数",
    "insufficient",
    "not exist",
    "invalid",
    "signature",
)


def fulu_sign(params: dict[str, Any], app_secret: str) -> str:
    body = json.dumps(
        {k: v for k, v in params.items() if k != "sign"}, ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.md5(("".join(sorted(body)) + app_secret).encode()).hexdigest()


def decrypt_card_field(value: str, app_secret: str) -> str:
    """AES-256-ECB, PKCS#7, key = AppSecret, base64 — as Fulu encrypts card numbers/secrets."""
    try:
        raw = base64.b64decode(value, validate=True)
        decryptor = Cipher(algorithms.AES(app_secret.encode()), modes.ECB()).decryptor()
        padded = decryptor.update(raw) + decryptor.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        return (unpadder.update(padded) + unpadder.finalize()).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise BadResponse("a card field could not be decrypted with the AppSecret") from None


def encrypt_card_field(value: str, app_secret: str) -> str:
    """The inverse, for the local fake of the platform in tests."""
    padder = padding.PKCS7(128).padder()
    padded = padder.update(value.encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(app_secret.encode()), modes.ECB()).encryptor()
    return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode()


class FuluError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"fulu error {code}: {message}")
        self.code = code
        self.message = message


def _hints(message: str, hints: tuple[str, ...]) -> bool:
    lowered = message.lower()
    return any(h in lowered for h in hints)


class FuluSupplier:
    def __init__(self, settings: SupplierSettings, app_secret: str) -> None:
        self.name = settings.name
        self._app_key = settings.api_key
        self._secret = app_secret
        # The signature lives in the body here, so the generic client's header signing is
        # ignored by Fulu; we reuse it for pooling, timeouts, size caps and error classes.
        self._client = SignedClient(
            settings.base_url, settings.api_key, app_secret, settings.timeout
        )

    async def _call(self, method: str, biz: dict[str, Any]) -> Any:
        params: dict[str, Any] = {
            "app_key": self._app_key,
            "method": method,
            "timestamp": datetime.now(CHINA).strftime("%Y-%m-%d %H:%M:%S"),
            "version": "2.0",
            "format": "json",
            "charset": "utf-8",
            "sign_type": "md5",
            "app_auth_token": "",
            "biz_content": json.dumps(biz, ensure_ascii=False, separators=(",", ":")),
        }
        params["sign"] = fulu_sign(params, self._secret)
        resp = await self._client.request("POST", "", payload=params)
        if resp.status >= 500:
            raise Ambiguous(f"fulu gateway HTTP {resp.status}")
        if resp.status >= 400:
            raise Permanent(f"fulu gateway HTTP {resp.status}")
        body = resp.json()
        if not isinstance(body, dict) or not isinstance(body.get("code"), int):
            raise BadResponse("fulu answer lacks a numeric code")
        if body["code"] != 0:
            raise FuluError(body["code"], str(body.get("message", ""))[:200])
        result = body.get("result") or "null"
        try:
            # The result is JSON inside a JSON string: read as boundedly as the body itself.
            return safejson.loads(result if isinstance(result, str) else "not JSON")
        except safejson.JsonError:
            raise BadResponse("fulu result is not JSON") from None

    def _result(self, info: Any, merchant_ref: str) -> PurchaseResult:
        if not isinstance(info, dict):
            raise BadResponse("fulu order info is not an object")
        state = STATE_MAP.get(str(info.get("order_state", "")))
        if state is None:
            raise BadResponse(f"unknown fulu order_state {str(info.get('order_state'))[:30]!r}")
        items: tuple[CardItem, ...] = ()
        if state == "completed":
            cards = info.get("cards")
            if not isinstance(cards, list):
                raise BadResponse("fulu order succeeded without a cards list")
            items = tuple(
                CardItem(
                    code=decrypt_card_field(str(card.get("card_number") or ""), self._secret)
                    if card.get("card_number")
                    else "",
                    secret=decrypt_card_field(str(card["card_pwd"]), self._secret),
                )
                for card in cards
                if isinstance(card, dict) and card.get("card_pwd")
            )
        return PurchaseResult(
            purchase_id=str(info.get("order_id") or merchant_ref),
            merchant_ref=merchant_ref,
            status=state,
            items=items,
            failure_code="fulu_failed" if state == FINAL_FAILED else None,
            failure_message=str(info.get("recharge_description") or "")[:200] or None,
        )

    async def purchase(
        self, merchant_ref: str, sku: str, quantity: int, max_price: Decimal | None
    ) -> PurchaseResult:
        try:
            product_id: int | str = int(sku)
        except ValueError:
            product_id = sku
        try:
            info = await self._call(
                "fulu.order.card.add",
                {
                    "product_id": product_id,
                    "buy_num": quantity,
                    "customer_order_no": merchant_ref,
                },
            )
        except FuluError as exc:
            if _hints(exc.message, REFUSED_HINTS) and not _hints(exc.message, DUPLICATE_HINTS):
                raise Permanent(str(exc)) from None
            # Already placed under this reference, or an error that may follow the order:
            # find out how it went.
            raise Ambiguous(str(exc)) from None
        except (BadResponse, Transient, Redirected) as exc:
            # A redirect is never followed; like an unreadable answer it is settled by asking
            # about the customer_order_no, never by ordering under a new one.
            raise Ambiguous(f"fulu card order: {exc}") from None
        result = self._result(info, merchant_ref)
        # card.add never carries the cards; a success here still needs info.get for them.
        if result.status == "completed" and not result.items:
            return PurchaseResult(result.purchase_id, merchant_ref, "processing")
        return result

    async def find_purchase(self, merchant_ref: str) -> PurchaseResult | None:
        try:
            info = await self._call("fulu.order.info.get", {"customer_order_no": merchant_ref})
        except FuluError as exc:
            if _hints(exc.message, NOT_FOUND_HINTS):
                return None
            raise Transient(str(exc)) from None
        return self._result(info, merchant_ref)

    async def get_purchase(self, purchase_id: str, merchant_ref: str) -> PurchaseResult:
        found = await self.find_purchase(merchant_ref)
        if found is None:
            raise Transient(f"fulu no longer shows order {merchant_ref}")
        return found

    async def balance(self) -> Balance:
        try:
            info = await self._call("fulu.user.info.get", {})
        except FuluError as exc:
            raise Transient(str(exc)) from None
        try:
            return Balance(Decimal(str(info["balance"])), "CNY")
        except (KeyError, TypeError, InvalidOperation):
            raise BadResponse("fulu user info lacks a balance") from None

    async def close(self) -> None:
        await self._client.close()


# --- registration (agent.suppliers.KINDS) -------------------------------------------------------
def parse_options(section: Section) -> None:
    """This kind has no keys beyond those every supplier shares."""
    return None


def build(settings: SupplierSettings, secret: str) -> FuluSupplier:
    """An adapter for the 福禄 open platform."""
    return FuluSupplier(settings, secret)
