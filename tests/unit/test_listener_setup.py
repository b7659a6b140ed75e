"""Setting the listener up: the [listener] table (off by default, refused values named), the
socket systemd hands over (LISTEN_FDS, as systemd/kami-agent.socket does) taken instead of
binding, and the socket unit shipped beside the service."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.listener_settings import ListenerSettings

ROOT = Path(__file__).resolve().parents[2]
BASE = """
[store]
path = "kami.db"

[platforms.main]
base_url = "http://127.0.0.1:9"
api_key = "k"
secret = "platform.main.secret"
"""


def config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(BASE + extra, encoding="utf-8")
    return path


def test_the_listener_is_off_unless_its_table_is_there(tmp_path: Path) -> None:
    assert load_config(config(tmp_path, "")).listener is None
    assert load_config(config(tmp_path, "[listener]\nenabled = false\n")).listener is None
    on = load_config(config(tmp_path, '[listener]\nport = 9000\npath_prefix = "/kami/"\n'))
    assert on.listener == ListenerSettings(port=9000, path_prefix="/kami")
    assert on.listener.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ('host = "localhost"', "listener.host"),
        ("port = 70000", "listener.port"),
        ("max_body_bytes = 10", "listener.max_body_bytes"),
        ("header_timeout = 0", "listener.header_timeout"),
        ('path_prefix = "kami"', "listener.path_prefix"),
        ("prot = 1", "listener.prot"),
    ],
)
def test_a_bad_listener_value_is_one_clear_error(tmp_path: Path, table: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(config(tmp_path, f"[listener]\n{table}\n"))


def test_the_socket_systemd_passes_is_taken_over(tmp_path: Path) -> None:
    # A child process given a listening socket as fd 3 with LISTEN_PID/LISTEN_FDS, the way
    # systemd starts the service with kami-agent.socket: it must answer on that socket.
    script = textwrap.dedent(
        """
        import asyncio, os, socket, sys
        import aiohttp
        from agent.listener import Listener
        from agent.listener_settings import ListenerSettings

        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        os.dup2(held.fileno(), 3)
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="listener")

        async def main():
            # host/port name a port that is not free: the socket from "systemd" is used instead
            server = Listener(ListenerSettings(port=1), [])
            await server.start()
            async with aiohttp.ClientSession() as http:
                resp = await http.get(f"http://127.0.0.1:{port}/anything")
                print("RESULT", resp.status, server.address[1] == port)
            await server.stop()

        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    [result] = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert result.split() == ["RESULT", "404", "True"]


def test_the_socket_unit_serves_the_listener_on_loopback_only() -> None:
    unit = (ROOT / "systemd" / "kami-agent.socket").read_text(encoding="utf-8")
    assert "ListenStream=127.0.0.1:" in unit
    assert "FileDescriptorName=listener" in unit
    assert "[Install]" in unit and "WantedBy=sockets.target" in unit
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert (
        'systemd-analyze verify "$unit_dir/kami-agent.service" "$unit_dir/kami-agent.socket"' in ci
    )


def uncommented(*blocks: str) -> str:
    """config.example.toml with the commented tables starting at `blocks` uncommented."""
    lines = (ROOT / "config.example.toml").read_text(encoding="utf-8").splitlines()
    for block in blocks:
        start = lines.index(f"# {block}")
        end = next(i for i in range(start, len(lines)) if not lines[i].startswith("#"))
        lines[start:end] = [line.removeprefix("# ") for line in lines[start:end]]
    return "\n".join(lines) + "\n"


def test_the_examples_listener_eneba_and_dujiao_blocks_are_valid_once_uncommented(
    tmp_path: Path,
) -> None:
    from agent.platforms.dujiao import DujiaoOptions
    from agent.platforms.eneba import EnebaOptions

    path = tmp_path / "config.toml"
    path.write_text(
        uncommented("[listener]", "[platforms.eneba]", "[platforms.dujiao]"), encoding="utf-8"
    )
    config = load_config(path)
    assert config.listener == ListenerSettings()
    kinds = {p.kind: p for p in config.platforms}
    eneba, dujiao = kinds["eneba"].options, kinds["dujiao-next"].options
    assert isinstance(eneba, EnebaOptions) and eneba.skus == {
        "GAME-100": "3e5b2f9a-1111-11ee-be56-0242ac120002"
    }
    assert isinstance(dujiao, DujiaoOptions) and dujiao.products[1].sku == "GAME-100"
    assert "platform.eneba.callback" in config.secret_names()


@pytest.mark.parametrize(
    ("kind", "table", "named"),
    [
        ("eneba", "", "auctions"),
        ("eneba", '[platforms.x.auctions]\n"a" = "S"\n"b" = "S"\n', "auctions.b"),
        ("eneba", '[platforms.x.auctions]\n"a" = "S"\n', "callback_token"),
        ("dujiao-next", "", "products"),
        ("dujiao-next", '[platforms.x.products]\n"x1" = { sku = "S" }\n', "products.x1"),
        ("dujiao-next", '[platforms.x.products]\n"1" = { sku = "S", price = "-1" }\n', "price"),
    ],
)
def test_a_responders_bad_options_are_one_clear_error(
    tmp_path: Path, kind: str, table: str, named: str
) -> None:
    text = BASE + (
        f'\n[platforms.x]\nkind = "{kind}"\nbase_url = "https://127.0.0.1"\napi_key = "k"\n'
        f'secret = "x.secret"\n{table}'
    )
    with pytest.raises(ConfigError, match=named):
        load_config(config(tmp_path, text.removeprefix(BASE)))
