"""One timed generation of each benchmarked method, measured the same way for all.

Every method is timed from the call to its return (``seconds``, prefill included), its time
to first token is taken when the first new token is known, and its model forwards are
counted by a forward hook on the model object(s), so "forward passes per token" means the
same thing for ``model.generate``, the reference loop and the engine.

Example:
    >>> from tests._tiny import make_tiny_model
    >>> model = make_tiny_model(vocab_size=22)
    >>> with ForwardCounter([model]) as counter:
    ...     _ = model(input_ids=__import__("torch").tensor([[5, 6]]))
    >>> counter.count
    1
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from benchmarks.bench_config import BenchConfig, Cell
from benchmarks.reference_loop import reference_generate
from pj_core.decoding.constraints import ConstraintMask
from pj_core.decoding.logits import Position
from pj_core.errors import ModelLoadError


@dataclass(frozen=True)
class Sample:
    """The measurements of one generation.

    Attributes:
        tokens: new tokens generated.
        seconds: wall time of the whole call (prefill included).
        first_token_seconds: wall time until the first new token was known.
        forward_passes: model forward calls (prefill included).
        drafted, accepted: draft tokens tested and accepted (None for plain ``generate``).
        strategy: the engine strategy that ran (``auto`` resolves to one), else None.
        token_ids: the generated tokens (to check that methods agree for the same seed).
        constraint_seconds: for method ``constrained``, the time spent in the constraint's
            mask (computing it, applying it, moving the matcher); else None.
    """

    tokens: int
    seconds: float
    first_token_seconds: float
    forward_passes: int
    drafted: int | None
    accepted: int | None
    strategy: str | None
    token_ids: list[int]
    constraint_seconds: float | None = None

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of the whole call."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class ForwardCounter:
    """Counts forward calls of one or more models, and the wall time spent inside them
    (``seconds``), while the ``with`` block runs. The models' forwards never nest (none
    calls another), so one start time serves them all."""

    def __init__(self, models: Sequence[torch.nn.Module]) -> None:
        self.models = list(models)
        self.count = 0
        self.seconds = 0.0
        self._started = 0.0
        self._handles: list[Any] = []

    def _pre(self, *_: object) -> None:
        self._started = time.perf_counter()

    def _post(self, *_: object) -> None:
        self.seconds += time.perf_counter() - self._started
        self.count += 1

    def __enter__(self) -> ForwardCounter:
        self.count, self.seconds = 0, 0.0
        self._handles = [m.register_forward_pre_hook(self._pre) for m in self.models]
        self._handles += [m.register_forward_hook(self._post) for m in self.models]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _FirstTokenClock(BaseStreamer):
    """A ``generate`` streamer that notes when the first new token arrives.

    ``generate`` first puts the prompt, then every new token."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.puts = 0
        self.first_token_seconds = 0.0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_seconds = time.perf_counter() - self.started

    def end(self) -> None:
        """Nothing to flush."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_plain(
    model: PreTrainedModel, prompt_ids: Sequence[int], cell: Cell, config: BenchConfig, seed: int
) -> Sample:
    """Plain ``model.generate`` on one prompt (direct prompting): the floor.

    ``min_new_tokens`` keeps EOS from ending it early, so it does the full budget of work.
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    torch.manual_seed(seed)
    with ForwardCounter([model]) as counter, torch.inference_mode():
        _sync(device)
        started = time.perf_counter()
        clock = _FirstTokenClock(started)
        output = model.generate(  # type: ignore[operator]  # generate is a method, not a Tensor
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=config.temperature > 0,
            temperature=config.temperature if config.temperature > 0 else None,
            top_k=config.top_k,
            top_p=config.top_p,
            max_new_tokens=cell.max_new_tokens,
            min_new_tokens=cell.max_new_tokens,
            streamer=clock,
            pad_token_id=0,
        )
        _sync(device)
        seconds = time.perf_counter() - started
    new_ids = output[0, input_ids.shape[1] :].tolist()
    return Sample(
        tokens=len(new_ids),
        seconds=seconds,
        first_token_seconds=clock.first_token_seconds,
        forward_passes=counter.count,
        drafted=None,
        accepted=None,
        strategy=None,
        token_ids=new_ids,
    )


