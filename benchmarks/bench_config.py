"""What one benchmark run measures.

A run is a grid of *cells*: one method at one lookahead λ and one token budget. Plain
``generate`` and lockstep do not depend on λ (lockstep emits one token per forward whatever
λ is), so they get one cell per budget, labelled with λ = None.

Example:
    >>> config = BenchConfig.preset("quick")
    >>> [cell.label for cell in config.cells("speculative")]
    ['speculative λ=4 n=16']
    >>> [cell.label for cell in BenchConfig.preset("targets").cells("plain")]
    ['plain n=128', 'plain n=256']
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from pj_core.errors import InvalidGenerationConfigError
from pj_core.settings import DEFAULTS

METHODS: tuple[str, ...] = (
    "plain",
    "reference",
    "authors",
    "speculative",
    "lockstep",
    "auto",
    "defaults",
    "constrained",
)
# The no-cache baselines: O(n²) work, so they get fewer samples.
REFERENCE_METHODS: frozenset[str] = frozenset({"reference", "authors"})
METHOD_TITLES: dict[str, str] = {
    "plain": "plain generate (1 prompt)",
    "reference": "reference loop (no cache, 2 weight copies)",
    "authors": "authors' loop (reference + logits at every position)",
    "speculative": "engine: speculative",
    "lockstep": "engine: lockstep",
    "auto": "engine: auto",
    "defaults": "engine: shipped defaults (strength, decoder, strategy)",
    "constrained": "engine: shipped defaults + a tool-call JSON schema",
}
# λ does not change how these methods compute.
LOOKAHEAD_FREE: frozenset[str] = frozenset({"plain", "lockstep"})
PresetName = Literal["quick", "targets", "full"]

DEFAULT_PERSONAS: tuple[str, str] = (
    "Answer with playful humour.",
    "Answer concisely and to the point.",
)


@dataclass(frozen=True)
class Cell:
    """One method at one lookahead and one budget."""

    method: str
    lookahead: int | None
    max_new_tokens: int

    @property
    def label(self) -> str:
        """A short, unique, human-readable name."""
        lam = "" if self.lookahead is None else f" λ={self.lookahead}"
        return f"{self.method}{lam} n={self.max_new_tokens}"


@dataclass(frozen=True)
class BenchConfig:
    """Every setting of one benchmark run.

    Attributes:
        model: model spec for :func:`pj_core.backends.hf.models.load_model`.
        device, dtype: None chooses them as the library does.
        methods: which of :data:`METHODS` to run.
        lookaheads: λ values of the λ-dependent methods.
        token_budgets: ``max_new_tokens`` values; every generation runs to the full budget
            (EOS is ignored) so that methods are compared on equal work.
        prompts, repeats: Koala prompts per cell and timed repeats per prompt.
        reference_prompts, reference_repeats: the same for the reference loop, whose full
            recomputation costs O(n²); fewer samples keep the run affordable.
        personas: the two persona texts; plain ``generate`` gets both in one system message
            (direct prompting).
        warmup_tokens: tokens of the untimed warm-up generation of every worker.
        threads: torch CPU threads of every worker (None: torch's default, one per core).
            On a machine that other jobs keep busy, 1 avoids threads spinning against each
            other; the report records the value.
        pack_cpu_weights: load the model with oneDNN-packed linear layers on CPU (the
            library's default, :mod:`pj_core.backends.hf.cpu_linear`); False measures PyTorch's
            default kernels. Every method uses the same setting.
    """

    model: str = "smollm2-135m-instruct"
    device: str | None = None
    dtype: str | None = None
    methods: tuple[str, ...] = METHODS
    lookaheads: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    token_budgets: tuple[int, ...] = (64, 256)
    prompts: int = 3
    repeats: int = 3
    reference_prompts: int = 1
    reference_repeats: int = 1
    temperature: float = DEFAULTS.temperature
    top_k: int = DEFAULTS.top_k
    top_p: float = DEFAULTS.top_p
    seed: int = 0
    personas: tuple[str, ...] = DEFAULT_PERSONAS
    warmup_tokens: int = 8
    threads: int | None = None
    pack_cpu_weights: bool = True
    preset_name: str = "full"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise InvalidGenerationConfigError(
                f"unknown benchmark method(s) {unknown}; choose from {', '.join(METHODS)}"
            )
        if not self.methods:
            raise InvalidGenerationConfigError("choose at least one benchmark method")
        if not self.lookaheads or min(self.lookaheads) < 1:
            raise InvalidGenerationConfigError("lookaheads must be integers >= 1, e.g. 1 2 3 4")
        if not self.token_budgets or min(self.token_budgets) < 1:
            raise InvalidGenerationConfigError("token budgets must be integers >= 1, e.g. 64 256")
        if self.threads is not None and self.threads < 1:
            raise InvalidGenerationConfigError("threads must be >= 1 (or None for the default)")
        for name in ("prompts", "repeats", "reference_prompts", "reference_repeats"):
            if getattr(self, name) < 1:
                raise InvalidGenerationConfigError(f"{name} must be >= 1")
        if len(self.personas) < 2:
            raise InvalidGenerationConfigError("the benchmark needs two or more personas")

    @classmethod
    def preset(cls, name: PresetName, **overrides: Any) -> BenchConfig:
        """A named configuration: ``quick`` (smoke run), ``targets`` (λ=4, 128 and 256
        tokens: what the issue's targets are judged on) or ``full`` (λ 1..6 × 64, 256)."""
        if name == "quick":
            base = cls(
                lookaheads=(4,),
                token_budgets=(16,),
                prompts=1,
                repeats=1,
                warmup_tokens=4,
                preset_name="quick",
            )
        elif name == "targets":
            base = cls(
                lookaheads=(4,),
                token_budgets=(128, 256),
                prompts=3,
                repeats=3,
                preset_name="targets",
            )
        elif name == "full":
            base = cls(preset_name="full")
        else:
            raise InvalidGenerationConfigError(
                f"unknown preset {name!r}; choose quick, targets or full"
            )
        return replace(base, **overrides)

    def cells(self, method: str) -> list[Cell]:
        """The cells of one method, smallest budget first (so that memory a finished
        cell leaves to the allocator never inflates the peak of a smaller one)."""
        lookaheads: tuple[int | None, ...] = (
            (None,) if method in LOOKAHEAD_FREE else tuple(sorted(self.lookaheads))
        )
        return [Cell(method, lam, n) for n in sorted(self.token_budgets) for lam in lookaheads]

    def prompt_count(self, method: str) -> int:
        """Prompts per cell for ``method``."""
        if method in REFERENCE_METHODS:
            return min(self.prompts, self.reference_prompts)
        return self.prompts

    def repeat_count(self, method: str) -> int:
        """Timed repeats for ``method``."""
        if method in REFERENCE_METHODS:
            return min(self.repeats, self.reference_repeats)
        return self.repeats

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every setting."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchConfig:
        """The inverse of :meth:`to_json`."""
        tuples = ("methods", "lookaheads", "token_budgets", "personas")
        values: dict[str, Any] = {k: tuple(v) if k in tuples else v for k, v in data.items()}
        return cls(**values)
