"""Timing the three kinds of forward the strategies run, on any backend (``strategy="auto"``).

:meth:`pj_core.backends.protocol.Backend.step_timings` of every backend is this measure over
its own rows: a draft step (one row, one token), a judge pass (one row, λ + 1 tokens) and a
lockstep step (one token on each of k rows), each the median of a few after a warm-up, over a
context about as long as a short chat prompt.

Example (the toy backend of the tests):
    >>> from tests._toy_backend import ToyBackend, ToyLM
    >>> timings = measure_step_timings(ToyBackend(ToyLM(22)), n_personas=2, lookahead=4)
    >>> timings.verify > 0
    True
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from pj_core.backends.protocol import Backend, StepTimings

# Context length of the timing forwards: about a short chat prompt.
CALIBRATION_CONTEXT = 64
CALIBRATION_REPEATS = 3


def measure_step_timings(
    backend: Backend,
    *,
    n_personas: int,
    lookahead: int,
    synchronize: Callable[[], None] = lambda: None,
) -> StepTimings:
    """Median seconds of :data:`CALIBRATION_REPEATS` forwards of each kind, after one warm-up
    each, over :data:`CALIBRATION_CONTEXT` tokens.

    Args:
        backend: the backend to time (its rows are made and dropped here).
        n_personas: rows of the lockstep step.
        lookahead: λ; the judge pass feeds λ + 1 tokens.
        synchronize: waits for the device's queued work (a GPU runs asynchronously: without
            it only the launch would be timed).
    """
    token = 0
    context = [token] * CALIBRATION_CONTEXT

    def timed(run: Callable[[], object]) -> float:
        synchronize()
        started = time.perf_counter()
        run()
        synchronize()
        return time.perf_counter() - started

    def median_of(make: Callable[[], Callable[[], object]]) -> float:
        samples = [timed(make()) for _ in range(CALIBRATION_REPEATS + 1)]
        return statistics.median(samples[1:])

    def extend(tokens: int) -> Callable[[], object]:
        rows = backend.rows([context], layout="separate")
        return lambda: rows.extend(0, [token] * tokens, keep=tokens)

    def step() -> Callable[[], object]:
        rows = backend.rows([context] * n_personas, layout="batched")
        return lambda: rows.step([token] * n_personas)

    return StepTimings(
        single_step=median_of(lambda: extend(1)),
        verify=median_of(lambda: extend(lookahead + 1)),
        batch_step=median_of(step),
    )