def run_reference(
    models: Sequence[PreTrainedModel],
    persona_prompt_ids: Sequence[Sequence[int]],
    cell: Cell,
    config: BenchConfig,
    seed: int,
) -> Sample:
    """The authors' cost profile: see :mod:`benchmarks.reference_loop`. Method ``authors``
    also computes the logits of every position, as the authors' forwards do."""
    assert cell.lookahead is not None, "the reference loop needs a lookahead"
    device = next(models[0].parameters()).device
    generator = torch.Generator().manual_seed(seed)
    with ForwardCounter(models) as counter:
        _sync(device)
        started = time.perf_counter()
        run = reference_generate(
            models,
            persona_prompt_ids,
            lookahead=cell.lookahead,
            max_new_tokens=cell.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            generator=generator,
            full_logits=cell.method == "authors",
        )
        _sync(device)
        seconds = time.perf_counter() - started
    return Sample(
        tokens=len(run.token_ids),
        seconds=seconds,
        first_token_seconds=run.first_token_seconds,
        forward_passes=counter.count,
        drafted=run.drafted,
        accepted=run.accepted,
        strategy=None,
        token_ids=run.token_ids,
    )


TOOL_CALLS_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 20,
    "items": {
        "type": "object",
        "properties": {
            "name": {"enum": ["web_search", "get_weather", "calculator", "send_email"]},
            "arguments": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "limit": {"type": "integer"},
                    "urgent": {"type": "boolean"},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    },
}
"""The constraint of method ``constrained``: a list of tool calls, an agent's output shape.
At least 20 calls, so no answer can finish before the budget: every method does the same
amount of work."""


class TimedConstraintMask(ConstraintMask):
    """:class:`~pj_core.decoding.constraints.ConstraintMask` that adds the time it spends
    (mask, matcher moves) to ``seconds``."""

    def __init__(self, matcher: Any, seconds: list[float]) -> None:
        super().__init__(matcher)
        self.seconds = seconds

    def __call__(self, logits: torch.Tensor, position: Position) -> torch.Tensor:
        started = time.perf_counter()
        try:
            return super().__call__(logits, position)
        finally:
            self.seconds[0] += time.perf_counter() - started

    def rollback(self, count: int) -> None:
        started = time.perf_counter()
        try:
            super().rollback(count)
        finally:
            self.seconds[0] += time.perf_counter() - started


def run_engine(
    engine: Any, conversation: str, cell: Cell, config: BenchConfig, seed: int
) -> Sample:
    """One ``PersonaJudge.stream`` call with ``strategy=cell.method``, at strength 0 with the
    Persona-judge decoder (the paper exactly); method ``defaults`` instead leaves strategy,
    strength and decoder to :data:`pj_core.settings.DEFAULTS`, i.e. what a user gets, and
    ``constrained`` is ``defaults`` with :data:`TOOL_CALLS_SCHEMA` as the response format
    (its mask timed: ``Sample.constraint_seconds``).

    The engine must have no EOS ids (``eos_token_ids=()``) so that, like the other methods, it
    runs to the full budget. On a backend other than transformers the forwards are the
    engine's own count (``stats.forward_passes``). Streaming gives the time to first token;
    the final event's statistics give the draft/accept counts and the strategy ``auto``
    resolved to.
    """
    assert cell.lookahead is not None or cell.method == "lockstep"
    settings: dict[str, Any] = (
        {}
        if cell.method in ("defaults", "constrained")
        else {"strategy": cell.method, "strength": 0.0, "decoder": "persona-judge"}
    )
    constraint_seconds = [0.0]
    if cell.method == "constrained":
        compiled = engine.compile_constraint(TOOL_CALLS_SCHEMA)  # before the clock starts
        settings["logit_transforms"] = [
            lambda: TimedConstraintMask(compiled.matcher(), constraint_seconds)
        ]
    try:
        models = [engine.model]
        device = next(engine.model.parameters()).device
    except ModelLoadError:  # another backend (llama.cpp): its own count, on the CPU
        models, device = [], torch.device("cpu")
    with ForwardCounter(models) as counter:
        _sync(device)
        started = time.perf_counter()
        first_token_seconds = 0.0
        result = None
        for event in engine.stream(
            conversation,
            list(config.personas),
            lookahead=cell.lookahead or 4,
            max_new_tokens=cell.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            seed=seed,
            **settings,
        ):
            if event.token_ids and not first_token_seconds:
                first_token_seconds = time.perf_counter() - started
            if event.result is not None:
                result = event.result
        _sync(device)
        seconds = time.perf_counter() - started
    assert result is not None, "the engine's stream ended without a result"
    return Sample(
        tokens=len(result.token_ids),
        seconds=seconds,
        first_token_seconds=first_token_seconds,
        forward_passes=counter.count if models else result.stats.forward_passes,
        drafted=result.stats.drafted,
        accepted=result.stats.accepted,
        strategy=result.stats.strategy,
        token_ids=list(result.token_ids),
        constraint_seconds=constraint_seconds[0] if cell.method == "constrained" else None,
    )
