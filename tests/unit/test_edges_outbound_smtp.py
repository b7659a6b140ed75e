"""An SMTP password is never sent without TLS (issue 13, item 9, in part).

Refused when the config is read, and again when a message is sent. STARTTLS and implicit TLS
(SMTPS) work with a password, against aiosmtpd on loopback with a certificate made here.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import ConfigError, load_config
from agent.domain import AlertMessage, Permanent, Transient
from agent.notify.email import EmailNotifier

PASSWORD = "smtp-password-never-in-clear"
MESSAGE = AlertMessage("k", "low_stock", "opened", "warning", "GAME-100 low", 1.0)


class Mailbox:
    """aiosmtpd handler and authenticator: what was delivered, and every login tried."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.logins: list[tuple[bytes, bytes, bool]] = []  # login, password, over TLS

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.content)
        return "250 OK"

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.logins.append((data.login, data.password, session.ssl is not None))
        return AuthResult(success=data.password == PASSWORD.encode())


def free_port() -> int:
    with socket.socket() as probe:  # aiosmtpd needs a concrete port to self-check
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the CA the client is told to trust)."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def client_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


def run_server(mailbox: Mailbox, **options: Any) -> Controller:
    controller = Controller(
        mailbox, hostname="127.0.0.1", port=free_port(), authenticator=mailbox, **options
    )
    controller.start()
    return controller


@pytest.fixture
def plain_server() -> Iterator[tuple[Controller, Mailbox]]:
    """Takes AUTH without TLS: only our client can keep the password from going in clear."""
    mailbox = Mailbox()
    controller = run_server(mailbox, auth_require_tls=False)
    yield controller, mailbox
    controller.stop()


def notifier(port: int, **options: Any) -> EmailNotifier:
    return EmailNotifier(
        "mail",
        "127.0.0.1",
        port,
        "kami@example.test",
        ("owner@example.test",),
        username="kami",
        password=PASSWORD,
        timeout=5.0,
        **options,
    )


async def test_a_password_is_not_sent_over_plain_smtp(
    plain_server: tuple[Controller, Mailbox],
) -> None:
    controller, mailbox = plain_server
    for options in ({"starttls": False}, {"tls": "none"}):
        with pytest.raises(Permanent, match="never sent over SMTP without TLS"):
            await notifier(controller.port, **options).send(MESSAGE)
    assert mailbox.logins == [] and mailbox.messages == []


async def test_without_a_password_plain_smtp_still_works(
    plain_server: tuple[Controller, Mailbox],
) -> None:
    controller, mailbox = plain_server
    plain = EmailNotifier(
        "mail", "127.0.0.1", controller.port, "a@b.test", ("c@d.test",), starttls=False
    )
    await plain.send(MESSAGE)
    assert len(mailbox.messages) == 1


async def test_starttls_carries_the_password(certificate: tuple[Path, Path]) -> None:
    mailbox = Mailbox()
    controller = run_server(mailbox, tls_context=server_context(certificate), require_starttls=True)
    try:
        await notifier(
            controller.port, tls="starttls", tls_context=client_context(certificate)
        ).send(MESSAGE)
    finally:
        controller.stop()
    assert mailbox.logins == [(b"kami", PASSWORD.encode(), True)]
    assert len(mailbox.messages) == 1 and b"GAME-100 low" in mailbox.messages[0]


async def test_implicit_tls_carries_the_password(certificate: tuple[Path, Path]) -> None:
    mailbox = Mailbox()
    # aiosmtpd counts only STARTTLS as TLS for AUTH; this server speaks nothing but TLS.
    controller = run_server(
        mailbox, ssl_context=server_context(certificate), auth_require_tls=False
    )
    try:
        await notifier(
            controller.port, tls="implicit", tls_context=client_context(certificate)
        ).send(MESSAGE)
    finally:
        controller.stop()
    assert [login[:2] for login in mailbox.logins] == [(b"kami", PASSWORD.encode())]
    assert len(mailbox.messages) == 1


async def test_starttls_with_an_untrusted_certificate_sends_nothing(
    certificate: tuple[Path, Path],
) -> None:
    mailbox = Mailbox()
    controller = run_server(mailbox, tls_context=server_context(certificate), require_starttls=True)
    try:
        with pytest.raises(Transient, match=r"SMTP 127\.0\.0\.1"):
            await notifier(controller.port, tls="starttls").send(MESSAGE)  # system CAs only
    finally:
        controller.stop()
    assert mailbox.logins == [] and mailbox.messages == []


def write_config(tmp_path: Path, mail: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[store]
path = "kami.db"

[platforms.main]
base_url = "http://127.0.0.1:9"
api_key = "id"
secret = "platform.main.secret"

[notify.mail]
kind = "email"
host = "smtp.example.test"
sender = "kami@example.test"
to = ["owner@example.test"]
username = "kami"
{mail}
""",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(
    "mail",
    [
        'password = "notify.mail.password"\nstarttls = false',
        'password = "notify.mail.password"\ntls = "none"',
    ],
)
def test_config_refuses_a_password_without_tls(tmp_path: Path, mail: str) -> None:
    with pytest.raises(ConfigError, match=r"notify\.mail\.password: is never sent over SMTP"):
        load_config(write_config(tmp_path, mail))


@pytest.mark.parametrize(
    ("mail", "tls", "port"),
    [
        ('password = "notify.mail.password"', "starttls", 587),
        ('password = "notify.mail.password"\ntls = "implicit"', "implicit", 465),
        ('password = "notify.mail.password"\ntls = "implicit"\nport = 2465', "implicit", 2465),
        ("starttls = false", "none", 587),
    ],
)
def test_config_tls_modes(tmp_path: Path, mail: str, tls: str, port: int) -> None:
    [channel] = load_config(write_config(tmp_path, mail)).notify
    assert (channel.options.tls, channel.options.port) == (tls, port)


@pytest.mark.parametrize(
    ("mail", "problem"),
    [
        ('tls = "ssl"', r"notify\.mail\.tls: must be one of starttls, implicit, none"),
        ('tls = "implicit"\nstarttls = true', r"notify\.mail\.starttls: contradicts"),
    ],
)
def test_config_rejects_unclear_tls(tmp_path: Path, mail: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_config(write_config(tmp_path, mail))


async def test_a_chinese_multiline_alert_makes_one_encoded_subject(
    plain_server: tuple[Controller, Mailbox],
) -> None:
    # RFC 5322 header lines cannot hold a bare line break (Python's email refuses it with a
    # ValueError, which no retry logic expects), and non-ASCII goes as RFC 2047 encoded
    # words: the subject is the alert on one line, the full text in the body.
    from email import message_from_bytes
    from email.header import decode_header, make_header
    from email.policy import default

    controller, mailbox = plain_server
    summary = "平台 main 说：\n余额不足\r\n请充值"
    message = AlertMessage("k", "platform_blocked", "opened", "critical", summary, 1.0)
    plain = EmailNotifier(
        "mail", "127.0.0.1", controller.port, "a@b.test", ("c@d.test",), starttls=False
    )
    await plain.send(message)
    (raw,) = mailbox.messages
    subject_line = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")  # headers are 7-bit
    assert "=?utf-8?" in subject_line
    mail = message_from_bytes(raw, policy=default)
    subject = str(make_header(decode_header(mail["Subject"])))
    assert "\n" not in subject and "余额不足 请充值" in subject
    assert "说：\n余额不足\n请充值\n" in mail.get_content().replace("\r\n", "\n")
