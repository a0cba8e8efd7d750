"""Personas, preferences, user profiles, and how they become persona prefixes.

Users say what they want in two ways: by naming catalog preferences (``"humor"``,
``"concise"``) or in free text (``"Explain like I'm ten, I love dinosaurs."``). This module
turns either, or a saved :class:`PersonaProfile`, into the list of :class:`Persona` the engine
places in its persona prefixes (:func:`compose`, :func:`resolve_personas`).

Limits (checked everywhere a text enters the library):

- a persona text, or a free-text preference, has at most :data:`MAX_PERSONA_CHARS` characters
  after stripping, and a profile description at most :data:`MAX_DESCRIPTION_CHARS`;
- no control characters except newline and tab (``"\\r\\n"`` is read as ``"\\n"``);
- a profile holds at most :data:`MAX_PREFERENCES` preferences;
- a user id is 1-128 characters of letters, digits and ``. _ @ + -``, starting with a letter or
  digit (so it is safe in file names, URLs and ``user:ID`` strings).

Bad input raises :class:`~pj_core.errors.InvalidPersonaError` (or its subclass
:class:`~pj_core.errors.UnknownPreferenceError`, which suggests the closest catalog name);
out-of-range generation defaults raise :class:`~pj_core.errors.InvalidGenerationConfigError`.
The models never let a raw pydantic ``ValidationError`` out of their constructors.

Example:
    >>> [p.name for p in compose(["humor", "concise"])]
    ['humor', 'concise']
    >>> len(resolve_personas("humor"))  # one preference: its two phrasings
    2
"""

from __future__ import annotations

import difflib
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pj_core.catalog import CATALOG_ENTRIES
from pj_core.errors import (
    InvalidPersonaError,
    PersonaJudgeError,
    UnknownPreferenceError,
)
from pj_core.settings import check_settings

if TYPE_CHECKING:  # store imports this module; only the type checker needs the reverse
    from pj_core.store import AbstractProfileStore

MAX_PERSONA_CHARS = 2000
"""Longest persona text, or free-text preference, in characters (after stripping)."""

MAX_DESCRIPTION_CHARS = 1000
"""Longest profile description; shorter than a persona so it fits beside the preferences."""

MAX_PREFERENCES = 16
"""Most preferences one profile may hold."""

MAX_PERSONAS = 8
"""Most persona prefixes :func:`compose` builds (each costs one KV cache in the engine)."""

PROFILE_SCHEMA_VERSION = 2
"""Version of the :class:`PersonaProfile` JSON layout (2: ``defaults.strength`` and
``defaults.decoder``)."""


def _profile_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    # Version 2 adds the optional defaults.strength and defaults.decoder; a version 1 profile
    # simply has neither.
    return {**data, "schema_version": 2}


PROFILE_MIGRATIONS: Mapping[int, Any] = {1: _profile_v1_to_v2}
"""``PROFILE_MIGRATIONS[v]`` turns a profile's JSON data of version v into version v + 1.
Profiles are upgraded when they are read (from a store, a file or a dict), so data written
by an older persona-judge keeps working; an older persona-judge rejects newer data with a
clear message instead of misreading it."""

USER_PREFIX = "user:"
"""A string ``"user:ID"`` given as personas is looked up in a profile store."""

_USER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
# A lone word is read as a catalog name; anything else (spaces, punctuation) is free text.
_NAME_LIKE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


# --------------------------------------------------------------------------- validation


def check_text(value: str, what: str = "persona text", limit: int = MAX_PERSONA_CHARS) -> str:
    """Strip ``value`` and check it is non-empty, within ``limit`` and free of control characters.

    Returns the stripped text; raises :class:`InvalidPersonaError` saying what to fix.

    Example:
        >>> check_text("  Be brief.  ")
        'Be brief.'
    """
    if not isinstance(value, str):
        raise InvalidPersonaError(f"{what} must be a string, got {type(value).__name__}")
    value = value.replace("\r\n", "\n").strip()
    if not value:
        raise InvalidPersonaError(
            f"{what} is empty: write a preference such as 'Answer with humour.'"
        )
    if len(value) > limit:
        raise InvalidPersonaError(
            f"{what} has {len(value)} characters; the limit is {limit}: shorten it"
        )
    for index, char in enumerate(value):
        if char not in "\n\t" and unicodedata.category(char) == "Cc":
            raise InvalidPersonaError(
                f"{what} contains the control character U+{ord(char):04X} at position {index}; "
                "remove it (only newline and tab are allowed)"
            )
    return value


