"""How preferences become persona prefixes: :func:`compose` and its placement modes.

Example:
    >>> [p.name for p in compose(["humor", "concise"])]
    ['humor', 'concise']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pj_core.errors import InvalidPersonaError
from pj_core.personas.catalog import classify
from pj_core.personas.model import MAX_PERSONA_CHARS, MAX_PERSONAS, Persona, Preference
from pj_core.personas.profile import PersonaProfile


@dataclass(frozen=True)
class _Aspect:
    """One preference to place: its label and the phrasings to cycle through."""

    label: str | None
    phrasings: tuple[str, ...]
    preference: Preference | None = None


PersonaLike = str | Persona
"""One item of the engine's historical ``personas`` list (kept for its type hints)."""

PreferenceItem = str | Preference | Persona
PreferenceSpec = PreferenceItem | Sequence[PreferenceItem]


def _aspect(item: PreferenceItem) -> _Aspect:
    if isinstance(item, Persona):
        return _Aspect(item.name, (item.text,))
    if isinstance(item, Preference):
        return _Aspect(item.name, item.phrasings, item)
    if isinstance(item, str):
        found = classify(item)
        if isinstance(found, Preference):
            return _Aspect(found.name, found.phrasings, found)
        return _Aspect(None, (found,))
    raise InvalidPersonaError(
        "a preference must be a catalog name, a free-text sentence, a Preference or a Persona; "
        f"got {type(item).__name__}"
    )


def _check_opposites(aspects: Sequence[_Aspect]) -> None:
    names = {a.preference.name for a in aspects if a.preference is not None}
    for aspect in aspects:
        pref = aspect.preference
        if pref is not None and pref.opposite in names and pref.name < pref.opposite:
            raise InvalidPersonaError(
                f"{pref.name!r} and {pref.opposite!r} are opposite poles of the {pref.axis!r} "
                "axis; keep one of them (or pass allow_opposites=True to contrast them on "
                "purpose)"
            )


COMPOSITION_MODES: tuple[str, ...] = ("round-robin", "one-per-preference", "full")
"""How :func:`compose` places several preferences on the persona prefixes."""


