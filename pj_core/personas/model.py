"""The persona value types and the checks every text passes on its way in.

:class:`Preference` (a catalog entry, or a free-text wish), :class:`Persona` (one persona
prefix's text), :class:`GenerationDefaults` (a user's saved generation settings), and the
limits and checks they share (:func:`check_text`, :func:`check_user_id`). The models are
frozen and never let a raw pydantic ``ValidationError`` out of their constructors.

Example:
    >>> Persona(text="  Answer with humour. ").text
    'Answer with humour.'
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from pj_core.errors import InvalidPersonaError, PersonaJudgeError
from pj_core.settings import check_settings

MAX_PERSONA_CHARS = 2000
"""Longest persona text, or free-text preference, in characters (after stripping)."""

MAX_DESCRIPTION_CHARS = 1000
"""Longest profile description; shorter than a persona so it fits beside the preferences."""

MAX_PREFERENCES = 16
"""Most preferences one profile may hold."""

MAX_PERSONAS = 8
"""Most persona prefixes :func:`compose` builds (each costs one KV cache in the engine)."""

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
        if unicodedata.category(char) == "Cs":
            raise InvalidPersonaError(
                f"{what} holds a lone surrogate (U+{ord(char):04X}) at position {index}; pass "
                'valid Unicode text (decode bytes with errors="replace")'
            )
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


class Preference(_Model):
    """A named preference dimension with a short description and two distinct phrasings.

    The paper aligns one preference by giving the draft and the judge two phrasings of it, so a
    preference always has two. Two-sided axes (P-Soups) record their ``axis`` and the
    ``opposite`` pole.

    Example:
        >>> from pj_core.personas import CATALOG
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
