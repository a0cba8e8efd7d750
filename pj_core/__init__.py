"""persona-judge: training-free, per-user personalised generation with local open models.

The public names below are imported lazily (on first use), so ``import pj_core`` and the
``pj`` command start without loading torch and transformers.

Example:
    >>> import pj_core
    >>> pj_core.DEFAULT_MODEL
    'smollm2-135m-instruct'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pj_core import _moved

_moved.install()  # old module paths (pj_core.kv, pj_core.models, ...) for one release

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "load_model": "pj_core.backends.loading",
    "LoadedModel": "pj_core.backends.hf.models",
    "DEFAULT_MODEL": "pj_core.backends.hf.models",
    "PersonaJudge": "pj_core.engine",
    "GenerationResult": "pj_core.results",
    "GenerationStats": "pj_core.results",
    "StreamEvent": "pj_core.results",
    "TokenTrace": "pj_core.results",
    "Persona": "pj_core.personas",
    "Preference": "pj_core.personas",
    "PersonaProfile": "pj_core.personas",
    "GenerationDefaults": "pj_core.personas",
    "CATALOG": "pj_core.personas",
    "compose": "pj_core.personas",
    "resolve_personas": "pj_core.personas",
    "ProfileStore": "pj_core.personas.store",
    "AbstractProfileStore": "pj_core.personas.store",
    "load_profile": "pj_core.personas.store",
    "open_store": "pj_core.personas.store",
    "PostgresProfileStore": "pj_core.personas.store",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from pj_core.backends.hf.models import DEFAULT_MODEL as DEFAULT_MODEL
    from pj_core.backends.hf.models import LoadedModel as LoadedModel
    from pj_core.backends.loading import load_model as load_model
    from pj_core.engine import PersonaJudge as PersonaJudge
    from pj_core.personas import CATALOG as CATALOG
    from pj_core.personas import GenerationDefaults as GenerationDefaults
    from pj_core.personas import Persona as Persona
    from pj_core.personas import PersonaProfile as PersonaProfile
    from pj_core.personas import Preference as Preference
    from pj_core.personas import compose as compose
    from pj_core.personas import resolve_personas as resolve_personas
    from pj_core.personas.store import AbstractProfileStore as AbstractProfileStore
    from pj_core.personas.store import PostgresProfileStore as PostgresProfileStore
    from pj_core.personas.store import ProfileStore as ProfileStore
    from pj_core.personas.store import load_profile as load_profile
    from pj_core.personas.store import open_store as open_store
    from pj_core.results import GenerationResult as GenerationResult
    from pj_core.results import GenerationStats as GenerationStats
    from pj_core.results import StreamEvent as StreamEvent
    from pj_core.results import TokenTrace as TokenTrace


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pj_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