def check_user_id(user_id: str) -> str:
    """Check a profile user id (see the module docstring for the rule) and return it.

    Example:
        >>> check_user_id("alice@example.com")
        'alice@example.com'
    """
    if not isinstance(user_id, str):
        raise InvalidPersonaError(f"user id must be a string, got {type(user_id).__name__}")
    if not _USER_ID_RE.fullmatch(user_id):
        shown = user_id if len(user_id) <= 40 else user_id[:40] + "..."
        raise InvalidPersonaError(
            f"user id {shown!r} is invalid: use 1-128 letters, digits or '._@+-', starting "
            "with a letter or digit (e.g. 'alice' or 'alice@example.com')"
        )
    return user_id


def _typed_error(exc: ValidationError, model: str) -> PersonaJudgeError:
    """Turn a pydantic error into our typed error, keeping our own error when there is one."""
    errors = exc.errors()
    if len(errors) == 1:
        original = errors[0].get("ctx", {}).get("error")
        if isinstance(original, PersonaJudgeError):
            return original
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error["loc"]) or "value"
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return InvalidPersonaError(f"invalid {model}: " + "; ".join(parts))


# Longest persona label shown in traces and stats when a persona has no name.
DISPLAY_NAME_CHARS = 24


class _Model(BaseModel):
    """Frozen, strict-field base whose constructor raises our typed errors, not pydantic's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _typed_error(exc, type(self).__name__) from None


# --------------------------------------------------------------------------- models


class Preference(_Model):
    """A named preference dimension with a short description and two distinct phrasings.

    The paper aligns one preference by giving the draft and the judge two phrasings of it, so a
    preference always has two. Two-sided axes (P-Soups) record their ``axis`` and the
    ``opposite`` pole.

    Example:
        >>> p = CATALOG["humor"]
        >>> p.axis is None and len(p.phrasings)
        2
        >>> CATALOG["concise"].opposite
        'informative'
    """

    name: str
    description: str
    phrasings: tuple[str, str]
    aliases: tuple[str, ...] = ()
    axis: str | None = None
    opposite: str | None = None
    source: str = "custom"

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_LIKE_RE.fullmatch(value) or len(value) > 40:
            raise InvalidPersonaError(
                f"preference name {value!r} is invalid: use one lowercase word of at most 40 "
                "letters, digits, '_' or '-' (e.g. 'humor')"
            )
        return value.lower()

    @field_validator("description")
    @classmethod
    def _check_description(cls, value: str) -> str:
        return check_text(value, "preference description", MAX_DESCRIPTION_CHARS)

    @field_validator("phrasings")
    @classmethod
    def _check_phrasings(cls, value: tuple[str, str]) -> tuple[str, str]:
        first = check_text(value[0], "preference phrasing")
        second = check_text(value[1], "preference phrasing")
        if first == second:
            raise InvalidPersonaError(
                "a preference needs two distinct phrasings (the draft and the judge get one "
                "each); reword one of them"
            )
        return (first, second)


class Persona(_Model):
    """The preference text placed in one persona prefix's system message.

    Example:
        >>> Persona(text="Answer with humour.").text
        'Answer with humour.'
        >>> Persona(text="   ")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        pj_core.errors.InvalidPersonaError: persona text is empty: write a preference ...
    """

    text: str
    name: str | None = None

    @field_validator("text")
    @classmethod
    def _check_text(cls, value: str) -> str:
        return check_text(value)

    @property
    def display_name(self) -> str:
        """``name``, else the text cut to :data:`DISPLAY_NAME_CHARS` characters (for traces).

        Example:
            >>> Persona(text="Answer with playful humour and lots of puns.").display_name
            'Answer with playful hum…'
        """
        if self.name:
            return self.name
        if len(self.text) <= DISPLAY_NAME_CHARS:
            return self.text
        return self.text[: DISPLAY_NAME_CHARS - 1] + "…"


class GenerationDefaults(_Model):
    """A user's default generation settings; ``None`` leaves the engine's own default
    (:data:`pj_core.settings.DEFAULTS`). Values are checked against the engine's ranges.

    Example:
        >>> GenerationDefaults(lookahead=6, temperature=0.8).as_kwargs()
        {'lookahead': 6, 'temperature': 0.8}
    """

    lookahead: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    alternate: bool | None = None
    strength: float | None = None
    decoder: str | None = None

    @field_validator(
        "lookahead",
        "temperature",
        "top_k",
        "top_p",
        "max_new_tokens",
        "alternate",
        "strength",
        "decoder",
    )
    @classmethod
    def _check_setting(cls, value: Any, info: ValidationInfo) -> Any:
        # The engine's own ranges (pj_core.settings), so a saved default always runs.
        check_settings({str(info.field_name): value})
        return value

    def as_kwargs(self) -> dict[str, Any]:
        """The settings that are set, as keyword arguments for ``PersonaJudge.generate``."""
        return {key: value for key, value in self.model_dump().items() if value is not None}


def _now() -> datetime:
    return datetime.now(timezone.utc)


MetadataValue = str | int | float | bool | None


class PersonaProfile(_Model):
    """A user's saved settings: preferences, a free-text description and generation defaults.

    ``preferences`` holds catalog names (canonicalised: ``"Humour"`` is stored as ``"humor"``)
    or free-text sentences. A lone word that is not a catalog name is rejected with a
    suggestion, because it is almost always a typo; write a sentence for free text.
    ``revision`` counts the writes of this user id; the store sets it (0 = never stored).
    ``metadata`` is a small flat mapping for the application's own fields.

    Example:
        >>> p = PersonaProfile(user_id="alice", preferences=["Humour", "concise"])
        >>> p.preferences
        ('humor', 'concise')
        >>> [x.name for x in compose(p)]
        ['humor', 'concise']
    """

    schema_version: int = PROFILE_SCHEMA_VERSION
    user_id: str
    # Sequence so callers may pass a list; the validator always stores a tuple.
    preferences: Sequence[str] = ()
    description: str | None = None
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)
    revision: int = 0

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        """Upgrade the data of an older profile layout, one version at a time."""
        if not isinstance(data, Mapping):
            return data
        version = data.get("schema_version", PROFILE_SCHEMA_VERSION)
        upgraded = dict(data)
        while type(version) is int and version in PROFILE_MIGRATIONS:
            upgraded = PROFILE_MIGRATIONS[version](upgraded)
            version = upgraded["schema_version"]
        return upgraded

    @field_validator("schema_version")
    @classmethod
    def _check_schema(cls, value: int) -> int:
        if value != PROFILE_SCHEMA_VERSION:
            raise InvalidPersonaError(
                f"profile schema_version {value} is not supported (this persona-judge reads "
                f"version {PROFILE_SCHEMA_VERSION}); upgrade persona-judge or re-export the data"
            )
        return value

    @field_validator("user_id")
    @classmethod
    def _check_user(cls, value: str) -> str:
        return check_user_id(value)

    @field_validator("preferences")
    @classmethod
    def _check_preferences(cls, value: Sequence[str]) -> tuple[str, ...]:
        if len(value) > MAX_PREFERENCES:
            raise InvalidPersonaError(
                f"a profile holds at most {MAX_PREFERENCES} preferences, got {len(value)}"
            )
        out: list[str] = []
        for item in value:
            found = classify(item)
            canonical = found.name if isinstance(found, Preference) else found
            if canonical not in out:  # a repeat adds nothing to the prefixes
                out.append(canonical)
        return tuple(out)

    @field_validator("description")
    @classmethod
    def _check_description(cls, value: str | None) -> str | None:
        return None if value is None else check_text(value, "description", MAX_DESCRIPTION_CHARS)

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, MetadataValue]) -> dict[str, MetadataValue]:
        if len(value) > 64:
            raise InvalidPersonaError(f"metadata holds at most 64 keys, got {len(value)}")
        for key, item in value.items():
            check_text(key, "metadata key", 64)
            if isinstance(item, str) and len(item) > MAX_PERSONA_CHARS:
                raise InvalidPersonaError(
                    f"metadata[{key!r}] has {len(item)} characters; the limit is "
                    f"{MAX_PERSONA_CHARS}"
                )
        return value

    @field_validator("revision")
    @classmethod
    def _check_revision(cls, value: int) -> int:
        if value < 0:
            raise InvalidPersonaError(f"revision cannot be negative, got {value}")
        return value

    @classmethod
    def from_data(cls, data: Mapping[str, Any] | str | bytes) -> PersonaProfile:
        """Validate a profile from a dict or a JSON text, raising our typed errors.

        Example:
            >>> PersonaProfile.from_data('{"user_id": "bob"}').user_id
            'bob'
        """
        try:
            if isinstance(data, str | bytes):
                return cls.model_validate_json(data)
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise _typed_error(exc, cls.__name__) from None

    def evolve(self, **changes: Any) -> PersonaProfile:
        """A validated copy with ``changes`` applied (``model_copy`` would skip validation).

        Example:
            >>> PersonaProfile(user_id="bob").evolve(preferences=["vivid"]).preferences
            ('vivid',)
        """
        data = self.model_dump()
        data.update(changes)
        return PersonaProfile(**data)

    def generation_kwargs(self) -> dict[str, Any]:
        """The user's generation defaults, ready to pass to ``PersonaJudge.generate(**...)``."""
        return self.defaults.as_kwargs()


