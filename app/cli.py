"""`unsloth keys create|list|revoke`: API keys, against the database the settings name (migrated first when the
API would migrate it too). `keys_main(argv)` is what the `unsloth` command calls; it returns an exit status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from app.core.config import SettingsError, load_settings
from app.db import migrate
from app.db.session import make_engine, make_session_factory
from app.services import keys


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Manage the API keys of the service.")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="make a key (printed once: only its hash is stored)")
    create.add_argument("--name", default="default", help="a label to tell keys apart")
    create.add_argument("--admin", action="store_true", help="the key sees every key's objects")
    listing = sub.add_parser("list", help="list keys (prefix, name, created, last used)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = sub.add_parser("revoke", help="revoke a key by id (key_...) or shown prefix (sk-unsloth-xxxxxx)")
    revoke.add_argument("key")
    return parser


def keys_main(argv: Sequence[str] | None = None, prog: str = "unsloth keys") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as e:
        print(f"unsloth: {e}", file=sys.stderr)
        return 2
    if settings.should_migrate:
        migrate.upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            if args.command == "create":
                row, key = keys.create_key(session=session, name=args.name, is_admin=args.admin)
                print(key)
                print(f"created {row.id} ({row.name}{', admin' if row.is_admin else ''}); store the key now: it "
                      "cannot be shown again", file=sys.stderr)
            elif args.command == "list":
                for row in keys.list_keys(session=session, include_revoked=args.all):
                    flags = ",".join(f for f, on in (("admin", row.is_admin), ("revoked", row.revoked_at)) if on)
                    used = row.last_used_at.isoformat(timespec="seconds") if row.last_used_at else "never"
                    print(f"{row.id}\t{row.prefix}...\t{row.name}\t{row.created_at.isoformat(timespec='seconds')}\t"
                          f"last used {used}\t{flags}")
            else:
                revoked = keys.revoke_key(session=session, key_id=args.key)
                if revoked is None:
                    print(f"unsloth: no single active key matches {args.key!r}", file=sys.stderr)
                    return 1
                print(f"revoked {revoked.id} ({revoked.name})", file=sys.stderr)
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(keys_main())
