"""SMTP email alerts (stdlib smtplib in a worker thread), with STARTTLS when asked."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage

from agent.domain import AlertMessage, Permanent, Transient
from agent.redact import register


class EmailNotifier:
    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        sender: str,
        recipients: tuple[str, ...],
        starttls: bool,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.sender = sender
        self.recipients = recipients
        self.starttls = starttls
        self.username = username
        self.password = password
        register(password)
        self.timeout = timeout

    def _compose(self, message: AlertMessage) -> EmailMessage:
        mail = EmailMessage()
        mail["From"] = self.sender
        mail["To"] = ", ".join(self.recipients)
        mail["Subject"] = message.text[:150]
        mail["X-Kami-Alert"] = message.key
        mail.set_content(f"{message.text}\n\nalert: {message.key}\nkind: {message.kind}\n")
        return mail

    def _send_blocking(self, message: AlertMessage) -> None:
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self.username and self.password:
                    smtp.login(self.username, self.password)
                smtp.send_message(self._compose(message))
        except smtplib.SMTPAuthenticationError:
            raise Permanent(f"SMTP {self.host}: authentication failed") from None
        except smtplib.SMTPRecipientsRefused:
            raise Permanent(f"SMTP {self.host}: recipients refused") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise Transient(f"SMTP {self.host}:{self.port}: {type(exc).__name__}") from None

    async def send(self, message: AlertMessage) -> None:
        await asyncio.to_thread(self._send_blocking, message)

    async def close(self) -> None:
        return None
