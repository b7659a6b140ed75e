"""The Feishu (飞书) group robot: the settings every signing robot has
(agent.notify.robot_settings); the notifier is agent.notify.robots'."""

from __future__ import annotations

from collections.abc import Callable

from agent.notify.base import timeout_kwargs
from agent.notify.robot_settings import SigningRobotOptions as Options
from agent.notify.robot_settings import parse_signing_robot as parse_options
from agent.notify.robots import FeishuNotifier

__all__ = ["Options", "build", "parse_options"]


def build(
    name: str, options: Options, secret: Callable[[str], str], timeout: float | None
) -> FeishuNotifier:
    """A group robot, signing when it has a sign_secret."""
    sign = secret(options.sign_secret) if options.sign_secret else None
    return FeishuNotifier(name, secret(options.url_secret), sign, **timeout_kwargs(timeout))
