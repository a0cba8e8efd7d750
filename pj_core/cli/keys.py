"""``pj keys``: the API keys of ``pj serve`` (a key file that holds only their hashes).

Examples::

    pj keys add alice --file keys.json      # prints alice's new key, once
    pj keys add --admin --file keys.json    # a key that manages every profile
    pj keys list --file keys.json
    pj keys revoke key_1a2b3c4d --file keys.json
    pj serve --host 0.0.0.0 --api-keys keys.json

``--file`` defaults to ``$PJ_API_KEYS_FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pj_core.errors import ApiKeyFileError
from pj_core.server.auth import KEYS_FILE_ENV_VAR, add_key, read_key_file, revoke_key


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pj keys`` and its sub-commands."""
    parser = subparsers.add_parser(
        "keys",
        help="create, list and revoke the API keys of pj serve",
        description="API keys for pj serve. A key acts as one user (its profile only) or, with "
        "--admin, manages every profile. The key file stores SHA-256 hashes only.",
    )
    commands = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    def add_file(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--file",
            default=None,
            metavar="PATH",
            help=f"the key file (default: ${KEYS_FILE_ENV_VAR})",
        )

    add = commands.add_parser("add", help="make a key for a user (printed once)")
    add.add_argument("user_id", nargs="?", metavar="USER_ID", help="the user the key acts as")
    add.add_argument("--admin", action="store_true", help="a key that may do everything")
    add_file(add)
    add.set_defaults(func=add_command)

    listing = commands.add_parser("list", help="list the keys (ids and owners, no secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    add_file(listing)
    listing.set_defaults(func=list_command)

    revoke = commands.add_parser("revoke", help="remove a key by its id")
    revoke.add_argument("key_id", metavar="KEY_ID")
    add_file(revoke)
    revoke.set_defaults(func=revoke_command)


def key_file(args: argparse.Namespace) -> str:
    """The key file named by ``--file`` or ``$PJ_API_KEYS_FILE``.

    Raises:
        ApiKeyFileError: neither is given.
    """
    path = args.file or os.environ.get(KEYS_FILE_ENV_VAR)
    if not path:
        raise ApiKeyFileError(f"name the key file with --file PATH or ${KEYS_FILE_ENV_VAR}")
    return str(path)


def add_command(args: argparse.Namespace) -> int:
    """Make a key; print it on stdout (the only time it is shown) and its id on stderr."""
    if args.admin == (args.user_id is not None):
        raise ApiKeyFileError("give a USER_ID, or --admin for an admin key (not both)")
    path = key_file(args)
    key, entry = add_key(path, args.user_id)
    owner = "admin" if entry.admin else f"user {entry.user_id}"
    print(key)
    print(
        f"pj keys: {entry.key_id} ({owner}) added to {path}; the key is shown only now, "
        "store it safely",
        file=sys.stderr,
    )
    return 0


def list_command(args: argparse.Namespace) -> int:
    """Print the keys' ids, owners and creation times."""
    entries = read_key_file(key_file(args), must_exist=True)
    if args.json:
        rows = [{k: v for k, v in e.as_json().items() if k != "sha256"} for e in entries]
        print(json.dumps(rows, indent=2))
        return 0
    for entry in entries:
        owner = "admin" if entry.admin else entry.user_id
        print(f"{entry.key_id}\t{owner}\t{entry.created_at}")
    return 0


def revoke_command(args: argparse.Namespace) -> int:
    """Remove one key; a running server keeps it until it restarts."""
    entry = revoke_key(key_file(args), args.key_id)
    print(f"pj keys: revoked {entry.key_id}; restart pj serve to refuse it", file=sys.stderr)
    return 0
