"""`kami-agent secrets`, `keys` and `migrate-store`: secrets and the ledger's encryption."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from typing import Any

from agent.cli.common import CommandError, _, config_path, load, with_store
from agent.config import ConfigError, load_config
from agent.i18n import N_
from agent.keybox import new_master_key, parse_master_key
from agent.secrets import (
    delete_secret,
    lookup_secret,
    resolve_secret,
    store_secret,
    where_stored,
)
from agent.store.base import Store


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    config = load(args)

    async def action(store: Store) -> int:
        key_id, moved = await store.rotate_data_key(time.time())
        print(
            _("card keys re-sealed with data key %(key)s: %(n)d row(s); old data keys retired")
            % {"key": key_id, "n": moved}
        )
        return 0

    return with_store(config, action)


def cmd_keys_init(args: argparse.Namespace) -> int:
    """Generates the store master key and stores it (keyring, or the sealed credential store
    on a server without one): nothing to paste, nothing left in a shell history."""
    name = _key_secret_name(args)
    if lookup_secret(name):
        raise CommandError(
            _("secret %(name)s already exists; a new one would lock the ledger") % {"name": name}
        )
    where = store_secret(name, new_master_key(), backend=args.store)
    print(
        _(
            "secret %(name)s: a new random store key is stored %(where)s — back it up: without"
            " it the card keys in the ledger cannot be read"
        )
        % {"name": name, "where": where.say(_)}
    )
    return 0


def cmd_secrets_delete(args: argparse.Namespace) -> int:
    where = delete_secret(args.name)
    print(_("secret %(name)s: deleted from %(where)s") % {"name": args.name, "where": where.say(_)})
    return 0


def cmd_secrets_set(args: argparse.Namespace) -> int:
    if args.stdin:
        value = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise CommandError(_("no terminal to ask on: pipe the value in with --stdin"))
        value = getpass.getpass(f"{args.name}: ")
    if not value:
        raise CommandError(_("empty secret, nothing stored"))
    where = store_secret(args.name, value, backend=args.store)
    print(_("secret %(name)s: stored %(where)s") % {"name": args.name, "where": where.say(_)})
    return 0


def cmd_secrets_list_missing(args: argparse.Namespace) -> int:
    config = load(args)
    missing = [name for name in config.secret_names() if not lookup_secret(name)]
    for name in missing:
        print(name)
    return 1 if missing else 0


def cmd_secrets_where(args: argparse.Namespace) -> int:
    config = load(args)
    missing = _("MISSING")
    for name in config.secret_names():
        where = where_stored(name)
        said = where.say(_) if where is not None else missing
        print(_("%(name)s: %(where)s") % {"name": name, "where": said})
    return 0


def _key_secret_name(args: argparse.Namespace) -> str:
    """The store key's secret name from the config, or the default when there is no config
    (migrate-store and keys init need nothing else from it)."""
    try:
        path = config_path(args.config)
    except ConfigError:
        return "store.key"
    return load_config(path).store.key_secret if path.exists() else "store.key"


def cmd_migrate_store(args: argparse.Namespace) -> int:
    from agent.store.migrate import (
        check_postgres_target,
        migrate_sqlite_to_postgres,
        parse_sqlite_source,
    )
    from agent.store.postgres import safe_url

    source = parse_sqlite_source(args.source)
    target = check_postgres_target(args.target)
    key_name = args.key or _key_secret_name(args)
    master = parse_master_key(resolve_secret(key_name))
    password = resolve_secret(args.password) if args.password else None
    report = asyncio.run(migrate_sqlite_to_postgres(source, target, master, password=password))
    print(
        _(
            "migrate-store: done — %(orders)d order lines, %(keys)d card keys, %(events)d events"
            " copied. %(source)s is untouched (keep it as a backup). Now set [store] url ="
            ' "%(url)s" in the config of every agent and start them.'
        )
        % {
            "orders": report.rows["orders"],
            "keys": report.rows["card_keys"],
            "events": report.rows["events"],
            "source": source,
            "url": safe_url(target),
        }
    )
    return 0


_STORE_HELP = N_(
    "where to keep it: the desktop keyring, or the sealed credential store (systemd-creds, else"
    " an encrypted 0600 file); default: the keyring when one works, else the credential store"
)


def add_parsers(sub: Any) -> None:
    sec = sub.add_parser("secrets", help=_("named secrets (keyring or credential store)"))
    secs = sec.add_subparsers(dest="secrets_cmd", required=True)
    sset = secs.add_parser("set", help=_("store a secret (prompted, or --stdin)"))
    sset.add_argument("name", help=_("the secret's name, as the config names it"))
    sset.add_argument(
        "--stdin", action="store_true", help=_("read the value from standard input's first line")
    )
    sset.add_argument("--store", choices=["keyring", "credstore"], help=_(_STORE_HELP))
    sset.set_defaults(func=cmd_secrets_set)
    sdel = secs.add_parser("delete", help=_("remove a stored secret"))
    sdel.add_argument("name", help=_("the secret's name, as the config names it"))
    sdel.set_defaults(func=cmd_secrets_delete)
    secs.add_parser(
        "list-missing", help=_("secrets the config names but nobody stored")
    ).set_defaults(func=cmd_secrets_list_missing)
    secs.add_parser(
        "where", help=_("where each secret the config names is found (never its value)")
    ).set_defaults(func=cmd_secrets_where)

    mig = sub.add_parser(
        "migrate-store",
        help=_("copy a stopped agent's SQLite ledger into an empty PostgreSQL database"),
    )
    mig.add_argument("--from", dest="source", required=True, help="sqlite:/path/to/kami.db")
    mig.add_argument(
        "--to", dest="target", required=True, help="postgresql://user@host:port/database"
    )
    mig.add_argument("--key", help=_("secret holding the store key (default: the config's)"))
    mig.add_argument("--password", help=_("secret holding the PostgreSQL password, if any"))
    mig.set_defaults(func=cmd_migrate_store)

    keys = sub.add_parser("keys", help=_("the encryption of card keys at rest")).add_subparsers(
        dest="keys_cmd", required=True
    )
    kinit = keys.add_parser(
        "init", help=_("generate and store the store master key (once, before `init`)")
    )
    kinit.add_argument("--store", choices=["keyring", "credstore"], help=_(_STORE_HELP))
    kinit.set_defaults(func=cmd_keys_init)
    keys.add_parser("rotate", help=_("re-seal every card key with a fresh data key")).set_defaults(
        func=cmd_keys_rotate
    )
