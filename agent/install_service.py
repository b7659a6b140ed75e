"""`kami-agent install-service`: from `pip install` to a running, hardened systemd service.

What it does, as root (`--dry-run` prints the same plan and changes nothing; DESCRIPTION
below says it again for --help, in the merchant's language):
1. checks the config (its ledger in the unit's state directory, nothing under /home, /root or
   /tmp, which the unit hides from the service);
2. seals every secret the config names into the credential store with systemd-creds
   (agent/credstore.py): one already stored elsewhere (keyring, environment, an encrypted file)
   is copied in; the store key is generated when there is no ledger yet; any other missing one
   stops it with the command that stores it;
3. writes the unit from systemd/kami-agent.service — its hardening as it is, ExecStart naming
   this installation and the config, one LoadCredentialEncrypted= line per secret;
4. `systemctl daemon-reload`, creates the ledger once (`kami-agent init` as the service's
   dynamic user, in its state directory, with its credentials), `systemctl enable --now`.
The unit's DynamicUser= makes the user and StateDirectory= the state directory (0700).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.cli.common import CommandError, _, config_path
from agent.cli.language import RawDescriptionHelpFormatter
from agent.config import Config, load_config
from agent.credstore import MAGIC, SYSTEMD_CREDS, CredStore, CredStoreError
from agent.i18n import N_
from agent.keybox import new_master_key
from agent.phrased import say
from agent.secrets import lookup_secret

UNIT_NAME = "kami-agent.service"
STATE_DIRECTORY = Path("/var/lib/kami-agent")
DEFAULT_CONFIG = Path("/etc/kami-agent/config.toml")
DEFAULT_CREDSTORE = Path("/etc/kami-agent/credstore")
DESCRIPTION = N_(
    """What it does, as root (--dry-run prints the same plan and changes nothing):
1. checks the config (its ledger in the unit's state directory, nothing under /home, /root or
   /tmp, which the unit hides from the service);
2. seals every secret the config names into the credential store with systemd-creds: one
   already stored elsewhere (keyring, environment, an encrypted file) is copied in; the store
   key is generated when there is no ledger yet; any other missing one stops it with the
   command that stores it;
3. writes the unit from systemd/kami-agent.service: its hardening as it is, ExecStart naming
   this installation and the config, one LoadCredentialEncrypted= line per secret;
