"""The 福禄 adapter against the local fake of its gateway, plus pinned vectors."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.config import SkuSettings, SupplierSettings
from agent.domain import Ambiguous, Permanent
from agent.sandbox.platform import SandboxPlatform
from agent.store.base import Store
from agent.suppliers.fulu import FuluSupplier, decrypt_card_field, fulu_sign
from tests.conftest import make_config
from tests.fakes.fulu import FakeFulu
from tests.helpers import assert_platform_invariants, delivered_all, running_agent, wait_for

APP_KEY = "i4esv1l+76l/7NQC"
APP_SECRET = "0a091b3aa4324435aab703142518a8f7"


def test_sign_and_card_decryption_vectors() -> None:
    # Pinned; each was also computed outside Python (md5sum over the sorted characters,
    # `openssl enc -aes-256-ecb -K <hex of the AppSecret>`).
    params = {
        "app_key": APP_KEY,
        "method": "fulu.order.info.get",
        "timestamp": "2026-11-25 10:00:00",
        "version": "2.0",
        "format": "json",
        "charset": "utf-8",
        "sign_type": "md5",
        "app_auth_token": "",
        "biz_content": '{"customer_order_no":"K1"}',
    }
    assert fulu_sign(params, APP_SECRET) == "39cf5c0a2eb1e5d6e110917406c357ff"
    reordered = dict(reversed(list(params.items())))
    assert fulu_sign(reordered, APP_SECRET) == "39cf5c0a2eb1e5d6e110917406c357ff"
    assert decrypt_card_field("bxk8R8P5SSJi7UJddnLJjw==", APP_SECRET) == "CARD-PWD-123"


def test_card_decryption_of_the_documentation_samples() -> None:
    # Fulu's own test data, as its documentation and demo SDKs give it ("基础数据（测试使用）":
    # the sandbox AppSecret and an encrypted TestCardnumber / TestCardpassword), decrypted as
    # its PHP demo does: openssl_decrypt(base64_decode(v), "aes-256-ecb", AppSecret).
    secret = "0a091b3aa4324435aab703142518a8f7"
    number = decrypt_card_field("12nCp6X/nALmrvr1erxK+D4L8n/kqz/RItKWUfvZrCU=", secret)
    password = decrypt_card_field("9HeOgdv+NpLihh2+5Gm0Mj4L8n/kqz/RItKWUfvZrCU=", secret)
    assert (number, password) == ("CD1000250201906121742434441", "CP1000250201906121742434441")


@pytest.fixture
async def fulu() -> AsyncIterator[FakeFulu]:
    fake = FakeFulu(APP_KEY, APP_SECRET, {10000001: "9.50"})
    await fake.start()
    yield fake
    await fake.stop()


def settings(fake: FakeFulu, **overrides: object) -> SupplierSettings:
    values: dict[str, object] = {
        "name": "fulu",
        "kind": "fulu",
        "base_url": fake.base_url,
        "api_key": APP_KEY,
        "secret_name": "supplier.fulu.secret",
        "timeout": 0.5,
        "query_grace": 0.2,
        "processing_poll": 0.05,
    }
    values.update(overrides)
    return SupplierSettings(**values)  # type: ignore[arg-type]


async def test_adapter_order_then_cards(fulu: FakeFulu) -> None:
    client = FuluSupplier(settings(fulu), APP_SECRET)
    try:
        placed = await client.purchase("kami-ref-1", "10000001", 2, None)
        assert placed.status == "processing" and not placed.items
        assert await client.find_purchase("no-such-ref") is None
        fulu.processing_seconds = 0
        fulu.orders["kami-ref-1"].ready_at = 0
        done = await client.get_purchase(placed.purchase_id, "kami-ref-1")
        assert done.status == "completed"
        assert [i.code for i in done.items] == [
            f"NO-{placed.purchase_id}-0",
            f"NO-{placed.purchase_id}-1",
        ]
        assert all(i.secret.startswith("PWD-") for i in done.items)
        with pytest.raises(Ambiguous):  # the same reference again: never a second order
            await client.purchase("kami-ref-1", "10000001", 2, None)
        with pytest.raises(Permanent):
            await client.purchase("kami-ref-2", "99999", 1, None)
        assert (await client.balance()).amount == 10_000 - 19
        assert len(fulu.orders) == 1
    finally:
        await client.close()


async def test_an_error_after_the_order_was_made_is_asked_about_not_bought_again(
    fulu: FakeFulu,
) -> None:
    # An error code the documents do not list may come after Fulu made the order: the
    # adapter says "unknown" (asked about by customer_order_no), never "failed", which would
    # let the engine buy again under a new reference (invariant 4).
    client = FuluSupplier(settings(fulu), APP_SECRET)
    try:
        fulu.error_after_commit = (5000, "系统繁忙，请稍后再试")
        with pytest.raises(Ambiguous):
            await client.purchase("kami-ref-9", "10000001", 1, None)
        found = await client.find_purchase("kami-ref-9")
        assert found is not None and found.merchant_ref == "kami-ref-9"
        with pytest.raises(Permanent, match="余额不足"):  # refused before any order: failed
            fulu.balance = 0
            await client.purchase("kami-ref-10", "10000001", 1, None)
        assert list(fulu.orders) == ["kami-ref-9"]
    finally:
        await client.close()


async def test_wrong_secret_is_refused(fulu: FakeFulu) -> None:
    client = FuluSupplier(settings(fulu), "f" * 32)
    try:
        with pytest.raises(Permanent, match="1003"):
            await client.purchase("r", "10000001", 1, None)
    finally:
        await client.close()


async def test_engine_buys_through_fulu_once_per_order(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store, fulu: FakeFulu
) -> None:
    fulu.drop_after_commit_rate = 0.3
    ids = [sandbox.add_order("GAME-100", quantity=1 + i % 2) for i in range(12)]
    base = make_config(tmp_path, sandbox.base_url)
    sku = SkuSettings(
        sku="GAME-100", max_quantity=5, sources=("fulu",), supplier_skus={"fulu": "10000001"}
    )
    config = dataclasses.replace(base, skus={"GAME-100": sku}, suppliers=(settings(fulu),))
    async with running_agent(
        config, store, sandbox, {"fulu": FuluSupplier(settings(fulu), APP_SECRET)}
    ):
        await wait_for(delivered_all(sandbox, ids), "deliveries through fulu")
    assert_platform_invariants(sandbox)
    assert len(fulu.orders) == len(ids)  # one Fulu order per need, lost answers or not
    delivered = {s for keys in sandbox.delivered_secrets().values() for s in keys}
    assert all(s.startswith("PWD-") for s in delivered)
