"""Logit transforms (pj_core.decoding.logits) keep Persona-judge exact.

Two test transforms, one stateless (a fixed bias vector) and one stateful (ban the token just
before the position, kept in the transform's own state through ``advance``/``rollback``), run
through both strategies and ``generate_batch``. On a tiny model with top-k 2 every 3-token
answer can be enumerated: the exact distribution of the round process over the *transformed*
distributions is computed by ``tests/_engine_reference.py`` (full forwards, the transform
written there again from its definition), and the engine's empirical distribution over
``SAMPLES`` seeded runs must lie within the same tolerance as the untransformed exactness
tests (test_engine_distribution.py): the 99.9th percentile of TV between the exact
distribution and a multinomial sample of that size (a correct engine fails with probability
about 1e-3). Each test also checks that it has power: the untransformed distribution lies
more than 3 tolerances away.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch

from pj_core.decoding.constraints import ConstraintMask
from pj_core.decoding.generation_config import GenerationConfig
from pj_core.decoding.logits import LogitPipeline, LogitTransform, Position
from pj_core.engine import PersonaJudge
from pj_core.errors import InvalidGenerationConfigError
from pj_core.personas import resolve_personas
from pj_core.prompts import render_ids
from pj_core.settings import PAPER
from tests._engine_reference import (
    TOKENIZER,
    PrefixTransform,
    autoregressive_distribution,
    exact_sequence_distribution,
    total_variation,
    tv_tolerance,
)
from tests._tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EOS = frozenset({1})
SETTINGS: dict[str, Any] = {"temperature": 1.0, "top_k": 2, "top_p": 1.0}
LENGTH = 3
LOOKAHEAD = 2
SAMPLES = 600
VOCAB = len(TOKENIZER)
# A fixed, strong bias: it changes which two tokens top-k keeps at most positions.
BIAS = 3.0 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(11))


class Bias(LogitTransform):
    """Stateless: add a fixed vector to every row's logits."""

    def __call__(self, logits: torch.Tensor, position: Position) -> torch.Tensor:
        return logits + BIAS.to(logits.dtype)


class BanPrevious(LogitTransform):
    """Stateful: ban the answer's last token, as tracked by advance/rollback alone.

    Every call checks that the tracked state is the position's answer prefix, so a wrong
    rollback fails loudly instead of silently skewing the distribution."""

    rollbacks = 0  # class-wide count, to show rejected tails were rolled back

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def __call__(self, logits: torch.Tensor, position: Position) -> torch.Tensor:
        assert tuple(self.tokens) == position.tokens, (self.tokens, position)
        if not self.tokens:
            return logits
        return logits.index_fill(-1, torch.tensor([self.tokens[-1]]), float("-inf"))

    def advance(self, token: int) -> None:
        self.tokens.append(token)

    def rollback(self, count: int) -> None:
        assert 0 < count <= len(self.tokens)
        del self.tokens[-count:]
        BanPrevious.rollbacks += 1


def reference_bias(logits: torch.Tensor, prefix: tuple[int, ...]) -> torch.Tensor:
    return logits + BIAS


def reference_ban_previous(logits: torch.Tensor, prefix: tuple[int, ...]) -> torch.Tensor:
    if not prefix:
        return logits
    banned = logits.clone()
    banned[prefix[-1]] = float("-inf")
    return banned


def parity_allowed(prefix: tuple[int, ...]) -> torch.Tensor:
    """A hand-written constraint over token ids: each token's parity differs from the one
    before it, and EOS may come only after two tokens."""
    ids = torch.arange(VOCAB)
    allowed = torch.ones(VOCAB, dtype=torch.bool) if not prefix else ids % 2 != prefix[-1] % 2
    for eos in EOS:
        allowed[eos] = len(prefix) >= 2
    return allowed


class ParityMatcher:
    """A :class:`pj_core.decoding.constraints.Matcher` for :func:`parity_allowed`; it
    counts rollbacks and refuses a forbidden token, as a grammar matcher does."""

    rollbacks = 0

    def __init__(self, tokens: tuple[int, ...] = ()) -> None:
        self.tokens = list(tokens)

    @property
    def vocab_size(self) -> int:
        return VOCAB

    def allowed(self) -> torch.Tensor:
        return parity_allowed(tuple(self.tokens))

    def consume(self, token: int) -> None:
        assert bool(self.allowed()[token]), (self.tokens, token)
        self.tokens.append(token)

    def rollback(self, count: int) -> None:
        assert 0 < count <= len(self.tokens)
        del self.tokens[-count:]
        ParityMatcher.rollbacks += 1

    def copy(self) -> ParityMatcher:
        return ParityMatcher(tuple(self.tokens))

    def is_finished(self) -> bool:
        return len(self.tokens) >= 2


