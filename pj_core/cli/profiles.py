"""``pj profiles``: manage saved per-user profiles.

The store is ``--store PATH``, else ``$PJ_PROFILE_STORE``, else
``~/.local/share/persona-judge/profiles.db``.

Examples::

    pj profiles add alice --preference humor --preference concise
    pj profiles add kid -p elementary -p "I love dinosaurs." --lookahead 6
    pj profiles show alice
    pj profiles list
    pj profiles export backup.json
    pj profiles import backup.json --replace
    pj profiles delete alice
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pj_core.errors import InvalidPersonaError
from pj_core.personas import (
    GenerationDefaults,
    Persona,
    PersonaProfile,
    check_user_id,
    compose,
    resolve_personas,
)
from pj_core.personas.store import (
    AbstractProfileStore,
    OnConflict,
    ProfileConflictError,
    ProfileStore,
    SqlProfileStore,
    default_store,
    is_url,
    load_profile,
    open_store,
    redacted,
)


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--store PATH`` (shared with ``pj generate``)."""
    parser.add_argument(
        "--store",
        metavar="PATH|URL",
        default=None,
        help="profile database: a SQLite file, or postgresql://user:password@host:port/db "
        "(default: $PJ_PROFILE_STORE, else ~/.local/share/persona-judge/profiles.db)",
    )


def add_persona_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--profile ID``, ``--preference NAME`` (repeatable) and ``--store PATH``.

    For commands that also take explicit ``--persona TEXT`` prefixes (``pj generate``);
    :func:`personas_from_args` turns the parsed options into personas.
    """
    parser.add_argument(
        "--profile",
        metavar="USER_ID",
        default=None,
        help="use a saved profile (see `pj profiles add`); its generation defaults apply to "
        "options you do not set",
    )
    parser.add_argument(
        "--preference",
        action="append",
        default=[],
        metavar="NAME_OR_TEXT",
        help="a catalog preference (see `pj personas list`) or a quoted sentence; repeatable; "
        "composed over two prefixes (added to --profile's preferences if both are given)",
    )
    add_store_argument(parser)


def personas_from_args(
    persona_texts: Sequence[str] | None,
    preferences: Sequence[str] | None,
    profile_id: str | None,
    store: str | None,
) -> tuple[list[Persona], dict[str, Any]] | None:
    """The personas chosen on a command line, and the profile's generation defaults.

    ``--persona`` texts are explicit prefixes (one each, as given); ``--preference`` and
    ``--profile`` are composed (:func:`pj_core.personas.compose`, two prefixes). The two
    kinds cannot be mixed. Returns ``None`` when no option was given.

    Example:
        >>> personas, defaults = personas_from_args(None, ["humor", "concise"], None, None)
        >>> [p.name for p in personas], defaults
        (['humor', 'concise'], {})
    """
    persona_texts = list(persona_texts or [])
    preferences = list(preferences or [])
    if persona_texts and (preferences or profile_id):
        raise InvalidPersonaError(
            "use either --persona (explicit prefix texts) or --preference / --profile "
            "(composed from preferences), not both"
        )
    if persona_texts:
        return resolve_personas(persona_texts), {}
    if profile_id is not None:
        profile = load_profile(profile_id, store)
        if preferences:
            profile = profile.evolve(preferences=[*profile.preferences, *preferences])
        return compose(profile), profile.generation_kwargs()
    if preferences:
        return compose(preferences), {}
    return None


def load_cli_profile(user_id: str, store_path: str | None) -> PersonaProfile:
    """The profile ``user_id`` from ``--store`` (or the default store); never creates a file."""
    return load_profile(user_id, store_path)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pj profiles`` with ``add``, ``show``, ``list``, ``delete``, ``export``, ``import``."""
    parser = subparsers.add_parser(
        "profiles",
        help="manage saved per-user profiles",
        description="Saved per-user profiles (preferences, description, generation defaults).",
    )
    commands = parser.add_subparsers(dest="profiles_command", metavar="ACTION", required=True)

    add = commands.add_parser("add", help="create (or with --replace, overwrite) a profile")
    add.add_argument("user_id", metavar="USER_ID")
    add.add_argument(
        "-p",
        "--preference",
        action="append",
        default=[],
        metavar="NAME_OR_TEXT",
        help="a catalog name (see `pj personas list`) or a quoted sentence; repeatable",
    )
    add.add_argument("--description", help="free text about the user, given to every prefix")
    add.add_argument("--lookahead", type=int, help="default draft length per round")
    add.add_argument("--temperature", type=float, help="default sampling temperature")
    add.add_argument("--top-k", type=int, help="default top-k (0 = off)")
    add.add_argument("--top-p", type=float, help="default nucleus threshold")
    add.add_argument("--max-new-tokens", type=int, help="default token budget")
    add.add_argument("--replace", action="store_true", help="overwrite an existing profile")
    add_store_argument(add)
    add.set_defaults(func=_add)

    show = commands.add_parser("show", help="show one profile and the prefixes it gives")
    show.add_argument("user_id", metavar="USER_ID")
    show.add_argument("--json", action="store_true", help="print the profile as JSON")
    add_store_argument(show)
    show.set_defaults(func=_show)

    listing = commands.add_parser("list", help="list saved profiles")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_store_argument(listing)
    listing.set_defaults(func=_list)

    delete = commands.add_parser("delete", help="delete a profile")
    delete.add_argument("user_id", metavar="USER_ID")
    add_store_argument(delete)
    delete.set_defaults(func=_delete)

    export = commands.add_parser("export", help="write every profile as JSON")
    export.add_argument("file", nargs="?", default="-", help="output file (default: stdout)")
    add_store_argument(export)
    export.set_defaults(func=_export)

    load = commands.add_parser("import", help="import an export file (all or nothing)")
    load.add_argument("file", help="a file written by `pj profiles export` ('-' = stdin)")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument("--replace", action="store_true", help="overwrite existing user ids")
    mode.add_argument("--skip-existing", action="store_true", help="keep existing user ids")
    add_store_argument(load)
    load.set_defaults(func=_import)


