"""Judges: the pairwise LLM-as-judge, and the interface the pointwise scorers share.

Pairwise judge. We render our own judging prompt (the aspect, the question, answer A and
answer B) and read the judge model's next-token probabilities of ``A`` and ``B`` instead of
parsing free text: a 135M model rarely writes a clean verdict, but its preference between the
two letters is still measurable. The judge's reply is begun for it ("The better answer is
Answer"), so that its next token is the letter. With ``P = p(A) / (p(A) + p(B))`` one
order's verdict is ``"A"`` when ``P > 0.5 + tie_margin``, ``"B"`` when
``P < 0.5 - tie_margin``, else ``"tie"``.

Every pair is asked in both orders, (x, y) and (y, x), to cancel position bias: x *wins*
only when both orders prefer x, *loses* only when both prefer y, and everything else
(inconsistent or tied) is a tie (:func:`combine_orders`).

Pointwise judges (:class:`PointwiseJudge`) give each response a score for an aspect; the
higher score wins the comparison (:func:`pj_core.eval.stats.outcome_from_scores`).

Example:
    >>> judge = PairwiseJudge(lambda system, user: (0.7, 0.3))   # always prefers the first slot
    >>> judge.verdict("Q?", HUMOUR, "x", "y").verdict
    'A'
    >>> combine_orders("A", "A")   # x first says A, y first says A: position bias, a tie
    0.5
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pj_core.errors import EvaluationError
from pj_core.eval.aspects import Aspect
from pj_core.eval.stats import LOSS, TIE, WIN

Verdict = Literal["A", "B", "tie"]
LetterScorer = Callable[[str, str], tuple[float, float]]
"""``(system, user) -> (p("A"), p("B"))``: the judge model's next-token probabilities."""

JUDGE_SYSTEM = "You are a careful, impartial judge of answers written by an assistant."
JUDGE_ANSWER_PREFIX = "The better answer is Answer"
"""Written at the start of the judge's reply, so its next token is the letter: SmolLM2-135M
puts ~12% of its mass on "A"/"B" without it and ~90% with it."""
DEFAULT_TIE_MARGIN = 0.05

HUMOUR = Aspect("humor", "humour", "it is funny or playful", "Light, playful humour.")
"""A small aspect for examples and tests."""


@dataclass(frozen=True)
class ScoreItem:
    """One response to score for one aspect."""

    prompt: str
    response: str
    aspect: Aspect


class PointwiseJudge(Protocol):
    """A judge that scores each response alone; higher means more of the aspect."""

    name: str

    def score(self, items: Sequence[ScoreItem]) -> list[float]:
        """One score per item, in order."""
        ...


@dataclass(frozen=True)
class OrderVerdict:
    """One order's judgment: the normalised probability of ``A`` and the verdict."""

    p_a: float
    p_b: float
    prob_first: float
    verdict: Verdict


def judge_prompt(prompt: str, aspect: Aspect, answer_a: str, answer_b: str) -> str:
    """The user message of the pairwise judging prompt (ours).

    Example:
        >>> "[Answer B]\\ny" in judge_prompt("Q?", HUMOUR, "x", "y")
        True
    """
    return (
        f"Which answer shows more {aspect.noun}? An answer shows {aspect.noun} when "
        f"{aspect.description}.\n\n"
        f"[Question]\n{prompt.strip()}\n\n"
        f"[Answer A]\n{answer_a.strip()}\n\n"
        f"[Answer B]\n{answer_b.strip()}\n\n"
        f"Judge only {aspect.noun}, not length or correctness. "
        "Reply with one letter, A or B."
    )


def combine_orders(verdict_first: Verdict, verdict_swapped: Verdict) -> float:
    """Outcome for answer x from the verdicts of order (x, y) and of order (y, x).

    Example:
        >>> combine_orders("A", "B"), combine_orders("B", "A"), combine_orders("A", "tie")
        (1.0, 0.0, 0.5)
    """
    x_in_first = {"A": WIN, "B": LOSS, "tie": TIE}[verdict_first]
    x_in_swapped = {"B": WIN, "A": LOSS, "tie": TIE}[verdict_swapped]
    if x_in_first == x_in_swapped and x_in_first != TIE:
        return x_in_first
    return TIE


CONTENT_FREE_ANSWER = "N/A"
"""The content-free answer of the calibration pair (both slots, question too)."""


def band(prob_first: float, tie_margin: float) -> Verdict:
    """The verdict for a normalised probability of ``A``: ``"tie"`` within ``tie_margin``
    of 0.5.

    Example:
        >>> band(0.6, 0.05), band(0.52, 0.05), band(0.3, 0.05)
        ('A', 'tie', 'B')
    """
    if prob_first > 0.5 + tie_margin:
        return "A"
    if prob_first < 0.5 - tie_margin:
        return "B"
    return "tie"