def reference_parity(logits: torch.Tensor, prefix: tuple[int, ...]) -> torch.Tensor:
    return logits.masked_fill(~parity_allowed(prefix), float("-inf"))


TRANSFORMS: dict[str, tuple[Callable[[], LogitTransform], PrefixTransform]] = {
    "bias": (Bias, reference_bias),
    "ban_previous": (BanPrevious, reference_ban_previous),
    # A constraint (what a grammar does): its matcher follows the answer through the rounds.
    "constraint": (lambda: ConstraintMask(ParityMatcher()), reference_parity),
}


@pytest.fixture(scope="module")
def pj() -> PersonaJudge:
    # Model seed 7 with these personas: their top-2 answers often repeat a token, so banning
    # the previous token moves the output distribution far (TV 0.41 between with and without
    # it); the bias moves it further still.
    # EOS: <eos> only, as the exact distributions here assume.
    return PersonaJudge(
        make_tiny_model(VOCAB, seed=7), TOKENIZER, defaults=PAPER, eos_token_ids=sorted(EOS)
    )


CONVERSATION = "cat"
PERSONAS = ["yes yes yes", "no no no"]


@pytest.fixture(scope="module")
def prompts(pj: PersonaJudge) -> list[list[int]]:
    """The persona prompts exactly as the engine renders them."""
    return [render_ids(pj.tokenizer, CONVERSATION, p.text) for p in resolve_personas(PERSONAS)]


def _exact(
    pj: PersonaJudge,
    prompts: list[list[int]],
    transform: PrefixTransform | None,
    alternate: bool = True,
) -> dict[tuple[int, ...], float]:
    return exact_sequence_distribution(
        pj.model,
        prompts,
        lookahead=LOOKAHEAD,
        alternate=alternate,
        length=LENGTH,
        eos_ids=EOS,
        transform=transform,
        **SETTINGS,
    )


def _tolerance(exact: dict[tuple[int, ...], float]) -> float:
    """99.9th percentile of TV(exact, empirical of SAMPLES multinomial draws)."""
    return tv_tolerance(exact, SAMPLES)


def _answers(
    pj: PersonaJudge,
    factories: list[Callable[[], LogitTransform]],
    route: str,
    seeds: range,
    **settings: Any,
) -> list[tuple[int, ...]]:
    """The token ids of one answer per seed, through ``route``: a strategy of ``generate``,
    or ``generate_batch`` (100 requests per batch)."""
    options: dict[str, Any] = {
        "lookahead": LOOKAHEAD,
        "max_new_tokens": LENGTH,
        **SETTINGS,
        **settings,
        "logit_transforms": factories,
    }
    if route != "batch":
        return [
            tuple(pj.generate(CONVERSATION, PERSONAS, seed=s, strategy=route, **options).token_ids)
            for s in seeds
        ]
    answers: list[tuple[int, ...]] = []
    for start in range(seeds.start, seeds.stop, 100):
        requests = [
            {"conversation": CONVERSATION, "personas": PERSONAS, "seed": s, **options}
            for s in range(start, min(start + 100, seeds.stop))
        ]
        answers += [tuple(r.token_ids) for r in pj.generate_batch(requests)]
    return answers


def _distribution(answers: list[tuple[int, ...]]) -> dict[tuple[int, ...], float]:
    return {answer: n / len(answers) for answer, n in Counter(answers).items()}


# ------------------------------------------------------------------------ exactness (slow)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["speculative", "lockstep", "batch"])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_output_follows_the_judges_transformed_distribution(
    pj: PersonaJudge, prompts: list[list[int]], name: str, route: str
) -> None:
    factory, reference = TRANSFORMS[name]
    exact = _exact(pj, prompts, reference)
    tolerance = _tolerance(exact)
    # Power: without the transform the output would be far outside the tolerance.
    assert total_variation(exact, _exact(pj, prompts, None)) > 3 * tolerance
    empirical = _distribution(_answers(pj, [factory], route, range(SAMPLES)))
    assert total_variation(empirical, exact) < tolerance


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_fixed_roles_give_the_judges_own_transformed_distribution(
    pj: PersonaJudge, prompts: list[list[int]], name: str
) -> None:
    """The enumeration the exactness tests trust agrees with the theorem: with fixed roles
    the output is the judge's own (transformed) autoregressive distribution."""
    reference = TRANSFORMS[name][1]
    exact = _exact(pj, prompts, reference, alternate=False)
    judge_alone = autoregressive_distribution(
        pj.model, prompts[1], length=LENGTH, eos_ids=EOS, transform=reference, **SETTINGS
    )
    assert total_variation(exact, judge_alone) < 1e-6


