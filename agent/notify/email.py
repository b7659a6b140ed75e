"""SMTP email alerts (stdlib smtplib in a worker thread), over STARTTLS, implicit TLS (SMTPS,
port 465) or, without a password only, plain SMTP."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage

from agent.domain import AlertMessage, Permanent, Transient
from agent.redact import register

TLS_MODES = ("starttls", "implicit", "none")


def plain_password_refusal(where: str) -> str:
    return (
        f'{where}: a password is never sent over SMTP without TLS; set tls = "starttls"'
        ' (usually port 587) or tls = "implicit" (usually port 465)'
    )


class EmailNotifier:
    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        sender: str,
        recipients: tuple[str, ...],
        starttls: bool = True,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 15.0,
        *,
        tls: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: one of TLS_MODES (when None, `starttls` chooses between the first and the
        last). `tls_context`: how the server's certificate is checked (the system's trusted
        CAs and the host name when None)."""
        self.name = name
        self.host = host
        self.port = port
        self.sender = sender
        self.recipients = recipients
        self.tls = tls or ("starttls" if starttls else "none")
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, got {self.tls!r}")
        self.username = username
        self.password = password
        register(password)
        self.timeout = timeout
        self.tls_context = tls_context

    def _compose(self, message: AlertMessage) -> EmailMessage:
        mail = EmailMessage()
        mail["From"] = self.sender
        mail["To"] = ", ".join(self.recipients)
        mail["Subject"] = message.text[:150]
        mail["X-Kami-Alert"] = message.key
        mail.set_content(f"{message.text}\n\nalert: {message.key}\nkind: {message.kind}\n")
        return mail

    def _connect(self) -> smtplib.SMTP:
        context = self.tls_context or ssl.create_default_context()
        if self.tls == "implicit":
            return smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
        smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        if self.tls == "starttls":
            try:
                # Refused (or failing) STARTTLS ends the attempt: nothing more is said in clear.
                smtp.starttls(context=context)
            except BaseException:
                smtp.close()
                raise
        return smtp

    def _send_blocking(self, message: AlertMessage) -> None:
        if self.password and self.tls == "none":
            # Config refuses this too; checked here as well, before any connection is made.
            raise Permanent(plain_password_refusal(f"SMTP {self.host}:{self.port}"))
        try:
            with self._connect() as smtp:
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
