"""Agiso's card pools (卡券/卡种, consignment): the calls issue 17 item 3 will use to keep a
pool topped up from the ledger. Not wired into the engine yet (the ledger must first bind keys
to a pool in the same transaction as the intent); written and tested against the fake now.

Documented in knowledge-base/docs/alds/api.md: /CardPwd/Add {cpcId, data: one "card,pwd" per
line, at most 1000 lines, isUseFirst, allowReplace, summary, price} -> AddSuccessCount,
AddFailCount, Replace*Count; /CardPwdCategory/GetStorage {idNos: "1,2"} -> [{IdNo, Qty}]
("库存量大概值": an approximate count); /CardPwd/StockBack {cpcId, cardNo} ->
StockBackSuccCount. None of them is idempotent by a key of ours: a lost /CardPwd/Add answer is
reconciled by reading the storage and adding the same lines again with allowReplace off
(a repeated card number is refused, never added twice: the pool kinds 禁止重复卡号).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.domain import BadResponse, CardItem, Permanent
from agent.platforms.agiso_client import AgisoClient

MAX_LINES = 1000  # "最多1000行卡券"
POOL_SERVICE = "alds"


@dataclass(frozen=True, slots=True)
class AddResult:
    added: int
    failed: int
    replaced: int


def pool_lines(items: Sequence[CardItem]) -> str:
    """The `data` of /CardPwd/Add: "card,pwd" per line. A key holding a comma or a line break
    cannot be written so (it would become other keys): refused, not mangled."""
    if not items:
        raise Permanent("no keys to add")
    if len(items) > MAX_LINES:
        raise Permanent(f"/CardPwd/Add takes at most {MAX_LINES} keys a call, got {len(items)}")
    lines = []
    for item in items:
        for part in (item.code, item.secret):
            if "," in part or "\n" in part or "\r" in part:
                raise Permanent("a key with a comma or a line break cannot go to an Agiso pool")
        lines.append(f"{item.code},{item.secret}" if item.code else item.secret)
    return "\n".join(lines)


def _count(data: Any, name: str) -> int:
    value = data.get(name) if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadResponse(f"Agiso pool answer without {name}")
    return value


async def add_to_pool(
    client: AgisoClient, cpc_id: str, items: Sequence[CardItem], *, use_first: bool = False
) -> AddResult:
    """Adds the keys to pool (卡种) `cpc_id`, never replacing a card already there."""
    params: dict[str, str | int] = {
        "cpcId": cpc_id,
        "data": pool_lines(items),
        "isUseFirst": int(use_first),
        "allowReplace": 0,
    }
    envelope = await client.write(POOL_SERVICE, "/CardPwd/Add", params)
    data = envelope.data
    replaced = 0
    if isinstance(data, dict):
        for name in ("ReplaceUnSoldSuccessCount", "ReplaceSoldSuccessCount"):
            value = data.get(name)
            replaced += value if isinstance(value, int) and not isinstance(value, bool) else 0
    return AddResult(_count(data, "AddSuccessCount"), _count(data, "AddFailCount"), replaced)


async def pool_levels(client: AgisoClient, cpc_ids: Sequence[str]) -> dict[str, int]:
    """The approximate number of keys left in each pool."""
    envelope = await client.read(
        POOL_SERVICE, "/CardPwdCategory/GetStorage", {"idNos": ",".join(cpc_ids)}
    )
    if not isinstance(envelope.data, list):
        raise BadResponse("Agiso /CardPwdCategory/GetStorage answered no list")
    levels: dict[str, int] = {}
    for entry in envelope.data:
        if not isinstance(entry, dict):
            continue
        pool, qty = entry.get("IdNo"), entry.get("Qty")
        if isinstance(pool, int | str) and isinstance(qty, int) and not isinstance(qty, bool):
            levels[str(pool)] = qty
    return levels


async def take_back(client: AgisoClient, cpc_id: str, card_no: str) -> int:
    """/CardPwd/StockBack (卡券回库) of one card number; how many came back."""
    envelope = await client.write(
        POOL_SERVICE, "/CardPwd/StockBack", {"cpcId": cpc_id, "cardNo": card_no}
    )
    return _count(envelope.data, "StockBackSuccCount")