# ------------------------------------------------------------------------ same tokens, state


def test_strategies_and_batch_emit_identical_tokens_with_transforms(pj: PersonaJudge) -> None:
    factories: list[Callable[[], LogitTransform]] = [
        Bias,
        BanPrevious,
        lambda: ConstraintMask(ParityMatcher()),
    ]
    settings = {"max_new_tokens": 16, "lookahead": 3, "top_k": 0, "top_p": 0.95}
    BanPrevious.rollbacks = ParityMatcher.rollbacks = 0
    speculative = _answers(pj, factories, "speculative", range(40), **settings)
    assert BanPrevious.rollbacks > 0  # rejected tails were rolled back and re-advanced
    assert ParityMatcher.rollbacks > 0  # ... and so was the matcher
    lockstep = _answers(pj, factories, "lockstep", range(40), **settings)
    batched = _answers(pj, factories, "batch", range(40), **settings)
    assert speculative == lockstep
    differing = sum(a != b for a, b in zip(lockstep, batched, strict=True))
    assert differing <= 2  # batched forwards may flip a rare token (see test_batch.py)
    for answer in speculative + lockstep + batched:
        assert all(a != b for a, b in itertools.pairwise(answer)), answer
        body = [t for t in answer if t not in EOS]
        assert all(a % 2 != b % 2 for a, b in itertools.pairwise(body)), answer


def test_without_transforms_the_pipeline_is_the_plain_filter(pj: PersonaJudge) -> None:
    plain = [pj.generate(CONVERSATION, PERSONAS, seed=s, max_new_tokens=12) for s in range(5)]
    empty = [
        pj.generate(CONVERSATION, PERSONAS, seed=s, max_new_tokens=12, logit_transforms=[])
        for s in range(5)
    ]
    assert [r.token_ids for r in plain] == [r.token_ids for r in empty]


def test_pipeline_moves_a_stateful_transform_along_the_answer() -> None:
    calls: list[str] = []

    class Record(LogitTransform):
        def __call__(self, logits: torch.Tensor, position: Position) -> torch.Tensor:
            calls.append(f"apply{position.tokens}")
            return logits

        def advance(self, token: int) -> None:
            calls.append(f"+{token}")

        def rollback(self, count: int) -> None:
            calls.append(f"-{count}")

    pipeline = LogitPipeline(GenerationConfig.create(), [Record()])
    logits = torch.zeros(3, 5)
    draft = [Position(0, "draft", 0, (7,), tuple(d)) for d in ([], [1], [1, 2])]
    for position in draft:
        pipeline.probs(logits[0], [position])
    # The judge verifies the same three prefixes: the pipeline rolls back, then re-advances.
    pipeline.probs(logits, [Position(1, "judge", 0, (7,), p.drafted) for p in draft])
    # d_1 was rejected and replaced by 4: the next round starts after (7, 1, 4).
    pipeline.probs(logits[0], [Position(1, "draft", 1, (7, 1, 4), ())])
    assert calls == [
        "+7",
        "apply(7,)",
        "+1",
        "apply(7, 1)",
        "+2",
        "apply(7, 1, 2)",
        "-2",
        "apply(7,)",
        "+1",
        "apply(7, 1)",
        "+2",
        "apply(7, 1, 2)",
        "-1",
        "+4",
        "apply(7, 1, 4)",
    ]


# ------------------------------------------------------------------------ bad transforms


class WrongShape(LogitTransform):
    def __call__(self, logits: torch.Tensor, position: Position) -> torch.Tensor:
        return logits[:-1]


class BanEverything(LogitTransform):
    def __call__(self, logits: torch.Tensor, position: Position) -> torch.Tensor:
        return torch.full_like(logits, float("-inf"))


@pytest.mark.parametrize(
    ("transforms", "fragment"),
    [
        ([Bias()], "give a factory"),
        (["not callable"], "give a factory"),
        ([lambda: "no transform"], "not a pj_core.decoding.logits.LogitTransform"),
        ([WrongShape], "must return a tensor of the shape"),
        ([BanEverything], "no finite logit"),
    ],
)
def test_bad_transforms_raise_typed_errors(
    pj: PersonaJudge, transforms: list[Any], fragment: str
) -> None:
    for strategy in ("speculative", "lockstep"):
        with pytest.raises(InvalidGenerationConfigError, match=fragment):
            pj.generate(
                CONVERSATION,
                PERSONAS,
                max_new_tokens=4,
                strategy=strategy,
                logit_transforms=transforms,
            )
    with pytest.raises(InvalidGenerationConfigError, match=fragment):
        pj.generate_batch(
            [{"conversation": CONVERSATION, "personas": PERSONAS, "logit_transforms": transforms}]
        )
