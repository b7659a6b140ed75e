"""A local fake of the 福禄 open platform gateway, built from its public documentation:
one POST endpoint, public parameters + biz_content, the sorted-characters MD5 signature,
asynchronous card orders, AES-256-ECB encrypted card fields. Written independently of the
adapter (no imports from agent.suppliers.fulu), so the adapter is checked against it."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.loopback import serve

PUBLIC = (
    "app_key",
    "method",
    "timestamp",
    "version",
    "format",
    "charset",
    "sign_type",
    "app_auth_token",
    "biz_content",
)


def expected_sign(params: dict[str, Any], secret: str) -> str:
    # "Serialize the parameters except sign to JSON, sort its characters, append the
    # AppSecret, MD5." Key order cannot matter once the characters are sorted.
    text = json.dumps(
        {k: params[k] for k in sorted(params) if k != "sign"},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.md5(("".join(sorted(text)) + secret).encode()).hexdigest()


def encrypt(value: str, secret: str) -> str:
    padder = padding.PKCS7(128).padder()
    data = padder.update(value.encode()) + padder.finalize()
    enc = Cipher(algorithms.AES(secret.encode()), modes.ECB()).encryptor()
    return base64.b64encode(enc.update(data) + enc.finalize()).decode()


@dataclass
class FakeOrder:
    order_id: str
    customer_order_no: str
    product_id: int
    buy_num: int
    ready_at: float
    cards: list[dict[str, str]] = field(default_factory=list)


class FakeFulu:
    def __init__(self, app_key: str, secret: str, products: dict[int, str]) -> None:
        self.app_key = app_key
        self.secret = secret
        self.products = {pid: float(price) for pid, price in products.items()}
        self.balance = 10_000.0
        self.orders: dict[str, FakeOrder] = {}
        self.calls: list[str] = []
        self.drop_after_commit_rate = 0.0
        # (code, message) answered to the next card.add after it made the order (an error
        # of Fulu's own, e.g. a busy backend, that does not say whether the order stands).
        self.error_after_commit: tuple[int, str] | None = None
        self.processing_seconds = 0.1
        self.random = random.Random(5)
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/api/getway", self._gateway)
        self._runner, self.base_url = await serve(app, shutdown_timeout=0.5)
        self.base_url += "/api/getway"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def _answer(code: int, message: str, result: Any = None) -> web.Response:
        return web.json_response(
            {
                "code": code,
                "message": message,
                "result": json.dumps(result, ensure_ascii=False) if result is not None else "",
                "sign": "",
            }
        )

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        params = await request.json()
        if any(key not in params for key in (*PUBLIC, "sign")):
            return self._answer(1001, "缺少公共参数")
        if params["app_key"] != self.app_key:
            return self._answer(1002, "app_key无效")
        if params["sign"] != expected_sign(params, self.secret):
            return self._answer(1003, "签名错误")
        biz = json.loads(params["biz_content"] or "{}")
        method = params["method"]
        self.calls.append(method)
        if method == "fulu.order.card.add":
            return self._card_add(request, biz)
        if method == "fulu.order.info.get":
            order = self.orders.get(str(biz.get("customer_order_no")))
            if order is None:
                return self._answer(2001, "订单不存在")
            return self._answer(0, "接口调用成功", self._info(order))
        if method == "fulu.user.info.get":
            return self._answer(0, "接口调用成功", {"balance": self.balance, "name": "test"})
        return self._answer(1004, "method不存在")

    def _card_add(self, request: web.Request, biz: dict[str, Any]) -> web.StreamResponse:
        ref = str(biz.get("customer_order_no"))
        if ref in self.orders:
            return self._answer(2002, "外部订单号已存在")
        product = int(biz.get("product_id", 0))
        if product not in self.products:
            return self._answer(3001, "商品不存在")
        quantity = int(biz.get("buy_num", 0))
        cost = self.products[product] * quantity
        if cost > self.balance:
            return self._answer(3002, "余额不足")
        self.balance -= cost
        order = FakeOrder(
            f"F{len(self.orders) + 1:08d}",
            ref,
            product,
            quantity,
            time.time() + self.processing_seconds,
        )
        order.cards = [
            {
                "card_number": encrypt(f"NO-{order.order_id}-{i}", self.secret),
                "card_pwd": encrypt(f"PWD-{self.random.getrandbits(48):012x}", self.secret),
                "card_deadline": "2027-12-31 23:59:59",
            }
            for i in range(quantity)
        ]
        self.orders[ref] = order
        if self.error_after_commit is not None:
            code, message = self.error_after_commit
            self.error_after_commit = None
            return self._answer(code, message)
        if self.random.random() < self.drop_after_commit_rate:
            if request.transport is not None:
                request.transport.close()
            return self._answer(0, "lost")
        return self._answer(
            0, "接口调用成功", {**self._info(order), "order_state": "untreated", "cards": None}
        )

    def _info(self, order: FakeOrder) -> dict[str, Any]:
        done = time.time() >= order.ready_at
        return {
            "order_id": order.order_id,
            "customer_order_no": order.customer_order_no,
            "product_id": order.product_id,
            "buy_num": order.buy_num,
            "order_type": 2,
            "order_state": "success" if done else "processing",
            "cards": order.cards if done else None,
        }
