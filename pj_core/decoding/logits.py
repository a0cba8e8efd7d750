"""The logit pipeline: the one place where raw logits become the distributions p and q.

Every strategy (speculative, lockstep, and the batched lockstep of :mod:`pj_core.batch`)
calls :meth:`LogitPipeline.probs` at every drafted position (q), every judge position (p) and
the bonus position (p). The pipeline applies, in this order:

1. the call's logit transforms (:class:`LogitTransform`), each seeing the position it is
   applied at (:class:`Position`);
2. temperature, top-k and top-p (:func:`pj_core.decoding.sampling.filtered_probs`).

Because p and q go through the same function with the same transforms and filters, each
round's output follows the judge's *transformed* distribution exactly (the accept test and the
residual in :mod:`pj_core.decoding.sampling` hold for any pair of distributions).

Terms:
    answer prefix: the tokens of the answer before a position: the tokens emitted before the
        round, then the round's drafted tokens before that position.
    transform state: a transform may keep state that follows the answer prefix (a grammar
        matcher does). The pipeline moves every transform to a position's answer prefix before
        applying it, with :meth:`LogitTransform.advance` (append one token) and
        :meth:`LogitTransform.rollback` (drop the last n tokens): after a rejection the
        drafted tail is rolled back and the replacement advanced.

With no transforms the pipeline is exactly ``filtered_probs`` (no bookkeeping at all).

Example:
    >>> import torch
    >>> from pj_core.decoding.generation_config import GenerationConfig
    >>> pipeline = LogitPipeline(GenerationConfig.create(temperature=1.0, top_k=0, top_p=1.0))
    >>> at = Position(persona=0, role="draft", round=0, emitted=(), drafted=())
    >>> pipeline.probs(torch.tensor([0.0, 0.0]), [at])
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from pj_core.decoding.sampling import filtered_probs
from pj_core.errors import InvalidGenerationConfigError, ModelOutputError

if TYPE_CHECKING:
    from pj_core.decoding.generation_config import GenerationConfig

Role = Literal["draft", "judge"]


@dataclass(frozen=True)
class Position:
    """Where one row of logits sits in the decode.

    Attributes:
        persona: index (into the call's personas) of the persona whose logits these are.
        role: "draft" (the distribution q the draft samples from) or "judge" (p: the judge's
            test, residual and bonus).
        round: the round's index in this call (0 first).
        emitted: the answer's tokens emitted before this round.
        drafted: this round's drafted tokens before this position (empty at the first one).
        neutral: ``[vocab]`` raw logits of the call's *neutral row* at the same answer prefix
            (the conversation with no persona text), when the call has one (``strength > 0``,
            see :mod:`pj_core.decoding.guidance`); else None.
    """

    persona: int
    role: Role
    round: int
    emitted: tuple[int, ...]
    drafted: tuple[int, ...]
    neutral: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def tokens(self) -> tuple[int, ...]:
        """The answer prefix before this position: ``emitted + drafted``."""
        return self.emitted + self.drafted


class LogitTransform:
    """A change to the next-token logits, applied identically to p and q before sampling.

    Subclass it and override :meth:`__call__`; override :meth:`advance` and :meth:`rollback`
    when the transform keeps state that follows the answer (they do nothing here). The
    pipeline calls ``advance``/``rollback`` so that, whenever ``__call__`` runs, the
    transform's state has seen exactly ``position.tokens``: a stateless transform can ignore
    them, a stateful one (a grammar matcher) relies on them.

    One instance serves one call (build it in a factory the engine calls per request: the
    engine is shared across threads), for every persona row of that call.

    Example:
        >>> import torch
        >>> class Ban(LogitTransform):
        ...     def __init__(self, token: int) -> None:
        ...         self.token = token
        ...     def __call__(self, logits: torch.Tensor, position: Position) -> torch.Tensor:
        ...         return logits.index_fill(-1, torch.tensor([self.token]), float("-inf"))
        >>> at = Position(persona=0, role="judge", round=0, emitted=(), drafted=())
        >>> Ban(1)(torch.zeros(3), at)
        tensor([0., -inf, 0.])
    """

    def __call__(self, logits: torch.Tensor, position: Position) -> torch.Tensor:
        """The transformed logits of one position (``logits`` is ``[vocab]``; return a new
        tensor of the same shape rather than changing it in place)."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def advance(self, token: int) -> None:
        """The answer prefix grew by ``token``."""

    def rollback(self, count: int) -> None:
        """The last ``count`` tokens of the answer prefix were taken back (a rejected draft)."""


TransformFactory = Callable[[], LogitTransform]
"""Builds a fresh :class:`LogitTransform` for one call (e.g. the transform's class)."""


def build_transforms(factories: Sequence[TransformFactory]) -> tuple[LogitTransform, ...]:
    """Call each factory once: the transforms of one call, in order.

    Raises:
        InvalidGenerationConfigError: ``factories`` is not a list of callables, or one of them
            does not return a :class:`LogitTransform`.

    Example:
        >>> build_transforms([])
        ()
        >>> build_transforms([LogitTransform()])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pj_core.errors.InvalidGenerationConfigError: logit_transforms[0] is a LogitTransform...
    """
    if isinstance(factories, str | bytes) or not isinstance(factories, Sequence):
        raise InvalidGenerationConfigError(
            "logit_transforms takes a list of factories, e.g. [MyTransform] or "
            f"[lambda: MyTransform(...)], got {type(factories).__name__}"
        )
    built = []
    for index, factory in enumerate(factories):
        if isinstance(factory, LogitTransform) or not callable(factory):
            raise InvalidGenerationConfigError(
                f"logit_transforms[{index}] is a {type(factory).__name__}; give a factory that "
                "builds a fresh LogitTransform for each call (a class or a lambda), because "
                "transforms may keep per-call state and one engine serves many calls at once"
            )
        transform = factory()
        if not isinstance(transform, LogitTransform):
            raise InvalidGenerationConfigError(
                f"logit_transforms[{index}] returned a {type(transform).__name__}, not a "
                "pj_core.decoding.logits.LogitTransform"
            )
        built.append(transform)
    return tuple(built)


class LogitPipeline:
    """Raw logits to p or q for one call: transforms, then temperature, top-k and top-p.

    Args:
        config: the call's sampling settings (temperature, top_k, top_p).
        transforms: the call's transforms, applied in order (each built for this call).
    """

    def __init__(self, config: GenerationConfig, transforms: Sequence[LogitTransform] = ()) -> None:
        self.temperature = config.temperature
        self.top_k = config.top_k
        self.top_p = config.top_p
        self.transforms = tuple(transforms)
        self._seen: list[int] = []  # the answer prefix the transforms' state has seen
        self._final = 0  # length of the answer known to be final (emitted) at the last call

    def probs(self, logits: torch.Tensor, positions: Sequence[Position]) -> torch.Tensor:
        """The filtered distributions of ``positions``.

        Args:
            logits: ``[vocab]`` for one position, or ``[len(positions), vocab]``, row i at
                ``positions[i]``; rows of one call must come in answer order.

        Returns:
            float32 probabilities of the same shape.
        """
        return self.filtered(self.transformed(logits, positions))

    def transformed(self, logits: torch.Tensor, positions: Sequence[Position]) -> torch.Tensor:
        """Step 1 alone: the call's transforms applied to ``logits`` (same shapes as
        :meth:`probs`); the logits themselves when the call has no transforms.

        Raises:
            ModelOutputError: the model's logits hold NaN (nothing could be sampled from them;
                softmax would turn the whole row into NaN and sampling would emit junk).
        """
        if math.isnan(float(logits.max())):  # max is NaN when any logit is: one pass
            where = positions[0] if positions else None
            raise ModelOutputError(
                "the model produced NaN logits"
                + (
                    f" at round {where.round} after {len(where.tokens)} answer tokens"
                    if where
                    else ""
                )
                + "; its weights may be broken, or a low-precision dtype overflowed: load it in "
                "float32 (load_model(..., dtype=torch.float32))"
            )
        if not self.transforms:
            return logits
        rows = logits.unsqueeze(0) if logits.dim() == 1 else logits
        if rows.shape[0] != len(positions):
            raise ValueError(f"{rows.shape[0]} rows of logits for {len(positions)} positions")
        changed = []
        for row, position in zip(rows, positions, strict=True):
            self._move_to(position)
            for transform in self.transforms:
                row = _checked(transform(row, position), row, transform, position)
            changed.append(row)
        transformed = torch.stack(changed)
        return transformed[0] if logits.dim() == 1 else transformed

    def filtered(self, logits: torch.Tensor) -> torch.Tensor:
        """Step 2 alone: temperature, top-k and top-p
        (:func:`pj_core.decoding.sampling.filtered_probs`)."""
        return filtered_probs(
            logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p
        )

    def _move_to(self, position: Position) -> None:
        """Roll the transforms back to the longest common prefix, then advance them to
        ``position.tokens``."""
        tokens = position.tokens
        # Tokens emitted before an earlier position are final: no need to compare them again.
        common = min(self._final, len(self._seen), len(tokens))
        while (
            common < len(self._seen)
            and common < len(tokens)
            and self._seen[common] == tokens[common]
        ):
            common += 1
        surplus = len(self._seen) - common
        if surplus:
            for transform in self.transforms:
                transform.rollback(surplus)
            del self._seen[common:]
        for token in tokens[common:]:
            for transform in self.transforms:
                transform.advance(token)
            self._seen.append(token)
        self._final = len(position.emitted)


def _checked(
    out: object, before: torch.Tensor, transform: LogitTransform, position: Position
) -> torch.Tensor:
    """``out`` if it is a usable row of logits, else a typed error naming the transform."""
    name = type(transform).__name__
    if not isinstance(out, torch.Tensor) or out.shape != before.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidGenerationConfigError(
            f"logit transform {name} returned {shape} at round {position.round}; it must "
            f"return a tensor of the shape it was given, {tuple(before.shape)}"
        )
    # One pass for the usual case: the max is NaN when any logit is, and -inf when none is
    # finite or +inf; only a +inf max needs the full look for a finite logit.
    top = float(out.max()) if out.numel() else -math.inf
    if math.isnan(top) or top == -math.inf or (top == math.inf and not torch.isfinite(out).any()):
        raise InvalidGenerationConfigError(
            f"logit transform {name} left no finite logit (or produced NaN) at round "
            f"{position.round} after {len(position.tokens)} answer tokens; at least one "
            "token must stay possible"
        )
    return out
