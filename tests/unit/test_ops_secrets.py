"""Headless secrets: on a server without a desktop keyring, `keys init` and `secrets set`
store secrets sealed in the credential store (systemd-creds where it can be used, else an
encrypted 0600 file whose key comes from a credential), the CLI and the daemon read them;
`install-service --dry-run` shows the unit and commands that make a hardened service."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.credstore import MAGIC, CredStore, CredStoreError, systemd_creds_usable

NO_KEYRING = {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}


def agent(
    config: Path, *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KAMI_", "CREDENTIALS_"))}
    return subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env={**base, **NO_KEYRING, **env},
        input=stdin,
        timeout=120,
        check=False,
    )


def write_config(tmp_path: Path, store_path: str = "kami.db") -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[store]\npath = "{store_path}"\n\n[platforms.main]\nbase_url = "http://127.0.0.1:9"\n'
        'api_key = "k"\nsecret = "platform.main.secret"\n\n[skus."GAME-100"]\n',
        encoding="utf-8",
    )
    return config


def private(path: Path, mode: int) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == mode, f"{path}: {oct(path.stat().st_mode)}"


@pytest.mark.parametrize("seal", ["file", "systemd-creds"])
def test_a_server_without_keyring_goes_from_keys_init_to_a_ledger(
    tmp_path: Path, seal: str
) -> None:
    if seal == "systemd-creds" and not systemd_creds_usable():
        pytest.skip("systemd-creds cannot be used here (not installed, or not root)")
    config = write_config(tmp_path)
    store = tmp_path / "credstore"
    env = {"KAMI_CREDSTORE": str(store), "KAMI_CREDSTORE_SEAL": seal}
    created = agent(config, "keys", "init", env=env)
    assert created.returncode == 0, created.stderr
    assert f"sealed in {store / 'store.key'}" in created.stdout
    again = agent(config, "keys", "init", env=env)
    assert again.returncode == 1 and "already exists" in again.stderr
    stored = agent(
        config, "secrets", "set", "platform.main.secret", "--stdin", env=env, stdin="p-1\n"
    )
    assert stored.returncode == 0, stored.stderr
    private(store, 0o700)
    for name in ("store.key", "platform.main.secret"):
        private(store / name, 0o600)
        blob = (store / name).read_bytes()
        assert b"p-1" not in blob and blob.startswith(MAGIC) == (seal == "file")
    if seal == "file":
        private(store / ".key", 0o600)
    assert agent(config, "init", env=env).returncode == 0
    listing = agent(config, "stock", "list", env=env)
    assert listing.returncode == 0, listing.stderr
    where = agent(config, "secrets", "where", env=env)
    assert "platform.main.secret: sealed in" in where.stdout and "p-1" not in where.stdout
    check = agent(config, "secrets", "list-missing", env=env)
    assert check.returncode == 0 and check.stdout == ""
    deleted = agent(config, "secrets", "delete", "platform.main.secret", env=env)
    assert deleted.returncode == 0 and not (store / "platform.main.secret").exists()


def test_the_file_seal_takes_its_key_from_a_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "kami-agent.credstore-key").write_text(
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n", encoding="utf-8"
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    store = CredStore(tmp_path / "store", seal="file")
    store.set("shop.token", "t-123")
    assert not (tmp_path / "store" / ".key").exists()  # the credential's key, none made
    assert store.get("shop.token") == "t-123"
    # a sealed value moved to another name does not open there
    shutil.copy(tmp_path / "store" / "shop.token", tmp_path / "store" / "other.token")
    with pytest.raises(CredStoreError, match="does not open"):
        store.get("other.token")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(CredStoreError, match="key is missing"):
        CredStore(tmp_path / "store", seal="file").get("shop.token")


def test_install_service_dry_run_shows_a_hardened_unit_and_its_commands(tmp_path: Path) -> None:
    config = write_config(tmp_path, "/var/lib/kami-agent/kami.db")
    store = tmp_path / "credstore"
    units = tmp_path / "units"
    env = {"KAMI_CREDSTORE": str(store), "KAMI_CREDSTORE_SEAL": "file"}
    missing = agent(config, "install-service", "--dry-run", "--credstore", str(store), env=env)
    assert missing.returncode == 1 and "platform.main.secret" in missing.stderr
    env["KAMI_SECRET_PLATFORM_MAIN_SECRET"] = "p-1"
    plan = agent(
        config,
        "install-service",
        "--dry-run",
        "--credstore",
        str(store),
        "--unit-dir",
        str(units),
        "--bin",
        "/opt/kami-agent/bin/kami-agent",
        env=env,
    )
    out = plan.stdout
    assert "p-1" not in out + plan.stderr
    assert not units.exists() and not store.exists()  # a dry run changes nothing
    assert "seal store.key: a new random store key" in out
    assert "seal platform.main.secret: copied from where it is stored now" in out
    assert (
        f"systemd-creds encrypt --name=platform.main.secret - {store}/platform.main.secret" in out
    )
    unit = [line[4:] for line in out.splitlines() if line.startswith("    ")]
    template = (Path(__file__).resolve().parents[2] / "systemd" / "kami-agent.service").read_text()
    kept = [
        line
        for line in template.splitlines()
        if not line.startswith(("ExecStart=", "LoadCredentialEncrypted="))
    ]
    assert [
        line
        for line in unit
        if not line.startswith(("ExecStart=", "LoadCredentialEncrypted=", "systemd-creds"))
    ] == kept
    assert f"ExecStart=/opt/kami-agent/bin/kami-agent --config {config} run" in unit
    assert f"LoadCredentialEncrypted=store.key:{store}/store.key" in unit
    assert f"LoadCredentialEncrypted=platform.main.secret:{store}/platform.main.secret" in unit
    assert "- run: systemctl daemon-reload" in out
    init = next(line for line in out.splitlines() if "systemd-run" in line)
    assert "DynamicUser=yes" in init and "StateDirectory=kami-agent" in init
    assert f"LoadCredentialEncrypted=store.key:{store}/store.key" in init and init.endswith(" init")
    assert "- run: systemctl enable --now kami-agent" in out
    # the config sits in /tmp here, which the service could not see: shown, and refused
    assert f"would refuse: the config is in {config}" in out and plan.returncode == 1
    (tmp_path / "x").mkdir()
    elsewhere = write_config(tmp_path / "x")  # its ledger beside it, not in the state directory
    wrong = agent(elsewhere, "install-service", "--dry-run", "--credstore", str(store), env=env)
    assert wrong.returncode == 1 and "/var/lib/kami-agent/kami.db" in wrong.stderr
