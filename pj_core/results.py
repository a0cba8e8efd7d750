"""What a Persona-judge generation returns: text, token ids, statistics and a per-token trace.

Example:
    >>> stats = GenerationStats(tokens=5, rounds=2, drafted=4, accepted=3, resampled=1, bonus=1,
    ...                         forward_passes=9, prefill_seconds=0.1, decode_seconds=0.5,
    ...                         strategy="speculative")
    >>> stats.acceptance_rate, stats.tokens_per_second
    (0.75, 10.0)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["accepted", "resampled", "bonus", "pooled"]
FinishReason = Literal["eos", "stop", "length"]
StrategyName = Literal["speculative", "lockstep"]


@dataclass(frozen=True)
class GenerationStats:
    """Counts and timings of one generation.

    Attributes:
        tokens: tokens emitted (EOS and the tokens that formed a stop string included).
        rounds: draft/judge rounds started.
        drafted: draft tokens the judge tested (accepted + rejected). Tokens a speculative
            draft proposed after the first rejection of a round are never tested and are not
            counted, so both strategies report the same counts for the same seed.
        accepted: draft tokens the judge accepted.
        resampled: tokens drawn from the residual after a rejection (one per rejection).
        bonus: tokens drawn from the judge after a whole lookahead was accepted.
        forward_passes: model forward calls, prefill included.
        prefill_seconds: time to prefill the persona prompts.
        decode_seconds: time from the end of prefill to the last token.
        strategy: the strategy that ran ("auto" resolves to one of the two).
    """

    tokens: int
    rounds: int
    drafted: int
    accepted: int
    resampled: int
    bonus: int
    forward_passes: int
    prefill_seconds: float
    decode_seconds: float
    strategy: StrategyName

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted: the measured α of the persona pair (0.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Emitted tokens per second of decoding (prefill excluded)."""
        return self.tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass(frozen=True)
class TokenTrace:
    """Who produced one emitted token.

    Attributes:
        token_id: the token.
        text: the text this token added (may be "" while a multi-byte character is incomplete).
        draft_persona: index of the round's draft persona in ``personas``.
        draft_name: its display name.
        judge_persona: index of the round's judge persona.
        judge_name: its display name.
        outcome: "accepted" (the draft's token passed the judge), "resampled" (the judge
            rejected the draft's token and this one came from the residual), "bonus"
            (drawn from the judge after a whole lookahead was accepted) or "pooled" (the
            ``pool`` decoder: drawn from the pool of every persona; the persona fields are 0).
        round: index of the round that emitted the token.
    """

    token_id: int
    text: str
    draft_persona: int
    draft_name: str
    judge_persona: int
    judge_name: str
    outcome: Outcome
    round: int


@dataclass(frozen=True)
class ToolCall:
    """One tool call in an answer (see :mod:`pj_core.tools`).

    Attributes:
        name: the tool's name.
        arguments: its arguments, parsed from the answer's JSON.
        id: a fresh id, ``call_<hex>``, to match the tool's result to the call.
    """

    name: str
    arguments: dict[str, Any]
    id: str


@dataclass(frozen=True)
class GenerationResult:
    """The answer of :meth:`pj_core.PersonaJudge.generate`.

    Attributes:
        text: the answer, without EOS tokens and without the stop string (if one ended it).
        token_ids: every emitted token, EOS and stop-string tokens included.
        stats: counts and timings.
        trace: one :class:`TokenTrace` per emitted token.
        finish_reason: "eos", "stop" (a stop string) or "length" (``max_new_tokens``).
        prompt_tokens: tokens in the longest persona prompt.
        parsed: with a ``response_format``, the completed answer as data (an instance of the
            pydantic model, the JSON value, or the text); None without one, or when the budget
            or a stop string ended the answer first.
        tool_calls: with ``tools``, the completed answer's tool calls (name, arguments, id);
            empty without tools, for a text answer, or when the answer did not complete.
    """

    text: str
    token_ids: list[int]
    stats: GenerationStats
    trace: list[TokenTrace]
    finish_reason: FinishReason
    prompt_tokens: int
    parsed: Any = None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class StreamEvent:
    """One event of :meth:`pj_core.PersonaJudge.stream`.

    There is one event per emitted token, then a final event with ``done=True`` and the whole
    :class:`GenerationResult`. ``text`` is the new text that is safe to show: text that could
    still turn out to be the start of a stop string is held back until it is disambiguated,
    so concatenating every event's ``text`` gives exactly ``result.text``.

    Attributes:
        text: new text (may be "").
        token_ids: the token of this event ([] on the final event).
        trace: its :class:`TokenTrace` ([] on the final event).
        done: True on the final event only.
        result: the :class:`GenerationResult` on the final event, else None.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    trace: list[TokenTrace] = field(default_factory=list)
    done: bool = False
    result: GenerationResult | None = None


def final_result(events: Iterable[StreamEvent]) -> GenerationResult:
    """Consume an event stream (``PersonaJudge.stream``, ``ContinuousBatcher.submit``) and
    return the result its final event carries.

    Raises:
        RuntimeError: the stream ended without a final event (a bug if it happens).
    """
    for event in events:
        if event.result is not None:
            return event.result
    raise RuntimeError("the event stream ended without a final result")  # a bug if reached