# --------------------------------------------------------------------------- catalog


def _build_catalog() -> dict[str, Preference]:
    catalog: dict[str, Preference] = {}
    for entry in CATALOG_ENTRIES:
        catalog[entry.name] = Preference(**entry._asdict())
    return catalog


CATALOG: Mapping[str, Preference] = _build_catalog()
"""The built-in preferences by canonical name (see :mod:`pj_core.catalog`)."""

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


# --------------------------------------------------------------------------- composition


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


# --------------------------------------------------------------------------- engine entry


PersonasInput = PreferenceSpec | PersonaProfile
"""Everything an engine entry point accepts as ``personas``."""


def resolve_personas(
    personas: PersonasInput,
    *,
    store: AbstractProfileStore | str | os.PathLike[str] | None = None,
    k: int | None = None,
    mode: str | None = None,
) -> list[Persona]:
    """Turn the engine's ``personas=`` argument into validated :class:`Persona` prefixes.

    Accepted inputs, one rule for every entry point:

    - a list: one prefix per item, in order (catalog name -> its first phrasing, free text
      -> itself, :class:`Persona` -> unchanged); a single item gives two prefixes as
      :func:`compose` does;
    - a catalog name, a free-text sentence, a :class:`Preference` or a :class:`Persona`:
      :func:`compose` with ``k`` prefixes (default 2);
    - a :class:`PersonaProfile`, or ``"user:ID"`` looked up in ``store`` (a store object or a
      database path; default :func:`pj_core.store.default_store_path`): :func:`compose` of
      the profile.

    Passing ``k`` composes with exactly ``k`` prefixes whatever the input. Passing ``mode``
    (from :data:`COMPOSITION_MODES`) composes any input with that placement (``k`` prefixes,
    default 2).

    Raises:
        InvalidPersonaError: invalid or missing text, or an unknown preference name.
        ProfileNotFoundError: ``"user:ID"`` with no such profile in the store.

    Example:
        >>> [p.text for p in resolve_personas(["Be funny.", "Be brief."])]
        ['Be funny.', 'Be brief.']
        >>> [p.name for p in resolve_personas(["humor", "concise"], mode="full")]
        ['humor+concise', 'concise+humor']
    """
    if isinstance(personas, str) and personas.strip().startswith(USER_PREFIX):
        user_id = personas.strip()[len(USER_PREFIX) :]
        personas = _load_profile(check_user_id(user_id), store)
    if mode is not None:
        return compose(personas, k or 2, mode=mode)
    if isinstance(personas, PersonaProfile | str | Preference | Persona):
        return compose(personas, k or 2)
    if k is not None:
        return compose(personas, k)
    return compose(personas, 2, one_per_preference=True)


def _load_profile(
    user_id: str, store: AbstractProfileStore | str | os.PathLike[str] | None
) -> PersonaProfile:
    from pj_core.store import load_profile  # store imports this module

    return load_profile(user_id, store)
