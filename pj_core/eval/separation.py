"""Separation report: does a method make answers follow the user's preferences, and how far?

Two *opposite* preference sets (by default the P-Soups sets, A = concise + elementary +
friendly and B = informative + expert + unfriendly) answer the same prompts with the same seed.
On every axis where the two sets hold opposite poles with an objective proxy
(:mod:`pj_core.eval.objective`), the report gives the mean over prompts of

    separation = proxy of B's pole (answer for B) - proxy of B's pole (answer for A)

so a positive number means the answers moved the way the preferences ask (words B - A for
concise vs informative, grade B - A for elementary vs expert, sentiment A - B for friendly vs
unfriendly), in the proxy's own unit, with a 95% percentile-bootstrap interval over prompts.
Beside it, per method, the fluency guard (repeated word 3-grams, perplexity with no persona):
a method that separates by breaking the text shows there.

Methods (all on the same engine, model, seeds and sampling settings):

- ``direct``: all of a set's preferences in one system prompt, ordinary sampling;
- ``pj:round-robin``: Persona-judge over ``compose(set, k=2)`` (preferences dealt over two
  prefixes);
- ``pj:one-per-preference``: Persona-judge with one prefix per preference;
- ``pj:full``: Persona-judge over two prefixes that each carry the whole set, in different
  orders and phrasings (``compose(set, mode="full")``);
- ``default``: exactly what a user writes, ``generate(prompt, personas=[catalog names])``,
  with the engine's defaults (today the pool decoder at strength 0.5; before those defaults,
  Persona-judge at strength 0, i.e. ``pj:one-per-preference``).

``pool`` and ``pool:<mode>`` decode the same personas as ``default`` and ``pj:<mode>`` with the
pool decoder instead (every token from the log-linear pool of all personas,
:mod:`pj_core.decoding.pool`).

Any method may carry a persona strength, ``<method>@<γ>`` (e.g. ``pool@1.5``, ``direct@1``):
the same method decoded with ``strength=γ`` (:mod:`pj_core.decoding.guidance`); ``direct@γ`` is
direct prompting with classifier-free guidance against the neutral row. Every method but ``default``
pins its decoder and (without ``@``) strength 0, so its rows do not move with the defaults.

Example (a fake generator whose B answers are longer):
    >>> def generate(prompt, method, personas, seed):
    ...     return "one two three four" if "informative" in str(personas) else "one"
    >>> config = SeparationConfig(limit=2, methods=("default",), bootstrap=50)
    >>> summary = run_separation(config, generate=generate, progress=False)
    >>> summary["separation"]["default"]["words"]["mean"]
    3.0
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pj_core.errors import EvaluationError
from pj_core.eval.config import prompt_seed
from pj_core.eval.data import load_prompts
from pj_core.eval.methods import direct_prompt, resolve_dimensions
from pj_core.eval.objective import PROXIES, Fluency, repeated_trigram_share
from pj_core.eval.report import fluency_means, pyplot
from pj_core.eval.stats import mean_ci
from pj_core.personas import COMPOSITION_MODES, Persona, compose, get_preference
from pj_core.settings import DEFAULTS

P_SOUPS_A: tuple[str, ...] = ("concise", "elementary", "friendly")
P_SOUPS_B: tuple[str, ...] = ("informative", "expert", "unfriendly")
SEPARATION_METHODS: tuple[str, ...] = (
    "direct",
    "pj:round-robin",
    "pj:one-per-preference",
    "pj:full",
    "default",
)
POOL_METHODS: tuple[str, ...] = (
    "pool",
    "pool:round-robin",
    "pool:one-per-preference",
    "pool:full",
)
"""The pool decoder (:mod:`pj_core.decoding.pool`) over what ``default`` / ``pj:<mode>`` hand the
engine; opt-in (``--methods``), not in the default list."""
SEPARATION_MAX_NEW_TOKENS = 96
"""Answers need room to differ in length; 96 tokens keeps 12 prompts x 5 methods x 2 sets
under 40 minutes on a 2-core CPU with SmolLM2."""

PersonasArg = Any
"""What the generator is given as ``personas``: a list of Persona, or of catalog names."""


@dataclass(frozen=True)
class Generated:
    """One answer and the tokens it took (what :func:`engine_generate_fn` returns).

    A generator may return plain text instead; the cost table then has no token counts.
    """

    text: str
    tokens: int


GenerateFn = Callable[[str, str, PersonasArg, int], "str | Generated"]
"""``(prompt, method, personas, seed) -> answer`` (text, or :class:`Generated`)."""
FluencyFn = Callable[[str, str], Fluency]
"""``(prompt, answer) -> Fluency`` (e.g. :meth:`FluencyScorer.score`)."""


@dataclass(frozen=True)
class Axis:
    """One axis the two sets disagree on, with its objective proxy.

    ``separation = sign * (measure(answer for B) - measure(answer for A))``: positive when the
    answers moved towards each set's own pole.
    """

    name: str  # the proxy's unit: "words", "grade", "sentiment"
    pole_a: str
    pole_b: str
    sign: float

    @property
    def label(self) -> str:
        """E.g. ``"words B - A (concise vs informative)"``."""
        order = "B - A" if self.sign > 0 else "A - B"
        return f"{self.name} {order} ({self.pole_a} vs {self.pole_b})"

    def measure(self, text: str) -> float:
        """The unsigned proxy of ``text``."""
        return PROXIES[self.pole_b].measure(text)


def axes_for(set_a: Sequence[str], set_b: Sequence[str]) -> list[Axis]:
    """The axes on which ``set_a`` and ``set_b`` hold opposite poles that have a proxy.

    Raises:
        EvaluationError: no such axis (the report would have nothing to measure).

    Example:
        >>> [a.label for a in axes_for(["concise", "friendly"], ["informative", "unfriendly"])]
        ['words B - A (concise vs informative)', 'sentiment A - B (friendly vs unfriendly)']
    """
    names_a = [p.name for p in resolve_dimensions(set_a)]
    axes = []
    for b in (p.name for p in resolve_dimensions(set_b)):
        opposite = get_preference(b).opposite
        if opposite in names_a and b in PROXIES:
            axes.append(Axis(PROXIES[b].unit, opposite, b, PROXIES[b].sign))
    if not axes:
        raise EvaluationError(
            f"the sets {list(set_a)} and {list(set_b)} share no axis with an objective proxy; "
            "put opposite poles in them, e.g. concise vs informative, elementary vs expert, "
            "friendly vs unfriendly"
        )
    return axes


@dataclass(frozen=True)
class MethodSpec:
    """A method name parsed: its base method and the persona strength given after ``@``.

    ``default`` is what a user gets: the engine's own defaults (decoder and strength) unless
    ``@γ`` sets the strength. Every other method pins its decoder ("pool" for the pool
    methods, else Persona-judge) and strength 0 unless ``@γ`` says otherwise, so its results
    do not move when the shipped defaults do.

    Example:
        >>> spec = parse_method("default@1.5")
        >>> spec.engine_settings()
        {'strength': 1.5}
        >>> parse_method("pj:full").engine_settings()
        {'strength': 0.0, 'decoder': 'persona-judge'}
    """

    base: str
    strength: float | None = None

    @property
    def decoder(self) -> str | None:
        """The engine's decoder for this method (None: the engine's default)."""
        if self.base == "default":
            return None
        return "pool" if self.base.split(":")[0] == "pool" else "persona-judge"

    def engine_settings(self) -> dict[str, Any]:
        """The ``strength`` and ``decoder`` keyword arguments this method decodes with."""
        settings: dict[str, Any] = {}
        if self.strength is not None or self.base != "default":
            settings["strength"] = 0.0 if self.strength is None else self.strength
        if self.decoder is not None:
            settings["decoder"] = self.decoder
        return settings


def parse_method(method: str) -> MethodSpec:
    """``"<base>"`` or ``"<base>@<strength>"``, checked.

    Raises:
        EvaluationError: an unknown base method, or a strength that is not a number >= 0.
    """
    base, at, strength_text = str(method).partition("@")
    if base not in SEPARATION_METHODS + POOL_METHODS:
        raise EvaluationError(
            f"unknown method {method!r}: choose from "
            f"{', '.join(SEPARATION_METHODS + POOL_METHODS)}, optionally with a strength, "
            "e.g. default@1.5"
        )
    if not at:
        return MethodSpec(base)
    try:
        strength = float(strength_text)
    except ValueError:
        strength = math.nan
    if not math.isfinite(strength) or strength < 0:
        raise EvaluationError(
            f"method {method!r}: the strength after '@' must be a number >= 0, e.g. default@1.5"
        )
    return MethodSpec(base, strength)


def method_personas(method: str, preferences: Sequence[str]) -> tuple[PersonasArg, bool]:
    """What ``method`` hands the engine for one preference set, and whether roles alternate.

    Example:
        >>> personas, _ = method_personas("pj:round-robin", ["concise", "expert", "friendly"])
        >>> [p.name for p in personas]
        ['concise+friendly', 'expert']
        >>> method_personas("default@2", ["concise", "expert"])[0]
        ['concise', 'expert']
    """
    method = parse_method(method).base
    if method.startswith("pool"):  # the same personas, decoded by the pool
        method = "default" if method == "pool" else "pj" + method[4:]
    if method == "direct":
        text = direct_prompt(resolve_dimensions(preferences))
        persona = Persona(text=text, name="direct")
        return [persona, persona], True
    if method.startswith("pj:") and method[3:] in COMPOSITION_MODES:
        return compose(list(preferences), k=2, mode=method[3:]), True
    if method == "default":
        return list(preferences), True
    raise EvaluationError(f"unknown method {method!r}: choose from {', '.join(SEPARATION_METHODS)}")


@dataclass(frozen=True)
class SeparationConfig:
    """Everything that decides a separation report (same config, same table).

    Attributes:
        set_a, set_b: the two opposite preference sets (catalog names).
        methods: from :data:`SEPARATION_METHODS`, each optionally ``@<strength>``.
        prompts, limit, max_prompt_chars: which prompts (as ``pj eval``).
        generator: model spec of the generator (and of the fluency guard's perplexity).
        max_new_tokens: answer budget.
        lookahead, temperature, top_k, top_p: sampling, shared by every method.
        seed: base seed; each prompt's seed derives from it and the prompt id, and both sets
            and every method use that seed.
        bootstrap: bootstrap resamples for the intervals.
    """

    set_a: tuple[str, ...] = P_SOUPS_A
    set_b: tuple[str, ...] = P_SOUPS_B
    methods: tuple[str, ...] = SEPARATION_METHODS
    prompts: str = "sample"
    limit: int | None = 12
    max_prompt_chars: int | None = None
    generator: str = "smollm2-135m-instruct"
    max_new_tokens: int = SEPARATION_MAX_NEW_TOKENS
    lookahead: int = DEFAULTS.lookahead
    temperature: float = DEFAULTS.temperature
    top_k: int = DEFAULTS.top_k
    top_p: float = DEFAULTS.top_p
    seed: int = 0
    bootstrap: int = 2000

    def __post_init__(self) -> None:
        if not self.methods:
            raise EvaluationError(
                f"methods must be some of {', '.join(SEPARATION_METHODS)}; got none"
            )
        for method in self.methods:
            parse_method(method)
        axes_for(self.set_a, self.set_b)  # fails early, with advice, when there is no axis

    def prompt_seed(self, prompt_id: str) -> int:
        """The seed of every answer to one prompt (as ``pj eval``'s)."""
        return prompt_seed(self.seed, prompt_id)


def run_separation(
    config: SeparationConfig,
    *,
    generate: GenerateFn,
    fluency: FluencyFn | None = None,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Generate both sets' answers for every method and prompt, and summarise them.

    Args:
        config: the run's settings.
        generate: the generator (see :func:`engine_generate_fn`).
        fluency: the fluency guard; ``None`` records only the repeated 3-gram share.
        progress: show a tqdm bar.
        clock: seconds, read before and after each answer for the cost table.

    Returns:
        The summary: settings, axes, per method and axis the separation with its interval,
        per method the fluency guard, and every answer.
    """
    prompts = load_prompts(config.prompts, limit=config.limit, max_chars=config.max_prompt_chars)
    axes = axes_for(config.set_a, config.set_b)
    answers: list[dict[str, Any]] = []
    total = len(prompts) * len(config.methods) * 2
    with tqdm(total=total, disable=not progress, desc="separation", unit="answer") as bar:
        for prompt in prompts:
            seed = config.prompt_seed(prompt.id)
            for method in config.methods:
                for set_name, preferences in (("A", config.set_a), ("B", config.set_b)):
                    personas, _ = method_personas(method, preferences)
                    bar.set_postfix_str(f"{prompt.id} {method} {set_name}")
                    started = clock()
                    out = generate(prompt.prompt, method, personas, seed)
                    seconds = clock() - started
                    text = out.text if isinstance(out, Generated) else out
                    tokens = out.tokens if isinstance(out, Generated) else None
                    guard = (
                        fluency(prompt.prompt, text)
                        if fluency is not None
                        else Fluency(repeated_trigram_share(text), None, 0)
                    )
                    answers.append(
                        {
                            "prompt_id": prompt.id,
                            "method": method,
                            "set": set_name,
                            "seed": seed,
                            "text": text,
                            "measures": {axis.name: axis.measure(text) for axis in axes},
                            "fluency": asdict(guard),
                            "cost": {"seconds": seconds, "tokens": tokens},
                        }
                    )
                    bar.update(1)
    return summarise(config, axes, answers)


def summarise(
    config: SeparationConfig, axes: Sequence[Axis], answers: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The report's numbers from the answers (see :func:`run_separation`)."""
    by_key = {(a["prompt_id"], a["method"], a["set"]): a for a in answers}
    prompt_ids = list(dict.fromkeys(a["prompt_id"] for a in answers))
    separation: dict[str, dict[str, Any]] = {}
    fluency: dict[str, dict[str, Any]] = {}
    for method in config.methods:
        separation[method] = {}
        for axis in axes:
            diffs = [
                axis.sign
                * (
                    by_key[(p, method, "B")]["measures"][axis.name]
                    - by_key[(p, method, "A")]["measures"][axis.name]
                )
                for p in prompt_ids
            ]
            ci = mean_ci(diffs, n_resamples=config.bootstrap, seed=config.seed)
            separation[method][axis.name] = {**asdict(ci), "label": axis.label}
        fluency[method] = fluency_means([a["fluency"] for a in answers if a["method"] == method])
    return {
        "settings": asdict(config),
        "prompts": len(prompt_ids),
        "axes": [{"name": a.name, "label": a.label} for a in axes],
        "separation": separation,
        "fluency": fluency,
        "definition": "per prompt, proxy of B's pole for B's answer minus for A's answer (same "
        "seed); mean over prompts, 95% percentile bootstrap over prompts, "
        f"B={config.bootstrap}, seed={config.seed}",
        "cost": cost_per_method(config.methods, answers),
        "answers": list(answers),
    }


def cost_per_method(
    methods: Sequence[str], answers: Sequence[dict[str, Any]]
) -> dict[str, dict[str, float | None]]:
    """Per method: mean wall seconds and tokens per answer, tokens/s, and time per token
    relative to ``direct`` (1.0 = as fast as one system prompt; None without ``direct`` or
    without token counts). Wall time varies between runs; the separation table does not.

    Example:
        >>> answers = [
        ...     {"method": "direct", "cost": {"seconds": 1.0, "tokens": 10}},
        ...     {"method": "default", "cost": {"seconds": 3.0, "tokens": 20}},
        ... ]
        >>> cost_per_method(["direct", "default"], answers)["default"]["time_per_token_vs_direct"]
        1.5
    """
    cost: dict[str, dict[str, float | None]] = {}
    for method in methods:
        rows = [a["cost"] for a in answers if a["method"] == method and "cost" in a]
        if not rows:
            continue
        seconds = sum(r["seconds"] for r in rows)
        counted = all(r["tokens"] is not None for r in rows)
        tokens = sum(r["tokens"] for r in rows) if counted else None
        cost[method] = {
            "mean_seconds": seconds / len(rows),
            "mean_tokens": None if tokens is None else tokens / len(rows),
            "tokens_per_second": None if not tokens or seconds <= 0 else tokens / seconds,
        }
    base = cost.get("direct", {}).get("tokens_per_second")
    for row in cost.values():
        rate = row["tokens_per_second"]
        row["time_per_token_vs_direct"] = None if not base or not rate else base / rate
    return cost


def cost_table(summary: dict[str, Any]) -> str:
    """One row per method: seconds and tokens per answer, tokens/s, time per token vs direct."""

    def cell(value: float | None, spec: str, unit: str = "") -> str:
        return "-" if value is None else format(value, spec) + unit

    lines = [
        "| method | seconds per answer | tokens per answer | tokens/s | time per token vs direct |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, row in summary.get("cost", {}).items():
        cells = [
            cell(row["mean_seconds"], ".2f"),
            cell(row["mean_tokens"], ".1f"),
            cell(row["tokens_per_second"], ".1f"),
            cell(row["time_per_token_vs_direct"], ".2f", "x"),
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(summary: dict[str, Any]) -> str:
    """One row per method: each axis's separation [95% CI], then the fluency guard."""
    axes = summary["axes"]
    header = (
        "| method | " + " | ".join(a["label"] for a in axes) + " | repeated 3-grams | perplexity |"
    )
    lines = [header, "|" + " --- |" * (len(axes) + 3)]
    for method, by_axis in summary["separation"].items():
        cells = [
            f"{by_axis[a['name']]['mean']:+.2f} [{by_axis[a['name']]['low']:+.2f}, "
            f"{by_axis[a['name']]['high']:+.2f}]"
            for a in axes
        ]
        guard = summary["fluency"][method]
        ppl = guard["mean_perplexity"]
        cells.append(f"{guard['mean_repeated_trigrams']:.3f}")
        cells.append("-" if ppl is None else f"{ppl:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_chart(summary: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """One panel per axis: a bar per method with its 95% interval; 0 is no separation."""
    plt = pyplot()

    axes = summary["axes"]
    methods = list(summary["separation"])
    fig, panels = plt.subplots(1, len(axes), figsize=(4.2 * len(axes), 3.6), squeeze=False)
    for panel, axis in zip(panels[0], axes, strict=True):
        rows = [summary["separation"][m][axis["name"]] for m in methods]
        heights = [r["mean"] for r in rows]
        errors = [[r["mean"] - r["low"] for r in rows], [r["high"] - r["mean"] for r in rows]]
        panel.bar(range(len(methods)), heights, yerr=errors, capsize=4, color="tab:blue")
        panel.axhline(0.0, color="grey", linewidth=1)
        panel.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        panel.set_title(axis["label"], fontsize=9)
    settings = summary["settings"]
    fig.suptitle(
        f"{settings.get('generator', '?')}, {summary['prompts']} prompts, "
        f"{settings.get('max_new_tokens', '?')} tokens; bars: 95% bootstrap CI",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(summary: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``summary.json``, ``answers.json``, ``separation.md``, ``separation.png`` and
    ``cost.md`` (wall time: the one file that differs between reruns)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    numbers = {k: v for k, v in summary.items() if k != "answers"}
    (out / "summary.json").write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    (out / "answers.json").write_text(
        json.dumps(summary["answers"], indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "separation.md").write_text(markdown_table(summary), encoding="utf-8")
    draw_chart(summary, out / "separation.png")
    (out / "cost.md").write_text(cost_table(summary), encoding="utf-8")
    return out


def engine_generate_fn(engine: Any, config: SeparationConfig) -> GenerateFn:
    """Answer with a :class:`pj_core.engine.PersonaJudge` and the config's sampling."""

    def generate(prompt: str, method: str, personas: PersonasArg, seed: int) -> Generated:
        result = engine.generate(
            prompt,
            personas,
            **parse_method(method).engine_settings(),
            lookahead=config.lookahead,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            seed=seed,
        )
        return Generated(str(result.text), len(result.token_ids))

    return generate