4. systemctl daemon-reload, creates the ledger once (kami-agent init as the service's
   dynamic user, in its state directory, with its credentials), systemctl enable --now."""
)
# What the unit's sandbox hides from the service (ProtectHome=, PrivateTmp=).
_HIDDEN = (Path("/home"), Path("/root"), Path("/run/user"), Path("/tmp"), Path("/var/tmp"))


def unit_template() -> str:
    here = Path(__file__).resolve().parent
    for candidate in (here / "systemd" / UNIT_NAME, here.parent / "systemd" / UNIT_NAME):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise CommandError(
        _("the unit template %(unit)s is missing from this installation") % {"unit": UNIT_NAME}
    )


def render_unit(
    template: str, executable: str, config: Path, secrets: list[tuple[str, Path]]
) -> str:
    """The template with ExecStart and the credentials for this installation; every other
    line (the hardening) exactly as shipped."""
    out: list[str] = []
    placed = False
    for line in template.splitlines():
        if line.startswith("ExecStart="):
            out.append(f"ExecStart={_quote(executable)} --config {_quote(str(config))} run")
        elif line.startswith("LoadCredentialEncrypted="):
            if not placed:
                out += [f"LoadCredentialEncrypted={name}:{path}" for name, path in secrets]
                placed = True
        else:
            out.append(line)
    if not placed:
        raise CommandError(_("the unit template has no LoadCredentialEncrypted= line to replace"))
    return "\n".join(out) + "\n"


def _quote(text: str) -> str:
    return text if all(c.isalnum() or c in "/._-+:=" for c in text) else shlex.quote(text)


def _sealed_as_file(path: Path) -> bool:
    """Sealed the file way (no systemd-creds then): LoadCredentialEncrypted= cannot load it,
    so it is sealed again with systemd-creds."""
    try:
        with path.open("rb") as handle:
            return handle.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _hidden(path: Path) -> bool:
    resolved = path.resolve()
    return any(resolved == h or h in resolved.parents for h in _HIDDEN)


@dataclass
class Plan:
    """Everything install-service does, in order, so a dry run can print it."""

    seal: list[tuple[str, str]] = field(default_factory=list)  # (name, where the value is)
    unit_path: Path = Path()
    unit: str = ""
    commands: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # What stops a real install (a dry run shows them and goes on).
    blockers: list[str] = field(default_factory=list)


def make_plan(args: argparse.Namespace, config: Config, config_file: Path) -> Plan:
    plan = Plan()
    executable = args.bin or shutil.which("kami-agent") or sys.argv[0]
    places = [(_("the kami-agent program"), Path(executable)), (_("the config"), config_file)]
    if not args.bin:
        places.append((_("its Python"), Path(sys.prefix)))
    for what, path in places:
        if _hidden(path):
            plan.blockers.append(
                _(
                    "%(what)s is in %(path)s, which the service cannot see (ProtectHome=,"
                    " PrivateTmp=): install it under /opt or /usr/local (e.g. python3 -m venv"
                    " /opt/kami-agent && /opt/kami-agent/bin/pip install kami-agent) and keep"
                    " the config in /etc/kami-agent"
                )
                % {"what": what, "path": path}
            )
    if config.store.path is not None and config.store.path.parent != STATE_DIRECTORY:
        raise CommandError(
            _(
                "store.path is %(path)s: the service keeps its ledger in its state directory;"
                ' set [store] path = "%(state)s/kami.db" in %(file)s'
            )
            % {"path": config.store.path, "state": STATE_DIRECTORY, "file": config_file}
        )
    credstore = CredStore(Path(args.credstore), seal="systemd-creds")
    ledger_exists = config.store.path is not None and config.store.path.exists()
    secrets: list[tuple[str, Path]] = []
    missing: list[str] = []
    for name in dict.fromkeys(config.secret_names()):
        path = credstore.path(name)
        secrets.append((name, path))
        if path.exists() and not _sealed_as_file(path):
            continue
        if lookup_secret(name):
            plan.seal.append((name, _("copied from where it is stored now")))
        elif name == config.store.key_secret and not ledger_exists:
            plan.seal.append((name, _("a new random store key")))
        else:
            missing.append(name)
    if missing:
        raise CommandError(
            _(
                "secret(s) missing: %(names)s; store each with `kami-agent secrets set NAME`"
                " (as root), then run install-service again"
            )
            % {"names": ", ".join(missing)}
        )
    plan.unit_path = Path(args.unit_dir) / UNIT_NAME
    plan.unit = render_unit(unit_template(), executable, config_file, secrets)
    plan.commands.append(["systemctl", "daemon-reload"])
    if config.store.path is not None and not ledger_exists:
        plan.commands.append(_init_command(executable, config_file, secrets))
    elif config.store.path is None:
        plan.notes.append(
            _("PostgreSQL ledger: create it once with `kami-agent init` if the database is new")
        )
    plan.commands.append(["systemctl", "enable", "--now" if args.start else "", "kami-agent"])
    plan.commands[-1] = [c for c in plan.commands[-1] if c]
    return plan


def _init_command(executable: str, config_file: Path, secrets: list[tuple[str, Path]]) -> list[str]:
    """`kami-agent init` as the service's own dynamic user, in its state directory, with its
    credentials: the ledger is the service's from the start."""
    command = [
        "systemd-run",
        "--unit=kami-agent-init",
        "--wait",
        "--pipe",
        "--collect",
        "-p",
        "DynamicUser=yes",
        "-p",
        "User=kami-agent",
        "-p",
        "StateDirectory=kami-agent",
        "-p",
        "StateDirectoryMode=0700",
        "-p",
        "UMask=0077",
    ]
    for name, path in secrets:
        command += ["-p", f"LoadCredentialEncrypted={name}:{path}"]
    command += [
        "-E",
        "PYTHON_KEYRING_BACKEND=agent.secrets.SystemdCredentialsKeyring",
        executable,
        "--config",
        str(config_file),
        "init",
    ]
    return command