def _open(args: argparse.Namespace, *, read_only: bool = False) -> SqlProfileStore:
    target = args.store or default_store()
    if is_url(target):
        return open_store(target)
    path = Path(target).expanduser()
    if read_only and not path.exists():
        return ProfileStore(":memory:")  # reading must not create a database file
    return open_store(path)


def _where(args: argparse.Namespace) -> str:
    return redacted(str(args.store or default_store()))


def _add(args: argparse.Namespace) -> int:
    defaults = GenerationDefaults(
        lookahead=args.lookahead,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
    )
    profile = PersonaProfile(
        user_id=args.user_id,
        preferences=args.preference,
        description=args.description,
        defaults=defaults,
    )
    compose(profile)  # refuse now, not at generation time, a profile that cannot compose
    with _open(args) as store:
        # expected_revision=0 makes "add" refuse to overwrite, atomically.
        expected = None if args.replace else 0
        try:
            stored = store.put(profile, expected_revision=expected)
        except ProfileConflictError:
            print(
                f"pj: error: profile {args.user_id!r} already exists in {_where(args)}; "
                "add --replace to overwrite it",
                file=sys.stderr,
            )
            return 1
    print(f"saved profile {stored.user_id!r} (revision {stored.revision}) in {_where(args)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    profile = load_cli_profile(args.user_id, args.store)
    if args.json:
        print(profile.model_dump_json(indent=2))
        return 0
    print(f"user id:     {profile.user_id} (revision {profile.revision})")
    print(f"preferences: {', '.join(profile.preferences) or '-'}")
    print(f"description: {profile.description or '-'}")
    defaults = profile.generation_kwargs()
    print("defaults:    " + (", ".join(f"{k}={v}" for k, v in defaults.items()) or "-"))
    print(f"updated:     {profile.updated_at.isoformat(timespec='seconds')}")
    for index, persona in enumerate(compose(profile)):
        print(f"prefix {index}:   " + persona.text.replace("\n", " / "))
    return 0


def _report_corrupt(store: AbstractProfileStore, args: argparse.Namespace) -> None:
    """One stderr line per stored profile that cannot be read, saying what to do."""
    for user_id, _reason in store.corrupt_rows():
        print(
            f"pj: warning: profile {user_id!r} in {_where(args)} is corrupt and was left out; "
            f"delete it (pj profiles delete {user_id}) or restore it from an export",
            file=sys.stderr,
        )


def _list(args: argparse.Namespace) -> int:
    with _open(args, read_only=True) as store:
        profiles = store.list()
        _report_corrupt(store, args)
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in profiles], indent=2))
        return 0
    if not profiles:
        print(f"no profiles in {_where(args)}; add one with `pj profiles add ID -p humor`")
        return 0
    width = max(len("USER_ID"), *(len(p.user_id) for p in profiles))
    print(f"{'USER_ID'.ljust(width)}  REV  PREFERENCES")
    for p in profiles:
        prefs = ", ".join(p.preferences) or "-"
        print(f"{p.user_id.ljust(width)}  {p.revision:>3}  {prefs}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    # A typed "not found" before touching anything (reading creates no file); a corrupt
    # profile can be deleted, so its id is enough.
    check_user_id(args.user_id)
    with _open(args, read_only=True) as store:
        if args.user_id not in store.list_ids():
            load_cli_profile(args.user_id, args.store)  # raises ProfileNotFoundError
    with _open(args) as store:
        store.delete(args.user_id)
    print(f"deleted profile {args.user_id!r} from {_where(args)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    with _open(args, read_only=True) as store:
        if args.file == "-":
            print(store.export_json())
            _report_corrupt(store, args)
            return 0
        count = store.export_file(args.file)
        _report_corrupt(store, args)
    print(f"exported {count} profile(s) to {args.file}", file=sys.stderr)
    return 0


def _import(args: argparse.Namespace) -> int:
    mode: OnConflict = "replace" if args.replace else "skip" if args.skip_existing else "error"
    with _open(args) as store:
        if args.file == "-":
            written = store.import_json(sys.stdin.read(), on_conflict=mode)
        else:
            written = store.import_file(args.file, on_conflict=mode)
    print(f"imported {len(written)} profile(s) into {_where(args)}: {', '.join(written) or '-'}")
    return 0
