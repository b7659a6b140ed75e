"""Telegram bot control ([telegram_bot] in the config; opt-in): the merchant runs the shop from a
chat. It answers only the chat ids the config allows, and ignores everyone else in silence.

Commands: /status, /stock, /orders [state], /retry <order>, /import <SKU> (as the caption of
a stock file sent to the bot), /help. Alerts opened while it runs are pushed with inline
buttons (show the parked orders, retry one, show the stock); the buttons check the chat too.

It long-polls getUpdates (no webhook: nothing to expose), and speaks through the Bot API's
sendMessage, getFile and answerCallbackQuery. The bot token sits in every request's path, so
no URL ever reaches a log or an error text: errors are reported by their kind only.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from agent import safejson
from agent.aftersales import operator_action
from agent.alerts import Forecaster
from agent.config import Config
from agent.console.data import EngineView, read_overview, search_lines
from agent.console.labels import alert_kind_label, duration, severity_label, state_label
from agent.console.settings import TelegramBotSettings
from agent.domain import AgentError, LineState, OpenAlert, OrderLine
from agent.i18n import Translator, format_table, truncate
from agent.logs import get_logger
from agent.phrased import say
from agent.reasons import say_reason
from agent.redact import register
from agent.stockfile import StockFileReader
from agent.store.base import Store
from agent.textsafe import printable

log = get_logger("kami.telegram_bot")

MAX_REPLY_BYTES = 4 * 1024 * 1024
MAX_FILE_BYTES = 20 * 1024 * 1024  # what the Bot API lets a bot download
# sendMessage takes "1-4096 characters after entities parsing" (UTF-16 code units, as
# Telegram counts): the visible text, not the markup around it.
MAX_MESSAGE = 4096
# Flood control: a 429 names in parameters.retry_after how long to wait before repeating the
# call. Waits up to this long are sat out (at most twice per call); longer ones fail the call.
MAX_FLOOD_WAIT = 60.0
FLOOD_RETRIES = 2
# The pieces of a parse_mode=HTML text: a tag, an entity, or one character.
_HTML_PIECE = re.compile(r"<(/?)([A-Za-z-]+)[^<>]*>|&#?[0-9A-Za-z]+;|.", re.DOTALL)
# An import's rejection reasons in its reply: this many, each cut to this many cells, so the
# reply stays far below MAX_MESSAGE (a cut through an HTML entity would be refused).
MAX_REASONS = 10
MAX_REASON_WIDTH = 300
ORDERS_SHOWN = 10
BACKOFF_CAP = 60.0


class BotApiError(AgentError):
    """The Bot API could not be reached or refused a call; never carries the URL.
    `retry_after`: seconds Telegram asked us to wait (flood control), when it said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def fit_html(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` (parse_mode HTML, as the bot writes it) cut so that what Telegram shows is at
    most `limit` UTF-16 code units: never through a tag or an entity, ending in "…" and
    closing the tags still open, so Telegram can still parse it."""
    pieces = [(m.group(0), m.group(1), m.group(2)) for m in _HTML_PIECE.finditer(text)]

    def units(piece: str) -> int:
        return (
            1 if piece.startswith("&") and len(piece) > 1 else len(piece.encode("utf-16-le")) // 2
        )

    if sum(units(p) for p, _, tag in pieces if tag is None) <= limit:
        return text
    kept: list[str] = []
    open_tags: list[str] = []
    used = 0
    for piece, closing, tag in pieces:
        if tag is not None:
            if closing:
                if open_tags and open_tags[-1] == tag.lower():
                    open_tags.pop()
            else:
                open_tags.append(tag.lower())
            kept.append(piece)
            continue
        if used + units(piece) > limit - 1:
            break
        kept.append(piece)
        used += units(piece)
    return "".join(kept) + "…" + "".join(f"</{tag}>" for tag in reversed(open_tags))


class TelegramBot:
    def __init__(
        self,
        settings: TelegramBotSettings,
        token: str,
        config: Config,
        store: Store,
        engine: EngineView | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        register(token)
        self.settings = settings
        self.config = config
        self.store = store
        self.engine = engine
        self.clock = clock
        self._ = Translator(settings.language)
        self._base = f"{settings.api_base.rstrip('/')}/bot{token}"
        self._files = f"{settings.api_base.rstrip('/')}/file/bot{token}"
        self._allowed = frozenset(settings.allowed_chats)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._offset = 0
        # (alert key, opened at, chat) told: a round that fails part way tells no chat twice.
        self._pushed: set[tuple[str, float, int]] = set()
        self._strangers: set[int] = set()

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.poll_seconds + 15)
        )
        # Alerts already open are in /status; only the ones opened from now on are pushed.
        self._pushed = {
            (a.key, a.opened_at, chat)
            for a in await self.store.open_alerts()
            for chat in self.settings.allowed_chats
        }
        self._tasks = [
            asyncio.create_task(self._poll_loop(), name="telegram-bot-poll"),
            asyncio.create_task(self._alert_loop(), name="telegram-bot-alerts"),
        ]
        log.info("telegram_bot_started", chats=len(self._allowed))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # --- the Bot API --------------------------------------------------------------------------
    async def call(self, method: str, **payload: Any) -> Any:
        """One Bot API method; its `result`, or BotApiError naming the method and why. Flood
        control (HTTP 429 with parameters.retry_after) is waited out and the call repeated,
        when the wait is short."""
        for attempt in range(FLOOD_RETRIES + 1):
            try:
                return await self._call_once(method, payload)
            except BotApiError as exc:
                wait = exc.retry_after
                if wait is None or wait > MAX_FLOOD_WAIT or attempt == FLOOD_RETRIES:
                    raise
                log.warning("telegram_bot_flood_wait", method=method, seconds=wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _call_once(self, method: str, payload: dict[str, Any]) -> Any:
        assert self._session is not None
        try:
            async with self._session.post(
                f"{self._base}/{method}", json=payload, allow_redirects=False
            ) as response:
                body = await response.content.read(MAX_REPLY_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BotApiError(f"telegram {method}: {type(exc).__name__}") from None
        if len(body) > MAX_REPLY_BYTES:
            raise BotApiError(f"telegram {method}: reply too large")
        try:
            reply = safejson.loads(body)
        except ValueError:
            raise BotApiError(f"telegram {method}: HTTP {status}, not JSON") from None
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            description = reply.get("description") if isinstance(reply, dict) else None
            parameters = reply.get("parameters") if isinstance(reply, dict) else None
            retry_after = parameters.get("retry_after") if isinstance(parameters, dict) else None
            raise BotApiError(
                f"telegram {method}: HTTP {status}: {printable(str(description or ''))[:200]}",
                retry_after=float(retry_after)
                if isinstance(retry_after, int)
                and not isinstance(retry_after, bool)
                and retry_after >= 0
                else None,
            )
        return reply.get("result")

    async def download(self, file_id: str, target: Path) -> None:
        assert self._session is not None
        info = await self.call("getFile", file_id=file_id)
        path = info.get("file_path") if isinstance(info, dict) else None
        size = info.get("file_size") if isinstance(info, dict) else None
        if not isinstance(path, str) or ".." in path or path.startswith("/"):
            raise BotApiError("telegram getFile: no usable file_path")
        if isinstance(size, int) and size > MAX_FILE_BYTES:
            raise BotApiError("telegram getFile: file larger than 20 MB")
        try:
            async with self._session.get(
                f"{self._files}/{path}", allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise BotApiError(f"telegram file download: HTTP {response.status}")
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                written = 0
                with os.fdopen(fd, "wb") as handle:
                    async for chunk in response.content.iter_chunked(256 * 1024):
                        written += len(chunk)
                        if written > MAX_FILE_BYTES:
                            raise BotApiError("telegram file download: larger than 20 MB")
                        handle.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BotApiError(f"telegram file download: {type(exc).__name__}") from None

    async def say(
        self, chat_id: int, text: str, buttons: list[list[dict[str, str]]] | None = None
    ) -> None:
        payload: dict[str, Any] = {
            "chat_id": chat_id,
            "text": fit_html(text),
            "parse_mode": "HTML",
            # Bot API 7.0 replaced disable_web_page_preview with this.
            "link_preview_options": {"is_disabled": True},
        }
        if buttons:
            payload["reply_markup"] = {"inline_keyboard": buttons}
        await self.call("sendMessage", **payload)

    # --- loops --------------------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        failures = 0
        while True:
            try:
                updates = await self.call(
                    "getUpdates",
                    offset=self._offset,
                    timeout=self.settings.poll_seconds,
                    allowed_updates=["message", "callback_query"],
                )
                failures = 0
            except BotApiError as exc:
                failures += 1
                if failures == 1:
                    log.warning("telegram_bot_poll_failed", error=str(exc))
                # A flood-control wait longer than call() sits out is still honoured here.
                await asyncio.sleep(max(min(BACKOFF_CAP, 2.0**failures), exc.retry_after or 0))
                continue
            for update in updates if isinstance(updates, list) else []:
                if not isinstance(update, dict) or not isinstance(update.get("update_id"), int):
                    continue
                self._offset = max(self._offset, update["update_id"] + 1)
                try:
                    await self.handle(update)
                except AgentError as exc:
                    log.warning("telegram_bot_update_failed", error=str(exc))
                except Exception as exc:
                    # A fault of ours on one update: that update is lost, the bot goes on
                    # (its loop ending would leave the merchant talking to no one).
                    log.error("telegram_bot_update_failed", kind=type(exc).__name__, exc_info=exc)

    async def _alert_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.alert_interval)
            try:
                await self.push_alerts()
            except AgentError as exc:
                log.warning("telegram_bot_alerts_failed", error=str(exc))
            except Exception as exc:
                log.error("telegram_bot_alerts_failed", kind=type(exc).__name__, exc_info=exc)

    async def push_alerts(self) -> int:
        """Sends every alert opened since the last look to every allowed chat, with buttons."""
        alerts = await self.store.open_alerts()
        owed = [
            (alert, chat)
            for alert in alerts
            for chat in self.settings.allowed_chats
            if (alert.key, alert.opened_at, chat) not in self._pushed
        ]
        for alert, chat in owed:
            await self.say(chat, self._alert_text(alert), self._alert_buttons(alert))
            self._pushed.add((alert.key, alert.opened_at, chat))
        # bounded: open ones only
        self._pushed &= {
            (a.key, a.opened_at, c) for a in alerts for c in self.settings.allowed_chats
        }
        return len({(alert.key, alert.opened_at) for alert, _ in owed})

    # --- updates ------------------------------------------------------------------------------
    async def handle(self, update: dict[str, Any]) -> None:
        query = update.get("callback_query")
        if isinstance(query, dict):
            await self._callback(query)
            return
        message = update.get("message")
        if not isinstance(message, dict):
            return
        chat_id = _chat_of(message)
        if chat_id is None or not self._allowed_chat(chat_id):
            return
        text = message.get("text") or message.get("caption") or ""
        if not isinstance(text, str):
            return
        command, _, rest = text.strip().partition(" ")
        command = command.split("@", 1)[0].lower()  # /status@my_shop_bot in a group
        argument = rest.strip()
        document = message.get("document")
        if command == "/import":
            await self._import(chat_id, argument, document)
        elif command == "/status":
            await self.say(chat_id, await self.status_text())
        elif command == "/stock":
            await self.say(chat_id, await self.stock_text())
        elif command == "/orders":
            text, buttons = await self.orders_text(argument)
            await self.say(chat_id, text, buttons)
        elif command == "/retry":
            await self.say(chat_id, await self._retry_by_ref(argument))
        elif command in ("/start", "/help"):
            await self.say(chat_id, self.help_text())
        elif isinstance(document, dict):
            await self.say(chat_id, self._("Send a stock file with the caption /import SKU."))

    def _allowed_chat(self, chat_id: int) -> bool:
        if chat_id in self._allowed:
            return True
        if chat_id not in self._strangers and len(self._strangers) < 1000:
            self._strangers.add(chat_id)
            log.warning("telegram_bot_stranger", chat_id=chat_id)  # once per chat
        return False

    async def _callback(self, query: dict[str, Any]) -> None:
        query_id = query.get("id")
        message = query.get("message")
        chat_id = _chat_of(message) if isinstance(message, dict) else None
        data = query.get("data")
        if chat_id is None or not self._allowed_chat(chat_id) or not isinstance(data, str):
            if isinstance(query_id, str):
                await self.call("answerCallbackQuery", callback_query_id=query_id)
            return
        _ = self._
        answer = ""
        if data.startswith("retry:") and data[6:].isdigit():
            answer = await self._retry(int(data[6:]))
            await self.say(chat_id, html.escape(answer))
        elif data.startswith("orders:"):
            text, buttons = await self.orders_text(data[7:])
            await self.say(chat_id, text, buttons)
            answer = _("Orders")
        elif data == "stock":
            await self.say(chat_id, await self.stock_text())
            answer = _("Stock")
        if isinstance(query_id, str):
            await self.call("answerCallbackQuery", callback_query_id=query_id, text=answer[:190])

    # --- what the bot says --------------------------------------------------------------------
    def help_text(self) -> str:
        _ = self._
        return "\n".join(
            [
                _("kami-agent commands:"),
                "/status — " + _("deliveries today, backlog, alerts"),
                "/stock — " + _("stock, sales rate, time to empty"),
                "/orders [needs_attention] — " + _("latest orders, with retry buttons"),
                "/retry ORDER — " + _("send a parked order back to work"),
                "/import SKU — " + _("as the caption of a stock file sent here"),
            ]
        )

    async def status_text(self) -> str:
        _ = self._
        o = await read_overview(self.store, self.clock())
        facts = [
            f"{_('Delivered today')}: {o.delivered_today}{'+' if o.delivered_today_more else ''}",
            f"{_('Waiting to be delivered')}: {o.backlog}",
            f"{_('Need attention')}: {o.by_state.get(LineState.NEEDS_ATTENTION, 0)}",
            f"{_('Delivery time p50 / p99')}: "
            f"{duration(_, o.latency_p50)} / {duration(_, o.latency_p99)}",
            f"{_('Open alerts')}: {len(o.alerts)}",
            *(self._alert_line(alert) for alert in o.alerts[:10]),
        ]
        return "\n".join(["<b>" + html.escape(_("Overview")) + "</b>", *map(html.escape, facts)])

    async def stock_text(self) -> str:
        _ = self._
        balances = self.engine.balances if self.engine is not None else {}
        forecasts = await Forecaster(self.config, self.store, self.clock).forecast(balances)
        rows = [
            [
                printable(f.sku),
                str(f.free),
                f"{f.rate_per_hour:.1f}",
                duration(_, f.time_to_empty),
                str(f.pending),
            ]
            for f in forecasts
        ]
        table = format_table(
            [_("SKU"), _("Free keys"), _("Sales rate"), _("Empty in"), _("Waiting orders")],
            rows,
            aligns="<>>>>",
            max_widths=[24, None, None, None, None],
        )
        if not rows:
            return html.escape(_("No SKUs yet."))
        return (
            "<b>"
            + html.escape(_("Stock"))
            + "</b>\n<pre>"
            + html.escape("\n".join(table))
            + "</pre>"
        )

    async def orders_text(self, argument: str) -> tuple[str, list[list[dict[str, str]]]]:
        _ = self._
        state = LineState(argument) if argument in {s.value for s in LineState} else None
        lines = await search_lines(self.store, "", state, "", "", ORDERS_SHOWN)
        if not lines:
            return html.escape(_("No orders match.")), []
        rows = [
            [printable(ln.order_id), printable(ln.sku), str(ln.quantity), state_label(_, ln.state)]
            for ln in lines
        ]
        table = format_table(
            [_("Order"), _("SKU"), _("Qty"), _("State")],
            rows,
            aligns="<<><",
            max_widths=[20, 16, None, None],
        )
        # Why each line stands where it is (parked, waiting, closed), before a retry is pressed:
        # the agent's own reasons in the merchant's language, a platform's words as they came.
        why = [
            truncate(
                f"{printable(ln.order_id)[:30]}: {printable(say_reason(ln.reason, _))}",
                MAX_REASON_WIDTH,
            )
            for ln in lines
            if ln.reason
        ]
        buttons = [
            [
                {
                    "text": f"{_('Retry')} {printable(ln.order_id)[:30]}",
                    "callback_data": f"retry:{ln.id}",
                }
            ]
            for ln in lines
            if ln.state == LineState.NEEDS_ATTENTION
        ]
        text = "<pre>" + html.escape("\n".join(table)) + "</pre>"
        if why:
            text += "\n" + html.escape("\n".join(why))
        return text, buttons

    def _alert_line(self, alert: OpenAlert) -> str:
        _ = self._
        return (
            f"{severity_label(_, alert.severity)} · {alert_kind_label(_, alert.kind)}: "
            f"{printable(alert.summary)}"
        )

    def _alert_text(self, alert: OpenAlert) -> str:
        return "⚠️ " + html.escape(self._alert_line(alert))

    def _alert_buttons(self, alert: OpenAlert) -> list[list[dict[str, str]]]:
        _ = self._
        if alert.kind in ("needs_attention", "stuck_orders", "deadline_near"):
            state = "needs_attention" if alert.kind == "needs_attention" else ""
            return [[{"text": _("Show the orders"), "callback_data": f"orders:{state}"}]]
        if alert.kind == "low_stock":
            return [[{"text": _("Show the stock"), "callback_data": "stock"}]]
        return []

    # --- actions ------------------------------------------------------------------------------
    async def _retry(self, line_id: int) -> str:
        _ = self._
        try:
            updated = await operator_action(self.config, self.store, self.clock, "retry", line_id)
        except AgentError as exc:
            return printable(say(exc, _))
        if self.engine is not None:
            self.engine.dispatch([line_id])
        log.info("telegram_bot_retry", line_id=line_id)
        return _("Order %(order)s is now: %(state)s") % {
            "order": printable(updated.order_id),
            "state": state_label(_, updated.state),
        }

    async def _retry_by_ref(self, ref: str) -> str:
        _ = self._
        if not ref:
            return html.escape(_("Say which order: /retry ORDER"))
        lines: list[OrderLine] = await self.store.find_lines(ref)
        if len(lines) != 1:
            return html.escape(
                _("No single order %(ref)s in the ledger.") % {"ref": printable(ref)[:64]}
            )
        return html.escape(await self._retry(lines[0].id))

    async def _import(self, chat_id: int, sku: str, document: Any) -> None:
        _ = self._
        if sku not in self.config.skus:
            await self.say(chat_id, html.escape(_("Say a SKU from the config: /import SKU")))
            return
        if not isinstance(document, dict) or not isinstance(document.get("file_id"), str):
            await self.say(chat_id, html.escape(_("Send the stock file with this caption.")))
            return
        folder = Path(tempfile.mkdtemp(prefix="kami-bot-import-"))
        try:
            path = folder / "stock.upload"
            await self.download(document["file_id"], path)
            reader = StockFileReader(path, translator=_)
            name = printable(str(document.get("file_name") or "telegram"))[-100:]
            report = await self.store.import_keys(sku, reader, f"telegram:{name}", self.clock())
        except AgentError as exc:
            log.warning("telegram_bot_import_failed", sku=sku, error=str(exc))
            # The reader's own errors already speak its translator's language.
            why = say(exc, _)
            await self.say(chat_id, html.escape(_("The import failed: %(why)s") % {"why": why}))
            return
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        log.info("telegram_bot_import", sku=sku, added=report.added)
        text = _("Added %(a)d, duplicates %(d)d, rejected %(r)d.") % {
            "a": report.added,
            "d": report.duplicates,
            "r": reader.rejected,
        }
        # Why lines were rejected, by reason with their line numbers (never their content).
        reasons = reader.rejections.report()
        shown = [
            truncate(_("rejected %(what)s") % {"what": why}, MAX_REASON_WIDTH)
            for why in reasons[:MAX_REASONS]
        ]
        if len(reasons) > MAX_REASONS:
            shown.append(_("…and %(n)d more reasons") % {"n": len(reasons) - MAX_REASONS})
        await self.say(chat_id, html.escape("\n".join([f"{printable(sku)}: {text}", *shown])))


def _chat_of(message: dict[str, Any]) -> int | None:
    chat = message.get("chat")
    chat_id = chat.get("id") if isinstance(chat, dict) else None
    return chat_id if isinstance(chat_id, int) and not isinstance(chat_id, bool) else None
