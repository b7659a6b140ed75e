"""Starts and stops the merchant interfaces the config turns on: [console], [metrics],
[telegram_bot]. The daemon (agent/runtime.py) calls start() once the engine runs and stop()
before it drains."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from agent.config import Config
from agent.console.data import EngineView
from agent.domain import AgentError
from agent.logs import get_logger
from agent.redact import register
from agent.secrets import resolve_secret
from agent.store.base import Store

log = get_logger("kami.console")


async def serve(app: web.Application, host: str, port: int, what: str) -> web.AppRunner:
    """`app` listening on host:port; one clear line when the port cannot be had."""
    runner = web.AppRunner(app, access_log=None)  # URLs may carry searches: not logged
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise AgentError(f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return runner


class MerchantInterfaces:
    def __init__(self, config: Config, store: Store, engine: EngineView) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self._stops: list[Callable[[], Awaitable[None]]] = []

    async def start(self) -> None:
        settings = self.config.interfaces
        if settings is None:
            return
        if settings.console is not None:
            from agent.console.app import Console, build_app

            c = settings.console
            token = resolve_secret(c.token_secret) if c.token_secret else None
            register(token)
            console = Console(self.config, c, self.store, self.engine, token)
            runner = await serve(build_app(console), c.host, c.port, "console")
            self._stops.append(runner.cleanup)
            log.info("console_listening", host=c.host, port=c.port)
        if settings.metrics is not None:
            from agent.metrics import MetricsExporter

            exporter = MetricsExporter(settings.metrics, self.store, self.engine)
            await exporter.start()
            self._stops.append(exporter.stop)
        if settings.telegram_bot is not None:
            from agent.telegram_bot import TelegramBot

            b = settings.telegram_bot
            token = resolve_secret(b.token_secret)
            bot = TelegramBot(b, token, self.config, self.store, self.engine)
            await bot.start()
            self._stops.append(bot.stop)

    async def stop(self) -> None:
        while self._stops:
            stop = self._stops.pop()
            try:
                await stop()
            except Exception as exc:  # one interface failing to stop must not keep the rest up
                log.warning("interface_stop_failed", error=str(exc))
