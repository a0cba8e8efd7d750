"""A user's saved profile: :class:`PersonaProfile`, its JSON layout and its migrations.

Example:
    >>> PersonaProfile(user_id="alice", preferences=["Humour"]).preferences
    ('humor',)
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from pj_core.errors import InvalidPersonaError
from pj_core.personas.catalog import classify
from pj_core.personas.model import (
    MAX_DESCRIPTION_CHARS,
    MAX_PERSONA_CHARS,
    MAX_PREFERENCES,
    GenerationDefaults,
    Preference,
    _Model,
    _typed_error,
    check_text,
    check_user_id,
)

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
        >>> from pj_core.personas import compose
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
            if isinstance(item, str) and any(unicodedata.category(c) == "Cs" for c in item):
                raise InvalidPersonaError(
                    f"metadata[{key!r}] holds a lone surrogate; pass valid Unicode text"
                )
            if isinstance(item, float) and not math.isfinite(item):
                raise InvalidPersonaError(
                    f"metadata[{key!r}] is {item}; JSON has no NaN or infinity: store a finite "
                    "number, a string or null"
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