def compose(
    spec: PreferenceSpec | PersonaProfile,
    k: int = 2,
    *,
    one_per_preference: bool = False,
    allow_opposites: bool = False,
    mode: str | None = None,
) -> list[Persona]:
    """The persona prefixes the engine uses for some preferences or a profile.

    The rule, and why: Persona-judge accepts a token only when the judge agrees with the
    draft, so whatever the prefixes say jointly shapes the text. Spreading the preferences
    over the prefixes makes each one argue for a different subset, and every token must
    satisfy all of them.

    - Preferences are de-duplicated, then dealt round-robin: slot ``j`` (for
      ``j < max(n, k)``) holds preference ``j % n`` and goes to prefix ``j % k``. A preference
      dealt a second time uses its next phrasing.
    - One preference therefore gives its two phrasings (the paper's single-objective setup);
      several are spread so each prefix carries a different subset (3 over 2 prefixes:
      ``[A, C]`` and ``[B]``).
    - ``one_per_preference=True`` raises ``k`` to ``n``, so each preference gets its own
      prefix (the engine then rotates roles over all of them).
    - ``mode`` names the placement, from :data:`COMPOSITION_MODES`: ``"round-robin"`` (the
      dealing above, the default), ``"one-per-preference"`` (as ``one_per_preference=True``)
      or ``"full"``: every one of the ``k`` prefixes carries *every* preference, prefix ``i``
      in its own order (rotated by ``i``) and phrasing (``i``-th, cycling), so the judge of
      every round holds the whole set (the paper's "different combinations of preferences
      used alternately"), where round-robin gives each preference only part of the rounds.
    - Free text has one phrasing, so a single free-text preference gives identical prefixes:
      decoding then equals ordinary sampling with that system message.
    - A profile's description is about the user, so every prefix carries it, first.
    - Both poles of one axis (``concise`` and ``informative``) are rejected unless
      ``allow_opposites=True``.

    Raises :class:`InvalidPersonaError` (or :class:`UnknownPreferenceError`) on bad input.

    Example:
        >>> [p.name for p in compose(["humor", "concise", "helpful"])]
        ['humor+helpful', 'concise']
        >>> [p.name for p in compose(["humor", "concise", "helpful"], one_per_preference=True)]
        ['humor', 'concise', 'helpful']
        >>> a, b = compose("humor"); a.text != b.text
        True
        >>> [p.name for p in compose(["humor", "concise", "helpful"], mode="full")]
        ['humor+concise+helpful', 'concise+helpful+humor']
    """
    if mode is None:
        mode = "one-per-preference" if one_per_preference else "round-robin"
    elif mode not in COMPOSITION_MODES:
        raise InvalidPersonaError(
            f"unknown composition mode {mode!r}: choose from {', '.join(COMPOSITION_MODES)}"
        )
    elif one_per_preference and mode != "one-per-preference":
        raise InvalidPersonaError(
            f"one_per_preference=True contradicts mode={mode!r}; give only mode"
        )
    description: str | None = None
    if isinstance(spec, PersonaProfile):
        items: Sequence[PreferenceItem] = spec.preferences
        description = spec.description
    elif isinstance(spec, str | Preference | Persona):
        items = [spec]
    elif isinstance(spec, Sequence):
        items = spec
    else:
        raise InvalidPersonaError(
            "preferences must be a name, a sentence, a Preference, a Persona, a list of "
            f"these, or a PersonaProfile; got {type(spec).__name__}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= MAX_PERSONAS:
        raise InvalidPersonaError(
            f"k (the number of persona prefixes) must be an integer from 2 to {MAX_PERSONAS}, "
            f"got {k!r}"
        )

    aspects: list[_Aspect] = []
    for item in items:
        aspect = _aspect(item)
        if aspect not in aspects:
            aspects.append(aspect)
    if not aspects:
        if description is None:
            raise InvalidPersonaError(
                "no preferences given: name catalog preferences (e.g. 'humor') or write one "
                "in free text"
            )
        aspects.append(_Aspect(None, (description,)))
        description = None
    if not allow_opposites:
        _check_opposites(aspects)

    n = len(aspects)
    if mode == "one-per-preference":
        k = max(k, n)
        if k > MAX_PERSONAS:
            raise InvalidPersonaError(
                f"{n} preferences would need {n} prefixes; the limit is {MAX_PERSONAS}: "
                "use fewer or set one_per_preference=False"
            )
    texts: list[list[str]] = [[] for _ in range(k)]
    labels: list[list[str]] = [[] for _ in range(k)]

    def place(prefix: int, aspect: _Aspect, phrasing: int) -> None:
        texts[prefix].append(aspect.phrasings[phrasing % len(aspect.phrasings)])
        # Free text has no label; a prefix of free text only keeps name=None.
        if aspect.label and aspect.label not in labels[prefix]:
            labels[prefix].append(aspect.label)

    if mode == "full":
        for prefix in range(k):
            for j in range(n):
                place(prefix, aspects[(prefix + j) % n], prefix)
    else:
        for slot in range(max(n, k)):
            place(slot % k, aspects[slot % n], slot // n)

    personas = []
    for prefix_texts, prefix_labels in zip(texts, labels, strict=True):
        body = " ".join(prefix_texts)
        text = f"{description}\n{body}" if description else body
        if len(text) > MAX_PERSONA_CHARS:
            raise InvalidPersonaError(
                f"a composed persona has {len(text)} characters; the limit is "
                f"{MAX_PERSONA_CHARS}: shorten the description or free-text preferences"
                + ("" if mode == "full" else ", or raise k to spread them over more prefixes")
            )
        personas.append(Persona(text=text, name="+".join(prefix_labels) or None))
    return personas
