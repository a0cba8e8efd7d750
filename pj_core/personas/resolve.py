"""The engine's ``personas=`` argument, whatever its form, as validated persona prefixes.

Example:
    >>> [p.text for p in resolve_personas(["Be funny.", "Be brief."])]
    ['Be funny.', 'Be brief.']
"""

from __future__ import annotations

import os

from pj_core.personas.compose import PreferenceSpec, compose
from pj_core.personas.model import USER_PREFIX, Persona, Preference, check_user_id
from pj_core.personas.profile import PersonaProfile
from pj_core.personas.store import AbstractProfileStore, load_profile

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
    - a :class:`PersonaProfile`, or ``"user:ID"`` looked up in ``store`` (a store object, a
      SQLite path or a ``postgresql://`` URL; default
      :func:`pj_core.personas.store.default_store`): :func:`compose` of the profile.

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
        personas = load_profile(check_user_id(user_id), store)
    if mode is not None:
        return compose(personas, k or 2, mode=mode)
    if isinstance(personas, PersonaProfile | str | Preference | Persona):
        return compose(personas, k or 2)
    if k is not None:
        return compose(personas, k)
    return compose(personas, 2, one_per_preference=True)
