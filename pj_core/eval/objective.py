"""Objective judges: text measures that follow a preference axis, and a fluency guard.

LLM judges on the small models here cannot tell answers apart (see docs/evaluation.md), so the
preference axes that have an objective proxy are measured directly, offline:

==========================  ==================================  ===========================
axis (catalog dimensions)   proxy                               library
==========================  ==================================  ===========================
concise / informative       length in words                     (a word regex)
elementary / expert         Flesch-Kincaid grade level          pyphen (syllables)
friendly / unfriendly       VADER compound sentiment, -1..1     vaderSentiment (lexicon)
==========================  ==================================  ===========================

:class:`ObjectiveJudge` turns them into a pointwise judge of ``pj eval`` (``--judges
objective``): its score for a dimension is the proxy signed so that higher means *more* of the
dimension (``concise`` scores minus the word count). Dimensions without a proxy (humour, ...)
are not scored by it (:func:`has_proxy`).

A method can move a proxy by breaking the text (a guided decoder that repeats one word is
very "unfriendly" and very short), so every answer also gets a fluency guard
(:class:`FluencyScorer`): the share of repeated word 3-grams, and the perplexity of the answer
under the generator model with no persona.

Example:
    >>> word_count("Yes. It's 3 words")
    4
    >>> readability_grade("The cat sat. The dog ran.") < readability_grade(
    ...     "Photosynthetic organisms metabolise atmospheric carbon via enzymatic fixation.")
    True
    >>> repeated_trigram_share("a b c a b c")
    0.25
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from pj_core.errors import EvaluationError
from pj_core.eval.judges import ScoreItem

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
# A sentence ends at . ! ? (runs of them, and closing quotes/brackets) or at a line break.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)|\n+")
MAX_SENTENCE_WORDS = 40
"""Unpunctuated text (a list, a model that never writes a full stop) would read as one huge
sentence and an absurd grade; a run of more words than this counts as several sentences."""


def words(text: str) -> list[str]:
    """The words of ``text`` (letters and digits, inner apostrophes kept)."""
    return _WORD.findall(text)


def word_count(text: str) -> int:
    """Length in words: the proxy of concise (fewer) vs informative (more)."""
    return len(words(text))


def sentence_count(text: str) -> int:
    """Sentences for readability: punctuated or line-broken runs, long runs split.

    Example:
        >>> sentence_count("One. Two!\\nThree"), sentence_count(" ".join(["w"] * 100))
        (3, 3)
    """
    total = 0
    for run in _SENTENCE_END.split(text):
        n = word_count(run)
        if n:
            total += math.ceil(n / MAX_SENTENCE_WORDS)
    return total


@cache
def _hyphenator() -> Any:
    try:
        import pyphen
    except ImportError as exc:
        raise EvaluationError(
            "the readability judge needs pyphen: pip install 'persona-judge[eval]'"
        ) from exc
    return pyphen.Pyphen(lang="en_US")


def syllable_count(word: str) -> int:
    """Syllables of one word from pyphen's English hyphenation patterns (at least 1)."""
    if word.isdigit():
        return 1
    return len(_hyphenator().positions(word.lower())) + 1


def readability_grade(text: str) -> float:
    """Flesch-Kincaid grade level: the proxy of elementary (lower) vs expert (higher).

    ``0.39 * words/sentence + 11.8 * syllables/word - 15.59``; 0.0 for text without words.
    """
    found = words(text)
    if not found:
        return 0.0
    syllables = sum(syllable_count(w) for w in found)
    sentences = max(sentence_count(text), 1)
    return 0.39 * len(found) / sentences + 11.8 * syllables / len(found) - 15.59


@cache
def _vader() -> Any:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:
        raise EvaluationError(
            "the sentiment judge needs vaderSentiment: pip install 'persona-judge[eval]'"
        ) from exc
    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER's compound sentiment in [-1, 1]: the proxy of friendly (higher) vs unfriendly."""
    if not text.strip():
        return 0.0
    return float(_vader().polarity_scores(text)["compound"])