def print_plan(plan: Plan, credstore: Path) -> None:
    print(_("install-service plan (dry run: nothing changed)"))
    print(
        "- "
        + _("credential store %(dir)s (directory 0700, files 0600, sealed with systemd-creds)")
        % {"dir": credstore}
    )
    for name, source in plan.seal:
        print("  " + _("seal %(name)s: %(source)s") % {"name": name, "source": source})
        print(f"    {SYSTEMD_CREDS} encrypt --name={name} - {credstore / name}")
    print("- " + _("write %(file)s (0644):") % {"file": plan.unit_path})
    for line in plan.unit.splitlines():
        print(f"    {line}")
    for command in plan.commands:
        print("- " + _("run: %(command)s") % {"command": shlex.join(command)})
    for note in plan.notes:
        print("- " + _("note: %(note)s") % {"note": note})
    for blocker in plan.blockers:
        print("- " + _("would refuse: %(why)s") % {"why": blocker})


def cmd_install_service(args: argparse.Namespace) -> int:
    config_file = config_path(args.config) if args.config else DEFAULT_CONFIG
    if not config_file.is_file():
        raise CommandError(
            _(
                "no config at %(file)s: install it first (install -Dm644 config.example.toml"
                " %(file)s) and edit it"
            )
            % {"file": config_file}
        )
    config_file = config_file.resolve()
    config = load_config(config_file)
    plan = make_plan(args, config, config_file)
    credstore = Path(args.credstore)
    if args.dry_run:
        print_plan(plan, credstore)
        return 1 if plan.blockers else 0
    if plan.blockers:
        raise CommandError(plan.blockers[0])
    if os.geteuid() != 0:
        raise CommandError(_("install-service must run as root (or try --dry-run)"))
    if shutil.which(SYSTEMD_CREDS) is None or shutil.which("systemctl") is None:
        raise CommandError(
            _("install-service needs systemd 250 or later (systemctl and systemd-creds)")
        )
    store = CredStore(credstore, seal="systemd-creds")
    for name, _source in plan.seal:
        value = lookup_secret(name) or new_master_key()
        try:
            where = store.set(name, value)
        except CredStoreError as exc:
            raise CommandError(
                _("sealing %(name)s: %(why)s") % {"name": name, "why": say(exc, _)}
            ) from None
        print(_("secret %(name)s: %(where)s") % {"name": name, "where": where.say(_)})
    plan.unit_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.unit_path.with_name(f".{UNIT_NAME}.tmp")
    tmp.write_text(plan.unit, encoding="utf-8")
    tmp.chmod(0o644)
    os.replace(tmp, plan.unit_path)
    print(_("unit %(file)s: written") % {"file": plan.unit_path})
    for command in plan.commands:
        print(_("running: %(command)s") % {"command": shlex.join(command)})
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            raise CommandError(
                _("%(program)s failed (exit %(code)d); see above")
                % {"program": command[0], "code": result.returncode}
            )
    for note in plan.notes:
        print(_("note: %(note)s") % {"note": note})
    print(_("kami-agent is running: `systemctl status kami-agent`, `journalctl -u kami-agent -f`"))
    return 0


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "install-service",
        help=_("install and start the hardened systemd service (root)"),
        description=_(DESCRIPTION),
        formatter_class=RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dry-run", action="store_true", help=_("print the plan, change nothing"))
    parser.add_argument(
        "--credstore", default=str(DEFAULT_CREDSTORE), help=_("where the sealed secrets go")
    )
    parser.add_argument("--unit-dir", default="/etc/systemd/system", help=argparse.SUPPRESS)
    parser.add_argument("--bin", help=_("the kami-agent program the unit runs (default: this one)"))
    parser.add_argument(
        "--no-start", dest="start", action="store_false", help=_("enable, do not start now")
    )
    parser.set_defaults(func=cmd_install_service)
