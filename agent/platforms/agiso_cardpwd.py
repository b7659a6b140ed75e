"""Agiso's card pools (卡券/卡种, consignment): the calls agent/consignment.py keeps a pool topped
up from the ledger with (through AgisoPlatform), and the send log that says which keys a pool
sold to which order.

Documented in knowledge-base/docs/alds/api.md: /CardPwd/Add {cpcId, data: one "card,pwd" per
line, at most 1000 lines, isUseFirst, allowReplace, summary, price} -> AddSuccessCount,
AddFailCount, Replace*Count; /CardPwdCategory/GetStorage {idNos: "1,2"} -> [{IdNo, Qty}]
("库存量大概值": an approximate count); /CardPwd/StockBack {cpcId, cardNo} ->
StockBackSuccCount; /Trade/QueryTradeCPSendLog {tid} -> Orders[].SendCards[{CpcId,
Cards: [{Card, Pwd}]}] ("仅支持查询淘宝本地仓出库的订单 ... 如果接口没返回卡券，可能是还在
出库中，等待5分钟后再尝试"). None of them is idempotent by a key of ours: a lost
/CardPwd/Add answer is reconciled by reading the storage and adding the same lines again
with allowReplace off (0: "不覆盖"), so a card number already in the pool is refused, never
added twice (the pool kind 禁止重复卡号; whether a card already SOLD from the pool is refused
too is not documented: assumed, see docs/platforms/agiso.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.domain import BadResponse, CardItem, Permanent
from agent.platforms.agiso_client import AgisoClient
from agent.platforms.agiso_wire import text_id

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
    client: AgisoClient,
    cpc_id: str,
    items: Sequence[CardItem],
    *,
    use_first: bool = False,
    summary: str | None = None,
) -> AddResult:
    """Adds the keys to pool (卡种) `cpc_id`, never replacing a card already there
    (allowReplace 0). `summary` (描述) is shown with the batch in Agiso's back office: the
    ledger's reference of the add, so a merchant can find it."""
    params: dict[str, str | int] = {
        "cpcId": cpc_id,
        "data": pool_lines(items),
        "isUseFirst": int(use_first),
        "allowReplace": 0,
    }
    if summary:
        params["summary"] = summary
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


async def pool_sent_cards(client: AgisoClient, tid: str, cpc_ids: Sequence[str]) -> list[CardItem]:
    """The cards Agiso's pools `cpc_ids` sent for 淘宝 order `tid` (/Trade/QueryTradeCPSendLog;
    empty while the order is still going out: "等待5分钟后再尝试"). Cards of other pools (the
    merchant's other business on the same trade) are left out."""
    envelope = await client.read(
        POOL_SERVICE, "/Trade/QueryTradeCPSendLog", {"tid": tid}, empty_ok=True
    )
    wanted = set(cpc_ids)
    data = envelope.data
    cards: list[CardItem] = []
    orders = data.get("Orders") if isinstance(data, dict) else None
    for order in orders if isinstance(orders, list) else ():
        groups = order.get("SendCards") if isinstance(order, dict) else None
        for group in groups if isinstance(groups, list) else ():
            if not isinstance(group, dict) or text_id(group.get("CpcId")) not in wanted:
                continue
            for entry in group.get("Cards") or ():
                card = _sent_card(entry)
                if card is not None:
                    cards.append(card)
    return cards


def _sent_card(entry: Any) -> CardItem | None:
    """{Card, Pwd} as our key: a card with a number only is a key whose secret is that number
    (pool_lines wrote it without a comma)."""
    if not isinstance(entry, dict):
        return None
    card, pwd = entry.get("Card"), entry.get("Pwd")
    card = card if isinstance(card, str) else ""
    pwd = pwd if isinstance(pwd, str) else ""
    if not card and not pwd:
        return None
    return CardItem(card, pwd) if pwd else CardItem("", card)
