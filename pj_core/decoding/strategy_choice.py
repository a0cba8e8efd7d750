"""``strategy="auto"``: pick speculative or lockstep from a measurement on the actual model.

The two strategies emit the same tokens for the same seed, so the choice only affects speed.
Their costs per emitted token are, with λ the lookahead and α the acceptance rate:

* speculative: a round costs λ single-row forwards (draft) plus one (λ+1)-token forward
  (judge) and emits on average ``E = (1 - α^(λ+1)) / (1 - α)`` tokens;
* lockstep: one forward of a k-row batch per token.

Which is cheaper depends on the device and its kernels. SmolLM2-135M on the reference 2-core
CPU with a 300-token context (``benchmarks/results/linear_kernels.md``): with the weights
packed for oneDNN (the default, :mod:`pj_core.backends.hf.cpu_linear`) one row costs 52 ms, two rows
58 ms and a 5-token verify 68 ms, so lockstep (58 ms per token) beats speculative
((4 · 52 + 68) / 4.3 ≈ 64 ms per token at α ≈ 0.92); with PyTorch's default kernels the same
forwards cost 80, 115 and 140 ms, and speculative (≈ 108 ms) beat lockstep (115 ms). On a
GPU a small batch costs about one row, so lockstep wins there. Rather than guess from the
device name, the backend times the three kinds of forward on the model itself
(:meth:`pj_core.backends.protocol.Backend.step_timings`: a few forwards, once per
PersonaJudge, persona count and lookahead) and
:func:`choose_strategy` compares the predicted costs. α is the running acceptance rate
measured by earlier calls of the same PersonaJudge, starting from
:data:`DEFAULT_ACCEPTANCE_RATE`.

Example:
    >>> timings = StepTimings(single_step=0.057, verify=0.068, batch_step=0.087)
    >>> choose_strategy(timings, lookahead=4, acceptance_rate=0.9)
    'speculative'
    >>> choose_strategy(StepTimings(0.010, 0.011, 0.010), lookahead=4, acceptance_rate=0.9)
    'lockstep'
"""

from __future__ import annotations

from pj_core.backends.protocol import StepTimings
from pj_core.results import StrategyName

__all__ = [
    "DEFAULT_ACCEPTANCE_RATE",
    "StepTimings",
    "choose_strategy",
    "expected_tokens_per_round",
    "predicted_seconds_per_token",
]

# Two different persona prompts on SmolLM2 agree on ~93% of the probability mass per token at
# T=0.7, top-k 20, top-p 0.9 (docs/engine.md); 0.9 is a slightly conservative start.
DEFAULT_ACCEPTANCE_RATE = 0.9


def expected_tokens_per_round(lookahead: int, acceptance_rate: float) -> float:
    """Mean tokens a speculative round emits: accepted drafts plus the resampled/bonus token.

    Example:
        >>> expected_tokens_per_round(4, 0.0), expected_tokens_per_round(4, 1.0)
        (1.0, 5.0)
    """
    alpha = min(max(acceptance_rate, 0.0), 1.0)
    return float(sum(alpha**i for i in range(lookahead + 1)))


def predicted_seconds_per_token(
    timings: StepTimings, *, lookahead: int, acceptance_rate: float
) -> dict[StrategyName, float]:
    """Predicted decoding cost per emitted token of each strategy."""
    round_cost = lookahead * timings.single_step + timings.verify
    return {
        "speculative": round_cost / expected_tokens_per_round(lookahead, acceptance_rate),
        "lockstep": timings.batch_step,
    }


def choose_strategy(
    timings: StepTimings, *, lookahead: int, acceptance_rate: float
) -> StrategyName:
    """The strategy with the lower predicted cost per token (speculative on ties)."""
    costs = predicted_seconds_per_token(
        timings, lookahead=lookahead, acceptance_rate=acceptance_rate
    )
    return "speculative" if costs["speculative"] <= costs["lockstep"] else "lockstep"