def repeated_trigram_share(text: str) -> float:
    """Share of the word 3-grams that already occurred earlier in the text (0 = no repeats).

    Fluent answers stay low (~0.0-0.1); degenerate loops ("IPAMP IPAMP IPAMP") approach 1.
    """
    tokens = [w.lower() for w in words(text)]
    grams = list(zip(tokens, tokens[1:], tokens[2:], strict=False))
    if not grams:
        return 0.0
    seen: set[tuple[str, str, str]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


@dataclass(frozen=True)
class Proxy:
    """How a dimension is measured: ``sign * measure(text)``, higher meaning more of it."""

    measure: Callable[[str], float]
    sign: float
    unit: str


PROXIES: dict[str, Proxy] = {
    "concise": Proxy(lambda t: float(word_count(t)), -1.0, "words"),
    "informative": Proxy(lambda t: float(word_count(t)), 1.0, "words"),
    "elementary": Proxy(readability_grade, -1.0, "grade"),
    "expert": Proxy(readability_grade, 1.0, "grade"),
    "friendly": Proxy(sentiment, 1.0, "sentiment"),
    "unfriendly": Proxy(sentiment, -1.0, "sentiment"),
}
"""The catalog dimensions with an objective proxy."""


def has_proxy(dimension: str) -> bool:
    """Whether :class:`ObjectiveJudge` scores ``dimension``."""
    return dimension in PROXIES


class ObjectiveJudge:
    """Pointwise judge from the objective proxies (no model).

    Example:
        >>> from pj_core.eval.aspects import aspect_for
        >>> from pj_core.personas import get_preference
        >>> concise = aspect_for(get_preference("concise"))
        >>> ObjectiveJudge().score([ScoreItem("Q?", "Short.", concise),
        ...                         ScoreItem("Q?", "A much longer answer here.", concise)])
        [-1.0, -5.0]
    """

    name = "objective"

    def score(self, items: Sequence[ScoreItem]) -> list[float]:
        """One signed proxy value per item.

        Raises:
            EvaluationError: an item's dimension has no proxy.
        """
        out = []
        for item in items:
            proxy = PROXIES.get(item.aspect.dimension)
            if proxy is None:
                raise EvaluationError(
                    f"the objective judge has no proxy for {item.aspect.dimension!r}; it "
                    f"measures {', '.join(sorted(PROXIES))}"
                )
            out.append(proxy.sign * proxy.measure(item.response))
        return out


@dataclass(frozen=True)
class Fluency:
    """The fluency guard of one answer.

    Attributes:
        repeated_trigrams: :func:`repeated_trigram_share`.
        perplexity: exp(mean negative log-likelihood) of the answer's tokens under the model
            given the question with no persona; None for an empty answer.
        tokens: how many answer tokens the perplexity averages over.
    """

    repeated_trigrams: float
    perplexity: float | None
    tokens: int


class FluencyScorer:
    """Fluency guard from a causal LM (the generator, so no second model is loaded).

    Args:
        model: a transformers causal LM in eval mode.
        tokenizer: its tokenizer (the prompt is rendered as the engine renders it, without
            a persona).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer

    def score(self, prompt: str, answer: str) -> Fluency:
        """The fluency guard of ``answer`` to ``prompt``."""
        import torch

        from pj_core.prompts import render_ids

        share = repeated_trigram_share(answer)
        answer_ids = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
        if not answer_ids:
            return Fluency(share, None, 0)
        context = render_ids(self.tokenizer, prompt, None)
        ids = torch.tensor([context + answer_ids], device=next(self.model.parameters()).device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, use_cache=False).logits[0].float()
        # logits at position i predict token i + 1: the answer's tokens from the last context
        # position on. [answer tokens, vocab]
        predicting = logits[len(context) - 1 : -1]
        nll = torch.nn.functional.cross_entropy(
            predicting, torch.tensor(answer_ids, device=predicting.device)
        )
        return Fluency(share, float(torch.exp(nll)), len(answer_ids))
