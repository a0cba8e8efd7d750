"""The generation methods the evaluation compares, all on the same model and sampling settings.

For a preference set such as ``humor, harmless, vivid``:

- ``direct``: all preferences in one system prompt (the paper's baseline): the first
  phrasing of each catalog preference, joined; ordinary sampling.
- ``persona-judge``: the personas of :func:`pj_core.personas.compose` (``k`` prefixes), roles
  alternating every round.
- ``persona-judge-base``: the same personas with fixed roles (``alternate=False``).
- ``single:<dimension>``: only that preference's first phrasing; ordinary sampling.

Ordinary sampling runs through the same engine with two identical persona prefixes: the
judge then accepts every draft token, so the output follows that one system message exactly,
and every method shares one sampling implementation (temperature, top-k, top-p, stop/EOS).

Example:
    >>> plan = plan_methods(["humor", "vivid"])
    >>> [m.name for m in plan]
    ['direct', 'persona-judge', 'persona-judge-base', 'single:humor', 'single:vivid']
    >>> plan[0].personas[0].text == plan[0].personas[1].text
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pj_core.errors import EvaluationError
from pj_core.personas import Persona, Preference, compose, get_preference

DIRECT = "direct"
PERSONA_JUDGE = "persona-judge"
PERSONA_JUDGE_BASE = "persona-judge-base"
SINGLE_PREFIX = "single:"
BASE_METHODS: tuple[str, ...] = (DIRECT, PERSONA_JUDGE, PERSONA_JUDGE_BASE)


@dataclass(frozen=True)
class Method:
    """One way of answering: the persona prefixes given to the engine and the role schedule."""

    name: str
    personas: tuple[Persona, ...]
    alternate: bool


def resolve_dimensions(names: Sequence[str]) -> list[Preference]:
    """Catalog preferences for dimension names (aliases allowed), de-duplicated, in order.

    Raises:
        EvaluationError: no dimension given.
        UnknownPreferenceError: a name that is not in the catalog (with a suggestion).

    Example:
        >>> [p.name for p in resolve_dimensions(["funny", "vivid"])]
        ['humor', 'vivid']
    """
    preferences: list[Preference] = []
    for name in names:
        preference = get_preference(name)
        if preference not in preferences:
            preferences.append(preference)
    if not preferences:
        raise EvaluationError("give at least one dimension, e.g. --dimensions humor,harmless")
    return preferences


def direct_prompt(preferences: Sequence[Preference]) -> str:
    """The baseline's single system prompt: every preference's first phrasing, joined.

    Example:
        >>> humor = resolve_dimensions(["humor"])
        >>> direct_prompt(humor) == humor[0].phrasings[0]
        True
    """
    return " ".join(preference.phrasings[0] for preference in preferences)


def _ordinary(name: str, text: str) -> Method:
    persona = Persona(text=text, name=name)
    return Method(name=name, personas=(persona, persona), alternate=True)


def plan_methods(
    dimensions: Sequence[str],
    *,
    methods: Sequence[str] | None = None,
    k: int = 2,
    one_per_preference: bool = False,
) -> list[Method]:
    """The methods to run for a preference set.

    Args:
        dimensions: catalog preference names.
        methods: which to run, from ``direct``, ``persona-judge``, ``persona-judge-base``,
            ``single`` (one per dimension) or ``single:<dimension>``; ``None`` runs all.
            ``direct`` is always included: it is the baseline of every comparison.
        k: persona prefixes for the Persona-judge methods (see :func:`compose`).
        one_per_preference: give each preference its own prefix (see :func:`compose`).

    Raises:
        EvaluationError: an unknown method name.

    Example:
        >>> [m.name for m in plan_methods(["humor", "vivid"], methods=["persona-judge"])]
        ['direct', 'persona-judge']
    """
    preferences = resolve_dimensions(dimensions)
    names = [p.name for p in preferences]
    wanted = list(methods) if methods is not None else [*BASE_METHODS, "single"]
    expanded: list[str] = [DIRECT]
    for item in wanted:
        if item == "single":
            candidates = [SINGLE_PREFIX + n for n in names]
        elif item.startswith(SINGLE_PREFIX):
            candidates = [SINGLE_PREFIX + get_preference(item[len(SINGLE_PREFIX) :]).name]
            if candidates[0][len(SINGLE_PREFIX) :] not in names:
                raise EvaluationError(
                    f"method {item!r} names a dimension outside the evaluated ones ({names})"
                )
        elif item in BASE_METHODS:
            candidates = [item]
        else:
            raise EvaluationError(
                f"unknown method {item!r}: use direct, persona-judge, persona-judge-base, "
                "single or single:<dimension>"
            )
        expanded.extend(c for c in candidates if c not in expanded)

    judged = compose(preferences, k=k, one_per_preference=one_per_preference)
    plan: list[Method] = []
    for name in expanded:
        if name == DIRECT:
            plan.append(_ordinary(DIRECT, direct_prompt(preferences)))
        elif name in (PERSONA_JUDGE, PERSONA_JUDGE_BASE):
            plan.append(Method(name, tuple(judged), alternate=name == PERSONA_JUDGE))
        else:
            preference = get_preference(name[len(SINGLE_PREFIX) :])
            plan.append(_ordinary(name, preference.phrasings[0]))
    return plan
