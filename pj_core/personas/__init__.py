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

The package, each module importing only those listed before it (no cycle):
:mod:`~pj_core.personas.model` (value types and text checks), :mod:`~pj_core.personas.catalog`
(the built-in preferences), :mod:`~pj_core.personas.profile` (:class:`PersonaProfile`),
:mod:`~pj_core.personas.store` (saved profiles; it imports the models only),
:mod:`~pj_core.personas.compose` (preferences to prefixes) and :mod:`~pj_core.personas.resolve`
(the engine's ``personas=`` argument). Everything public is importable from
``pj_core.personas`` itself.

Example:
    >>> [p.name for p in compose(["humor", "concise"])]
    ['humor', 'concise']
    >>> len(resolve_personas("humor"))  # one preference: its two phrasings
    2
"""

from __future__ import annotations

from pj_core.personas.catalog import CATALOG, classify, get_preference
from pj_core.personas.compose import (
    COMPOSITION_MODES,
    PersonaLike,
    PreferenceItem,
    PreferenceSpec,
    compose,
)
from pj_core.personas.model import (
    DISPLAY_NAME_CHARS,
    MAX_DESCRIPTION_CHARS,
    MAX_PERSONA_CHARS,
    MAX_PERSONAS,
    MAX_PREFERENCES,
    USER_PREFIX,
    GenerationDefaults,
    Persona,
    Preference,
    check_text,
    check_user_id,
)
from pj_core.personas.profile import (
    PROFILE_MIGRATIONS,
    PROFILE_SCHEMA_VERSION,
    MetadataValue,
    PersonaProfile,
)
from pj_core.personas.resolve import PersonasInput, resolve_personas

__all__ = [
    "CATALOG",
    "COMPOSITION_MODES",
    "DISPLAY_NAME_CHARS",
    "MAX_DESCRIPTION_CHARS",
    "MAX_PERSONAS",
    "MAX_PERSONA_CHARS",
    "MAX_PREFERENCES",
    "PROFILE_MIGRATIONS",
    "PROFILE_SCHEMA_VERSION",
    "USER_PREFIX",
    "GenerationDefaults",
    "MetadataValue",
    "Persona",
    "PersonaLike",
    "PersonaProfile",
    "PersonasInput",
    "Preference",
    "PreferenceItem",
    "PreferenceSpec",
    "check_text",
    "check_user_id",
    "classify",
    "compose",
    "get_preference",
    "resolve_personas",
]
