"""SMTP email alerts (stdlib smtplib in a worker thread), over STARTTLS, implicit TLS (SMTPS,
port 465) or, without a password only, plain SMTP."""

from __future__ import annotations

import asyncio
import dataclasses
import smtplib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import TYPE_CHECKING

from agent.domain import AlertMessage, Permanent, Transient
from agent.redact import register
from agent.settings import setting

if TYPE_CHECKING:
    from agent.config import Section

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
        # A header holds no line break (RFC 5322; Python's email raises ValueError for one):
        # the subject is the alert on one line, the whole text is in the body. Non-ASCII is
        # written as RFC 2047 encoded words by the email package's default policy.
        mail["Subject"] = " ".join(message.text.split())[:150]
        mail["X-Kami-Alert"] = message.key
        text = message.text.replace("\r\n", "\n").replace("\r", "\n")
        mail.set_content(f"{text}\n\nalert: {message.key}\nkind: {message.kind}\n")
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


# --- the channel's settings (agent.notify.KINDS) ----------------------------------------------
SMTP_PORT = 587
SMTPS_PORT = 465


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    host: str = setting(reader="string", help="SMTP server")
    port: int = setting(
        SMTP_PORT,
        minimum=1,
        maximum=65535,
        shown=f'{SMTP_PORT} ({SMTPS_PORT} with tls = "implicit")',
        help="SMTP port",
    )
    starttls: bool = setting(True, help='false: plain SMTP (as tls = "none")')
    tls: str | None = setting(
        None,
        reader="optional string",
        choices=TLS_MODES,
        shown="starttls",
        help="`implicit`: SMTPS (QQ, 163 mail); `none` only without a password",
    )
    sender: str = setting(reader="string", help="From address")
    to: tuple[str, ...] = setting(reader="strings", help='recipients, `["a@x", "b@y"]`')
    username: str | None = setting(None, reader="optional string", help="SMTP login")
    password: str | None = setting(
        None, reader="optional secret", secret=True, help="name of the secret holding it"
    )


def parse_options(section: Section) -> Options:
    """The email keys; `tls` settled from `starttls` when absent."""
    from agent.config import read_settings

    _ = section._
    options = read_settings(section, Options)
    tls = options.tls
    if tls is None:
        tls = "starttls" if options.starttls else "none"
    elif tls not in TLS_MODES:
        raise section.error(
            "tls",
            _("must be one of %(choices)s, got %(value)r")
            % {"choices": ", ".join(TLS_MODES), "value": tls},
        )
    elif section.data.get("starttls") is not None and options.starttls != (tls == "starttls"):
        raise section.error(
            "starttls", _('contradicts tls = "%(tls)s"; set tls alone') % {"tls": tls}
        )
    port = options.port
    if tls == "implicit" and section.data.get("port") is None:
        port = SMTPS_PORT
    if options.password and tls == "none":
        raise section.error(
            "password",
            _(
                'is never sent over SMTP without TLS; set tls = "starttls" (usually port 587)'
                ' or tls = "implicit" (usually port 465)'
            ),
        )
    return dataclasses.replace(options, tls=tls, port=port)


def build(
    name: str, options: Options, secret: Callable[[str], str], timeout: float | None
) -> EmailNotifier:
    """An SMTP channel; 15 s per send unless `timeout`."""
    return EmailNotifier(
        name,
        options.host,
        options.port,
        options.sender,
        tuple(options.to),
        options.starttls,
        options.username,
        secret(options.password) if options.password else None,
        15.0 if timeout is None else timeout,
        tls=options.tls,
    )
