"""``pj personas``: browse the preference catalog and preview composed persona prefixes.

Examples::

    pj personas list
    pj personas show humor
    pj personas compose humor concise helpful --k 2
"""

from __future__ import annotations

import argparse
import json

from pj_core.personas import CATALOG, COMPOSITION_MODES, compose, get_preference


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pj personas`` and its ``list``, ``show`` and ``compose`` commands."""
    parser = subparsers.add_parser(
        "personas",
        help="list the preference catalog and preview persona prefixes",
        description="The built-in preference catalog and how preferences become prefixes.",
    )
    commands = parser.add_subparsers(dest="personas_command", metavar="ACTION", required=True)

    listing = commands.add_parser("list", help="show every catalog preference")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_list)

    show = commands.add_parser("show", help="show one preference with its two phrasings")
    show.add_argument("name", help="a catalog name or alias, e.g. humor")
    show.set_defaults(func=_show)

    preview = commands.add_parser("compose", help="show the persona prefixes some preferences give")
    preview.add_argument(
        "preferences",
        nargs="+",
        metavar="PREFERENCE",
        help="catalog names or quoted free-text sentences",
    )
    preview.add_argument("--k", type=int, default=2, help="number of prefixes (default 2)")
    preview.add_argument(
        "--one-per-preference", action="store_true", help="give each preference its own prefix"
    )
    preview.add_argument(
        "--mode",
        choices=COMPOSITION_MODES,
        default=None,
        help="placement: round-robin (default), one-per-preference, or full (every prefix "
        "carries every preference, in its own order and phrasing)",
    )
    preview.add_argument(
        "--allow-opposites",
        action="store_true",
        help="allow both poles of one axis (e.g. concise and informative)",
    )
    preview.set_defaults(func=_compose)


def _list(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([p.model_dump() for p in CATALOG.values()], indent=2))
        return 0
    rows = [
        (
            p.name,
            f"{p.axis}: vs {p.opposite}" if p.axis else "",
            ", ".join(p.aliases),
            p.description,
        )
        for p in CATALOG.values()
    ]
    headers = ("NAME", "AXIS", "ALIASES", "DESCRIPTION")
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(3)]
    for row in [headers, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[3]
        )
    print("\nUse names with `pj profiles add ID --preference NAME` or `pj generate --preference`.")
    return 0


def _show(args: argparse.Namespace) -> int:
    pref = get_preference(args.name)
    print(f"{pref.name}: {pref.description}")
    if pref.aliases:
        print(f"aliases: {', '.join(pref.aliases)}")
    if pref.axis:
        print(f"axis: {pref.axis} (opposite pole: {pref.opposite})")
    for index, text in enumerate(pref.phrasings, start=1):
        print(f"phrasing {index}: {text}")
    return 0


def _compose(args: argparse.Namespace) -> int:
    personas = compose(
        args.preferences,
        args.k,
        one_per_preference=args.one_per_preference,
        allow_opposites=args.allow_opposites,
        mode=args.mode,
    )
    for index, persona in enumerate(personas):
        print(f"prefix {index} ({persona.name or 'free text'}):")
        print("  " + persona.text.replace("\n", "\n  "))
    return 0
