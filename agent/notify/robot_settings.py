"""The settings DingTalk (钉钉) and Feishu (飞书) group robots share: both take a webhook URL and,
when the robot signs, a signing secret. The notifiers are agent.notify.robots'."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.settings import setting

if TYPE_CHECKING:
    from agent.config import Section


@dataclass(frozen=True, slots=True, kw_only=True)
class SigningRobotOptions:
    url_secret: str = setting(
        reader="secret",
        secret=True,
        help="name of the secret holding the robot's webhook URL (it carries the token)",
    )
    sign_secret: str | None = setting(
        None,
        reader="optional secret",
        secret=True,
        help="name of the secret holding the signing secret, when the robot signs",
    )


def parse_signing_robot(section: Section) -> SigningRobotOptions:
    """A signing robot's keys."""
    from agent.config import read_settings

    return read_settings(section, SigningRobotOptions)
