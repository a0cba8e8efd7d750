"""The built-in preference catalog, as plain data.

Each entry is a named preference dimension with a one-line description and two distinct
phrasings. The paper aligns a single preference by giving the draft and the judge two
phrasings of it, so every entry carries two. The texts are our own wording.

What the catalog holds:

- the nine dimensions of the Persona-judge paper: ``helpful``, ``harmless``, ``humor``,
  ``correct``, ``informative``, ``professional``, ``creative``, ``touching``, ``vivid``;
- the three two-sided P-Soups axes, one entry per pole:
  ``expertise`` (``elementary`` / ``expert``), ``length`` (``concise`` / ``informative``),
  ``tone`` (``friendly`` / ``unfriendly``).

Name clash: P-Soups' "informative" pole and the paper's "informative" dimension ask for the
same thing (a thorough, detailed answer), so one entry serves both. It is the ``length``
axis pole opposite ``concise`` and also answers to the alias ``detailed``.

Poles record their ``axis`` and ``opposite`` so that composing both poles of one axis is
rejected (see :func:`pj_core.personas.compose`).

The entries are plain data (:data:`CATALOG_ENTRIES`); :data:`CATALOG` holds them as
:class:`~pj_core.personas.Preference` objects, and :func:`get_preference` and
:func:`classify` look names up in it.

Example:
    >>> sorted(e.name for e in CATALOG_ENTRIES if e.axis == "length")
    ['concise', 'informative']
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import NamedTuple

from pj_core.errors import UnknownPreferenceError
from pj_core.personas.model import _NAME_LIKE_RE, Preference, check_text


class CatalogEntry(NamedTuple):
    """One catalog row; see :class:`pj_core.personas.Preference` for the meaning of fields."""

    name: str
    description: str
    phrasings: tuple[str, str]
    aliases: tuple[str, ...] = ()
    axis: str | None = None
    opposite: str | None = None
    source: str = "persona-judge"


PAPER = "persona-judge"  # the nine dimensions of Zhang et al. 2025
PSOUPS = "p-soups"  # the two-sided axes of Jang et al. 2023 (Personalized Soups)

CATALOG_ENTRIES: tuple[CatalogEntry, ...] = (
    # The paper's nine dimensions.
    CatalogEntry(
        name="helpful",
        description="Solves the user's actual problem, with the steps they need.",
        phrasings=(
            "Be genuinely helpful: work out what the user really needs and give the "
            "concrete steps that get them there.",
            "Focus on being useful. Answer exactly what was asked and make the next step obvious.",
        ),
        aliases=("useful",),
        source=PAPER,
    ),
    CatalogEntry(
        name="harmless",
        description="Avoids anything that could hurt someone; steers risky requests to safety.",
        phrasings=(
            "Stay safe: do not help with anything dangerous, illegal or hurtful, and explain "
            "kindly why when you decline.",
            "Make sure nothing in the reply could cause harm; offer a safe alternative when a "
            "request is risky.",
        ),
        aliases=("safe", "harmlessness"),
        source=PAPER,
    ),
    CatalogEntry(
        name="humor",
        description="Light, playful humour that still answers the question.",
        phrasings=(
            "Answer with light, playful humour, while still answering the question properly.",
            "Be witty: slip in a joke or a funny turn of phrase, but keep the facts straight.",
        ),
        aliases=("humour", "humorous", "funny"),
        source=PAPER,
    ),
    CatalogEntry(
        name="correct",
        description="Factually accurate; says so when unsure.",
        phrasings=(
            "Be factually accurate. Check each claim, and say plainly when you are not sure.",
            "Prefer precise, verifiable statements and never invent facts, names or numbers.",
        ),
        aliases=("accurate", "factual", "correctness"),
        source=PAPER,
    ),
    CatalogEntry(
        name="informative",
        description="Thorough: background, details and examples (also the P-Soups "
        "'informative' pole, opposite 'concise').",
        phrasings=(
            "Give a thorough answer with background, details and examples.",
            "Be informative: cover the topic fully and explain the reason behind each point.",
        ),
        aliases=("detailed", "thorough"),
        axis="length",
        opposite="concise",
        source=PAPER,
    ),
    CatalogEntry(
        name="professional",
        description="A measured, formal tone, as in a workplace report.",
        phrasings=(
            "Use a professional, formal tone, as you would in a report to a client.",
            "Write like an experienced consultant: measured, courteous and free of slang.",
        ),
        aliases=("formal",),
        source=PAPER,
    ),
    CatalogEntry(
        name="creative",
        description="Original ideas and unexpected angles.",
        phrasings=(
            "Be imaginative: offer original ideas and unexpected angles.",
            "Think beyond the obvious and suggest fresh, inventive options.",
        ),
        aliases=("imaginative", "original"),
        source=PAPER,
    ),
    CatalogEntry(
        name="touching",
        description="Warm, heartfelt writing that moves the reader.",
        phrasings=(
            "Write with warmth and feeling, so the reply touches the reader.",
            "Make the answer heartfelt and speak to the emotions behind the question.",
        ),
        aliases=("heartfelt", "emotional", "moving"),
        source=PAPER,
    ),
    CatalogEntry(
        name="vivid",
        description="Concrete, colourful imagery that paints a picture.",
        phrasings=(
            "Use vivid, concrete imagery that lets the reader picture what you describe.",
            "Describe things colourfully, with sensory detail and lively language.",
        ),
        aliases=("descriptive", "colorful", "colourful"),
        source=PAPER,
    ),
    # P-Soups axes: one entry per pole ("informative" above is the length axis' other pole).
    CatalogEntry(
        name="elementary",
        description="Plain words a ten-year-old could follow; no jargon.",
        phrasings=(
            "Explain in simple words that a ten-year-old could follow, and avoid jargon.",
            "Assume no background knowledge: use everyday words and familiar comparisons.",
        ),
        aliases=("simple", "beginner", "eli5"),
        axis="expertise",
        opposite="expert",
        source=PSOUPS,
    ),
    CatalogEntry(
        name="expert",
        description="For specialists: precise technical terms, basics skipped.",
        phrasings=(
            "Answer for a specialist: use precise technical terms and skip the basics.",
            "Assume deep knowledge of the field and go straight to the advanced points.",
        ),
        aliases=("advanced", "technical"),
        axis="expertise",
        opposite="elementary",
        source=PSOUPS,
    ),
    CatalogEntry(
        name="concise",
        description="Short and to the point; no filler.",
        phrasings=(
            "Be concise: answer in a few short sentences, with no filler.",
            "Keep it brief and to the point, leaving out anything the user did not ask for.",
        ),
        aliases=("brief", "short", "terse"),
        axis="length",
        opposite="informative",
        source=PSOUPS,
    ),
    CatalogEntry(
        name="friendly",
        description="Warm, kind and encouraging, like a helpful friend.",
        phrasings=(
            "Be warm and friendly, like a helpful friend would be.",
            "Use a kind, encouraging and personable tone.",
        ),
        aliases=("warm", "kind"),
        axis="tone",
        opposite="unfriendly",
        source=PSOUPS,
    ),
    CatalogEntry(
        name="unfriendly",
        description="Blunt and curt: no pleasantries, no warmth.",
        phrasings=(
            "Be blunt and curt, with no pleasantries and no warmth.",
            "Answer coolly and tersely, without greetings or encouragement.",
        ),
        aliases=("blunt", "curt", "cold"),
        axis="tone",
        opposite="friendly",
        source=PSOUPS,
    ),
)


def _build_catalog() -> dict[str, Preference]:
    catalog: dict[str, Preference] = {}
    for entry in CATALOG_ENTRIES:
        catalog[entry.name] = Preference(**entry._asdict())
    return catalog


CATALOG: Mapping[str, Preference] = _build_catalog()
"""The built-in preferences by canonical name (see :mod:`pj_core.personas.catalog`)."""

_ALIASES: dict[str, str] = {
    alias: pref.name for pref in CATALOG.values() for alias in (pref.name, *pref.aliases)
}


def get_preference(name: str) -> Preference:
    """The catalog preference called ``name`` (or one of its aliases), case-insensitive.

    Raises :class:`UnknownPreferenceError` with the closest name as ``suggestion``.

    Example:
        >>> get_preference("Humour").name
        'humor'
        >>> get_preference("consise")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        pj_core.errors.UnknownPreferenceError: unknown preference 'consise'; did you mean ...
    """
    key = name.strip().lower()
    if key in _ALIASES:
        return CATALOG[_ALIASES[key]]
    close = difflib.get_close_matches(key, list(_ALIASES), n=1, cutoff=0.6)
    suggestion = _ALIASES[close[0]] if close else None
    hint = f"; did you mean {suggestion!r}?" if suggestion else ";"
    raise UnknownPreferenceError(
        f"unknown preference {name.strip()!r}{hint} (`pj personas list` shows the catalog)"
        + ("" if suggestion else "; for free text write a sentence, e.g. 'Talk about dinosaurs.'"),
        name=name,
        suggestion=suggestion,
    )


def classify(item: str) -> Preference | str:
    """A catalog :class:`Preference` if ``item`` is a single word, else validated free text.

    A lone word that is not in the catalog raises :class:`UnknownPreferenceError`.

    Example:
        >>> classify("humor").name
        'humor'
        >>> classify("I love dinosaurs.")
        'I love dinosaurs.'
    """
    text = check_text(item, "preference")
    if _NAME_LIKE_RE.fullmatch(text):
        return get_preference(text)
    return text