def calibrated_prob_first(p_a: float, p_b: float, free_a: float, free_b: float) -> float:
    """``p(A) / (p(A) + p(B))`` after dividing out the judge's letter bias, measured on a
    content-free pair (``free_a``, ``free_b``: its letter probabilities there): contextual
    calibration (Zhao et al. 2021). A judge that only ever says "A" gives 0.5.

    Example:
        >>> calibrated_prob_first(0.9, 0.1, 0.9, 0.1)   # exactly its bias: no preference
        0.5
        >>> round(calibrated_prob_first(0.6, 0.4, 0.5, 0.5), 2)
        0.6
    """
    if min(p_a, p_b, free_a, free_b) <= 0.0:
        return 0.5 if p_a + p_b <= 0.0 else p_a / (p_a + p_b)
    a, b = p_a / free_a, p_b / free_b
    return a / (a + b)


class PairwiseJudge:
    """LLM-as-judge on pairs, from the next-token probabilities of ``A`` and ``B``.

    Args:
        scorer: ``(system, user) -> (p(A), p(B))``; :meth:`from_model` builds it from a model.
        tie_margin: half-width of the tie band around 0.5 of ``p(A) / (p(A) + p(B))``.
        name: the judge's name in records and reports.

    Example:
        >>> judge = PairwiseJudge(lambda system, user: (0.52, 0.48), tie_margin=0.05)
        >>> judge.verdict("Q?", HUMOUR, "x", "y").verdict
        'tie'
    """

    def __init__(
        self,
        scorer: LetterScorer,
        *,
        tie_margin: float = DEFAULT_TIE_MARGIN,
        name: str = "pairwise",
    ) -> None:
        if not 0.0 <= tie_margin < 0.5:
            raise EvaluationError(f"tie_margin must be in [0, 0.5), got {tie_margin}")
        self.scorer = scorer
        self.tie_margin = tie_margin
        self.name = name

    @classmethod
    def from_model(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **kwargs: Any
    ) -> PairwiseJudge:
        """A judge that asks ``model`` (rendered with our prompt builder).

        Example (needs the packaged SmolLM2):
            >>> from pj_core.backends.hf.models import load_model  # doctest: +SKIP
            >>> loaded = load_model("smollm2-135m-instruct")  # doctest: +SKIP
            >>> judge = PairwiseJudge.from_model(loaded.model, loaded.tokenizer)  # doctest: +SKIP
        """
        return cls(letter_scorer(model, tokenizer), **kwargs)

    def verdict(self, prompt: str, aspect: Aspect, answer_a: str, answer_b: str) -> OrderVerdict:
        """Ask once, with ``answer_a`` in slot A and ``answer_b`` in slot B."""
        p_a, p_b = self.scorer(JUDGE_SYSTEM, judge_prompt(prompt, aspect, answer_a, answer_b))
        total = p_a + p_b
        # Neither letter likely at all: the judge gave no usable preference.
        prob_first = p_a / total if total > 0.0 else 0.5
        return OrderVerdict(
            p_a=p_a, p_b=p_b, prob_first=prob_first, verdict=band(prob_first, self.tie_margin)
        )

    def content_free(self, aspect: Aspect) -> OrderVerdict:
        """The judge's reading of a content-free pair (question and both answers
        :data:`CONTENT_FREE_ANSWER`): its letter bias for this aspect's prompt."""
        return self.verdict(CONTENT_FREE_ANSWER, aspect, CONTENT_FREE_ANSWER, CONTENT_FREE_ANSWER)


def _letter_ids(tokenizer: PreTrainedTokenizerBase, letter: str) -> list[int]:
    """Token ids that start an answer with ``letter`` (``"A"`` and ``" A"`` spellings)."""
    ids: list[int] = []
    for spelling in (letter, " " + letter):
        encoded = tokenizer.encode(spelling, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    if not ids:
        raise EvaluationError(
            f"the judge's tokenizer has no single token for {letter!r}; choose another "
            "judge model with --judge-model"
        )
    return ids


def letter_scorer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> LetterScorer:
    """Next-token probabilities of ``A`` and ``B`` from ``model``.

    The prompt is rendered with the model's chat template (or plain format), and the reply is
    begun with :data:`JUDGE_ANSWER_PREFIX`, so the next token is the verdict's letter.
    """
    from pj_core.prompts import render_ids  # the prompt builder, shared with generation

    a_ids, b_ids = _letter_ids(tokenizer, "A"), _letter_ids(tokenizer, "B")
    device = next(model.parameters()).device
    # Only the last position is read: skip the vocabulary projection of the others.
    extra = (
        {"logits_to_keep": 1}
        if "logits_to_keep" in inspect.signature(model.forward).parameters
        else {}
    )

    def score(system: str, user: str) -> tuple[float, float]:
        ids = render_ids(tokenizer, [{"role": "user", "content": user}], system)
        ids += tokenizer.encode(JUDGE_ANSWER_PREFIX, add_special_tokens=False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=device), **extra).logits[0, -1]
        probs = torch.softmax(logits.float(), dim=-1)
        return float(probs[a_ids].sum()), float(probs[b_ids].sum())

    return score
