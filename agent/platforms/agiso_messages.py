"""The messages Agiso shops send their buyers: Chinese by default, per-SKU templates with
variables, and each channel's length and count limits (split across the messages allowed, or
refused with the reason before anything is sent).

Variables (Chinese or English names): {订单号}/{order_id}, {商品}/{product} (or {sku}),
{数量}/{quantity}, {卡号}/{code}, {卡密}/{secret}, {卡}/{card} (卡号 and 卡密 together, or 卡密
alone when the key has no card number). A line holding a card variable is repeated for every
key of the order; a template holding none gets the keys appended, one per line, so no key is
ever left out. `{{` and `}}` write braces.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.domain import CardItem
from agent.i18n import N_

DEFAULT_TEMPLATE = (
    "亲，您购买的「{商品}」已发货，订单号 {订单号}，共 {数量} 件：\n"
    "{卡}\n"
    "请妥善保管卡密，如有问题请联系客服。"
)
NAMES = {
    "订单号": "order_id",
    "商品": "product",
    "数量": "quantity",
    "卡号": "code",
    "卡密": "secret",
    "卡": "card",
}
# Other English names a template may use (the engine's [skus] message templates say {sku}).
ALIASES = {"sku": "product"}
CARD_VARIABLES = frozenset({"code", "secret", "card"})
_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


class TemplateError(ValueError):
    """A template that cannot be rendered; the message names what is wrong. It keeps its
    msgid (marked with N_) and values, said in the merchant's language by the config check."""

    def __init__(self, template: str, **values: str) -> None:
        super().__init__(template % values)
        self.template = template
        self.values = values

    def say(self, gettext: Callable[[str], str]) -> str:
        """The message in the language of `gettext`."""
        return gettext(self.template) % self.values


def _canonical(name: str) -> str:
    name = name.strip()
    if name in NAMES:
        return NAMES[name]
    if name in NAMES.values():
        return name
    if name in ALIASES:
        return ALIASES[name]
    known = "、".join(f"{{{n}}}" for n in NAMES)
    raise TemplateError(
        N_("unknown variable {%(name)s} (known: %(known)s, or their English names)"),
        name=name,
        known=known,
    )


def check_template(text: str) -> None:
    """Raises TemplateError for an unknown variable or a stray brace."""
    rest = _FIELD.sub(lambda m: "" if m.group(1) is None else _canonical(m.group(1)) and "", text)
    if "{" in rest or "}" in rest:
        raise TemplateError(N_("a single { or } (write {{ or }} for a brace)"))


def card_text(item: CardItem) -> str:
    return f"卡号：{item.code}  卡密：{item.secret}" if item.code else f"卡密：{item.secret}"


def _fill(line: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return match.group(0)[0]
        return values[_canonical(match.group(1))]

    return _FIELD.sub(value, line)


def _card_line(line: str) -> bool:
    return any(
        m.group(1) is not None and _canonical(m.group(1)) in CARD_VARIABLES
        for m in _FIELD.finditer(line)
    )


def render(
    template: str,
    order_id: str,
    product: str,
    quantity: int,
    items: Sequence[CardItem],
    *,
    append_cards: bool = True,
) -> str:
    """The message for one order: its card lines repeated for each key. `append_cards`: a
    template without a card variable gets the keys appended (off where the keys travel apart
    from the message, as platform-http's delivery carries them as items)."""
    base = {"order_id": order_id, "product": product, "quantity": str(quantity)}
    out: list[str] = []
    has_cards = False
    for line in template.split("\n"):
        if _card_line(line):
            has_cards = True
            for item in items:
                values = {**base, "code": item.code, "secret": item.secret, "card": card_text(item)}
                out.append(_fill(line, values))
        else:
            out.append(_fill(line, {**base, "code": "", "secret": "", "card": ""}))
    if not has_cards and append_cards:
        out += [card_text(item) for item in items]
    return "\n".join(out)


@dataclass(frozen=True, slots=True)
class Limits:
    """A channel's messages: at most `chars` characters each, at most `count` per order."""

    chars: int
    count: int


class TooLong(ValueError):
    """The message cannot be sent within the channel's limits; the text says why (Chinese
    first: it becomes the order's needs-attention reason, read by the merchant)."""


def split(text: str, limits: Limits, channel: str) -> list[str]:
    """The message in as few parts as fit `limits`, cut between lines only (a key is never cut
    in two). TooLong when a single line is longer than a message, or more parts are needed than
    the order may receive."""
    parts: list[str] = []
    current = ""
    for line in text.split("\n"):
        if len(line) > limits.chars:
            raise TooLong(
                f"{channel}消息一行有 {len(line)} 字，超过每条 {limits.chars} 字的上限"
                f" (a line of {len(line)} characters exceeds the {limits.chars}-character"
                " message limit)"
            )
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) <= limits.chars:
            current = candidate
        else:
            parts.append(current)
            current = line
    if current or not parts:
        parts.append(current)
    if len(parts) > limits.count:
        raise TooLong(
            f"{channel}消息需要 {len(parts)} 条，超过每单 {limits.count} 条的上限"
            f" (needs {len(parts)} messages, the order may receive {limits.count}):"
            " 请手动发货或缩短模板"
        )
    return parts
