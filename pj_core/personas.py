"""Personas: what one persona prefix says.

This module is extended by the personas issue (catalog, profiles, composition). The engine
only needs :class:`Persona` and :func:`resolve_personas`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, field_validator

from pj_core.errors import InvalidPersonaError

MAX_PERSONA_CHARS = 2000


class Persona(BaseModel):
    """The preference text placed in one persona prefix's system message.

    Example:
        >>> Persona(text="Answer with humour.").text
        'Answer with humour.'
    """

    model_config = ConfigDict(frozen=True)

    text: str
    name: str | None = None

    @field_validator("text")
    @classmethod
    def _check_text(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("persona text is empty: give a preference such as 'Answer with humour.'")
        if len(value) > MAX_PERSONA_CHARS:
            raise ValueError(
                f"persona text has {len(value)} characters; the limit is {MAX_PERSONA_CHARS}"
            )
        return value


PersonaLike = str | Persona


def resolve_personas(personas: Sequence[PersonaLike]) -> list[Persona]:
    """Turn the engine's ``personas=`` argument into a list of :class:`Persona`.

    Raises:
        InvalidPersonaError: fewer than two personas, or an invalid text.
    """
    if isinstance(personas, str | Persona):
        raise InvalidPersonaError(
            "personas= takes a list of two or more personas, e.g. "
            "[Persona(text='Be funny.'), Persona(text='Be concise.')]"
        )
    out: list[Persona] = []
    for item in personas:
        if isinstance(item, Persona):
            out.append(item)
        elif isinstance(item, str):
            try:
                out.append(Persona(text=item))
            except ValueError as exc:
                raise InvalidPersonaError(str(exc)) from None
        else:
            raise InvalidPersonaError(
                f"a persona must be a str or Persona, got {type(item).__name__}"
            )
    if len(out) < 2:
        raise InvalidPersonaError(
            f"Persona-judge needs two or more personas (a draft and a judge); got {len(out)}"
        )
    return out
