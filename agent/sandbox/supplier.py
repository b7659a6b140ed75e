"""An embedded upstream supplier implementing docs/protocol/supplier-http.md, with faults.

It counts every purchase it *creates* (and charges), so tests can prove that the agent never
bought twice for one need, whatever happened to the responses.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from agent.sandbox.server import SignedSandbox


@dataclass
class SupplierFaults:
    error_rate: float = 0.0  # 503 before anything happens
    drop_after_commit_rate: float = 0.0  # purchase created and charged, response lost
    stall_after_commit_rate: float = 0.0  # purchase created, answer slower than any timeout
    processing_rate: float = 0.0  # purchase accepted as 'processing', completes later
    processing_seconds: float = 0.3
    latency: float = 0.0
    rate_limit_rate: float = 0.0
    down: bool = False  # every request fails with 503 (an outage)


@dataclass
class SandboxPurchase:
    purchase_id: str
    merchant_ref: str
    sku: str
    quantity: int
    status: str
    items: list[dict[str, str]] = field(default_factory=list)
    failure: dict[str, str] | None = None
    complete_at: float = 0.0

    def body(self) -> dict[str, Any]:
        return {
            "purchase_id": self.purchase_id,
            "merchant_ref": self.merchant_ref,
            "status": self.status,
            "items": self.items if self.status == "completed" else [],
            "failure": self.failure,
        }


class SandboxSupplier(SignedSandbox):
    def __init__(
        self,
        name: str = "sandbox",
        api_key: str = "supplier",
        secret: str | None = None,
        seed: int = 0,
        balance: str = "100000.00",
    ) -> None:
        super().__init__(api_key, secret, seed)
        self.name = name
        self.faults = SupplierFaults()
        self.balance = Decimal(balance)
        self.prices: dict[str, Decimal] = {}
        self.available: dict[str, int | None] = {}
        self.purchases: dict[str, SandboxPurchase] = {}  # by merchant_ref
        self._by_id: dict[str, SandboxPurchase] = {}
        self._serial = 0

    def add_product(self, sku: str, price: str = "5.00", available: int | None = None) -> None:
        self.prices[sku] = Decimal(price)
        self.available[sku] = available

    @property
    def charged(self) -> list[SandboxPurchase]:
        """Purchases that took money (completed or still processing)."""
        return [p for p in self.purchases.values() if p.status in ("completed", "processing")]

    def fault_rates(self) -> tuple[float, float, float]:
        error = 1.0 if self.faults.down else self.faults.error_rate
        return error, self.faults.rate_limit_rate, self.faults.latency

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/products/{sku}", self._product)
        app.router.add_get("/api/v1/balance", self._balance)
        app.router.add_post("/api/v1/purchases", self._purchase)
        app.router.add_get("/api/v1/purchases", self._find)
        app.router.add_get("/api/v1/purchases/{id}", self._get)

    def _advance(self, purchase: SandboxPurchase) -> None:
        if purchase.status == "processing" and time.time() >= purchase.complete_at:
            purchase.status = "completed"

    async def _product(self, request: web.Request) -> web.Response:
        sku = request.match_info["sku"]
        if sku not in self.prices:
            return self.error(404, "not_found", "no such product")
        return web.json_response(
            {
                "sku": sku,
                "price": str(self.prices[sku]),
                "currency": "CNY",
                "available": self.available[sku],
            }
        )

    async def _balance(self, _: web.Request) -> web.Response:
        return web.json_response({"balance": f"{self.balance:.2f}", "currency": "CNY"})

    async def _find(self, request: web.Request) -> web.Response:
        purchase = self.purchases.get(request.query.get("merchant_ref", ""))
        if purchase is None:
            return self.error(404, "not_found", "no purchase with that merchant_ref")
        self._advance(purchase)
        return web.json_response(purchase.body())

    async def _get(self, request: web.Request) -> web.Response:
        purchase = self._by_id.get(request.match_info["id"])
        if purchase is None:
            return self.error(404, "not_found", "no such purchase")
        self._advance(purchase)
        return web.json_response(purchase.body())

    async def _purchase(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
            ref, sku, quantity = str(body["merchant_ref"]), str(body["sku"]), int(body["quantity"])
            max_price = Decimal(str(body["max_price"])) if body.get("max_price") else None
        except (ValueError, KeyError, TypeError, InvalidOperation):
            return self.error(400, "bad_body", "merchant_ref, sku, quantity required")
        if ref in self.purchases:  # idempotent by merchant_ref: no second charge
            existing = self.purchases[ref]
            self._advance(existing)
            return web.json_response(existing.body(), status=201)
        if quantity < 1 or sku not in self.prices:
            return self.error(422, "bad_request", "unknown sku or bad quantity")
        self._serial += 1
        purchase = SandboxPurchase(f"P{self._serial:07d}", ref, sku, quantity, "completed")
        price = self.prices[sku]
        available = self.available[sku]
        if max_price is not None and price > max_price:
            purchase.status, purchase.failure = (
                "failed",
                {"code": "price_changed", "message": f"price is {price}"},
            )
        elif available is not None and available < quantity:
            purchase.status, purchase.failure = (
                "failed",
                {"code": "out_of_stock", "message": "not enough stock"},
            )
        elif self.balance < price * quantity:
            purchase.status, purchase.failure = (
                "failed",
                {"code": "insufficient_balance", "message": "top up your balance"},
            )
        else:
            self.balance -= price * quantity
            if available is not None:
                self.available[sku] = available - quantity
            purchase.items = [
                {
                    "code": f"{self.name}-{purchase.purchase_id}-{i}",
                    "secret": f"{self.name}-{self.random.getrandbits(64):016x}",
                }
                for i in range(quantity)
            ]
            if self.random.random() < self.faults.processing_rate:
                purchase.status = "processing"
                purchase.complete_at = time.time() + self.faults.processing_seconds
        self.purchases[ref] = purchase
        self._by_id[purchase.purchase_id] = purchase
        if self.random.random() < self.faults.drop_after_commit_rate:
            return self.lose_response(request)
        if self.random.random() < self.faults.stall_after_commit_rate:
            await asyncio.sleep(3600)  # the client times out first
        return web.json_response(purchase.body(), status=201)
