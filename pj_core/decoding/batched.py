"""The batched lockstep loop: the persona rows of many requests stepped as one batch.

Used by :func:`pj_core.batch.generate_batch` (which validates requests, builds each one's
event stream with the engine and gathers the results). Here: :class:`SharedRows` (every
request's rows in one left-padded batch cache), :class:`RequestRows` (one request's view of
a shared step, in the shape :func:`~pj_core.decoding.lockstep.lockstep_emissions` expects) and
:func:`decode_shared` (step until every request has finished, dropping finished rows).

Example:
    >>> from pj_core.backends.hf.backend import HFBackend
    >>> from tests._tiny import make_tiny_model
    >>> rows = SharedRows(HFBackend(make_tiny_model(vocab_size=22)), [[[5, 6], [7]], [[8, 9]]])
    >>> rows.rows_of(1)
    [2]
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from pj_core.backends.protocol import Backend
from pj_core.decoding.generation_config import GenerationConfig
from pj_core.errors import PersonaJudgeError
from pj_core.results import GenerationResult, StreamEvent


class SharedRows:
    """The persona rows of every request in one left-padded batch cache.

    Rows are grouped by request (a request is its position in ``prefixes``, or its key when
    ``prefixes`` is a mapping); :meth:`step` appends one token per row of the requests
    given and returns their logits; :meth:`drop` removes a finished request's rows (and
    padding columns no remaining row needs).

    Example:
        >>> from pj_core.backends.hf.backend import HFBackend
        >>> from tests._tiny import make_tiny_model
        >>> backend = HFBackend(make_tiny_model(vocab_size=22))
        >>> rows = SharedRows(backend, [[[5, 6], [7]], [[8, 9, 10], [11]]])
        >>> {r: t.shape for r, t in rows.step({0: [3, 3], 1: [4, 4]}).items()}
        {0: torch.Size([2, 22]), 1: torch.Size([2, 22])}
        >>> rows.drop(1); rows.step({0: [5, 5]})[0].shape
        torch.Size([2, 22])
    """

    def __init__(
        self,
        backend: Backend,
        prefixes: Sequence[Sequence[Sequence[int]]] | Mapping[int, Sequence[Sequence[int]]],
    ) -> None:
        self._requests: list[int] = []  # request of each row, in row order
        flat: list[Sequence[int]] = []
        by_request = prefixes if isinstance(prefixes, Mapping) else dict(enumerate(prefixes))
        for request, rows in by_request.items():
            self._requests += [request] * len(rows)
            flat += list(rows)
        self._contexts = backend.rows(flat, layout="batched")

    @property
    def forward_passes(self) -> int:
        """Batched forwards run so far, the prefill included."""
        return self._contexts.forward_passes

    def rows_of(self, request: int) -> list[int]:
        """The batch rows that belong to ``request`` now."""
        return [row for row, owner in enumerate(self._requests) if owner == request]

    def step(self, tokens: Mapping[int, Sequence[int]]) -> dict[int, torch.Tensor]:
        """Append ``tokens[request]`` (one per row) to the rows of every request given and
        return each one's next-token logits ``[rows, vocab]``. Every request still in the
        batch must be given: rows advance together."""
        order = list(dict.fromkeys(self._requests))
        if sorted(tokens) != sorted(order):
            raise ValueError(f"step needs tokens for requests {order}, got {sorted(tokens)}")
        flat = [t for request in order for t in tokens[request]]
        if len(flat) != len(self._requests):
            raise ValueError("step needs one token per row of every request")
        logits = self._contexts.step(flat)
        return {request: logits[self.rows_of(request)] for request in order}

    def add(self, prefixes: Mapping[int, Sequence[Sequence[int]]]) -> None:
        """Add the rows of new requests (``prefixes[request]``): prefilled in one forward of
        their own, they join the batch and advance with the others from the next step."""
        if set(prefixes) & set(self._requests):
            raise ValueError(f"requests {sorted(set(prefixes) & set(self._requests))} are in")
        flat: list[Sequence[int]] = []
        for request, rows in prefixes.items():
            self._requests += [request] * len(rows)
            flat += list(rows)
        self._contexts.add(flat)

    def drop(self, request: int) -> None:
        """Remove the rows of a finished request from the batch."""
        keep = [row for row, owner in enumerate(self._requests) if owner != request]
        if len(keep) == len(self._requests):
            return
        self._requests = [self._requests[row] for row in keep]
        self._contexts.keep(keep)


class RequestRows:
    """One request's view of :class:`SharedRows`, in the shape lockstep_emissions expects.

    The batch driver runs the shared step *before* it advances the request, and hands the
    request its logits together with the tokens it fed; :meth:`step` checks that the request
    asks for exactly those tokens (lockstep feeds the last emitted token to every row)."""

    def __init__(self) -> None:
        self.forward_passes = 1  # the shared prefill
        self._fed: list[int] | None = None
        self._logits: torch.Tensor | None = None

    def ready(self, fed: list[int], logits: torch.Tensor) -> None:
        self._fed, self._logits = fed, logits

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        if self._logits is None or list(tokens) != self._fed:
            raise RuntimeError(
                f"batched lockstep fell out of step (fed {self._fed}, asked for {list(tokens)}); "
                "this is a bug in pj_core.decoding.batched, please report it"
            )
        logits, self._logits, self._fed = self._logits, None, None
        self.forward_passes += 1
        return logits


@dataclass
class RunningRequest:
    """Book-keeping of one request while the batch runs."""

    events: Iterator[StreamEvent]
    rows: RequestRows
    config: GenerationConfig
    eos_ids: frozenset[int]
    next_inputs: list[int]
    emitted: int = 0
    last_token: int | None = None
    last_token_time: float = 0.0
    started: float = 0.0  # when its prefill began
    prefill_seconds: float = 0.0  # the forward that prefilled it (shared with those added with it)

    def ends_without_step(self) -> bool:
        """True when the next event is the final one without another forward (the last
        token was EOS or used up the budget; lockstep_emissions stops on the same test)."""
        return self.emitted > 0 and (
            self.last_token in self.eos_ids or self.emitted >= self.config.max_new_tokens
        )


class SharedDecoder:
    """Requests' rows decoded as one batch: requests join between steps (prefilled in a
    forward of their own) and leave as soon as they finish or fail.

    ``fail(index, error)`` records (or raises) a request's own error; ``on_event(index,
    event)``, if given, sees every event of every request as it happens (the final one with
    the request's timing statistics); prompts that begin like earlier ones share their
    prefill when ``backend`` has a prefix cache
    (:meth:`pj_core.backends.protocol.Backend.with_prefix_cache`); ``keep_results=False``
    keeps no results (a long-running
    scheduler that only delivers events). :func:`decode_shared` adds every request at once and
    steps until all are done; a server's scheduler adds requests as they arrive.
    """

    def __init__(
        self,
        backend: Backend,
        fail: Callable[[int, PersonaJudgeError], None],
        on_event: Callable[[int, StreamEvent], None] | None = None,
        *,
        keep_results: bool = True,
    ) -> None:
        self.backend = backend
        self.fail = fail
        self.on_event = on_event
        self.keep_results = keep_results  # False: results only reach on_event (a server)
        self.running: dict[int, RunningRequest] = {}
        self.results: dict[int, GenerationResult] = {}
        self._rows: SharedRows | None = None

    @property
    def forward_passes(self) -> int:
        """Batched forwards run so far (prefills included)."""
        return 0 if self._rows is None else self._rows.forward_passes

    def add(
        self, prepared: Mapping[int, list[list[int]]], states: Mapping[int, RunningRequest]
    ) -> None:
        """Add requests: ``prepared[i]`` holds request ``i``'s rows (its persona prompts, then
        its neutral prompt when it is guided), ``states[i]`` its event stream and state. Their
        rows are prefilled (see :func:`prefill_groups`) and decode from the next :meth:`step`."""
        for group in prefill_groups(prepared):
            started = time.perf_counter()
            prefixes = {index: [p[:-1] for p in prepared[index]] for index in group}
            with torch.inference_mode():
                if self._rows is None:
                    self._rows = SharedRows(self.backend, prefixes)
                else:
                    self._rows.add(prefixes)
            prefill_seconds = time.perf_counter() - started
            for index in group:
                state = states[index]
                state.started, state.prefill_seconds = started, prefill_seconds
                self.running[index] = state

    def cancel(self, index: int) -> None:
        """Stop decoding request ``index`` now: its rows leave the batch and its event stream
        is closed; it gets no result."""
        state = self.running.pop(index, None)
        if state is None:
            return
        assert self._rows is not None
        self._rows.drop(index)
        close = getattr(state.events, "close", None)
        if close is not None:
            close()

    def _finish(self, index: int, event: StreamEvent) -> None:
        state = self.running.pop(index)
        assert event.result is not None and self._rows is not None
        stats = dataclasses.replace(
            event.result.stats,
            prefill_seconds=state.prefill_seconds,
            decode_seconds=max(state.last_token_time - state.started - state.prefill_seconds, 0.0),
        )
        result = dataclasses.replace(event.result, stats=stats)
        if self.keep_results:
            self.results[index] = result
        self._rows.drop(index)
        if self.on_event is not None:
            self.on_event(index, dataclasses.replace(event, result=result))

    def _next_event(self, index: int, final: bool) -> StreamEvent | None:
        """The request's next event, or None when it failed (and has left the batch)."""
        try:
            events = self.running[index].events
            return next_final(events) if final else next(events)
        except PersonaJudgeError as exc:
            self.running.pop(index)
            assert self._rows is not None
            self._rows.drop(index)
            self.fail(index, exc)
            return None

    def step(self) -> None:
        """Finish the requests that end without another forward, then run one batched
        forward for the others and advance each by one token."""
        for index in [i for i, s in self.running.items() if s.ends_without_step()]:
            event = self._next_event(index, final=True)
            if event is not None:
                self._finish(index, event)
        if not self.running:
            return
        assert self._rows is not None
        with torch.inference_mode():
            logits = self._rows.step({i: s.next_inputs for i, s in self.running.items()})
        for index, state in list(self.running.items()):
            state.rows.ready(state.next_inputs, logits[index])
            event = self._next_event(index, final=False)
            if event is None:
                continue
            if event.done:  # ended by a stop string on its previous token: row unused
                self._finish(index, event)
                continue
            token = event.token_ids[0]
            state.emitted += 1
            state.last_token = token
            state.last_token_time = time.perf_counter()
            state.next_inputs = [token] * len(state.next_inputs)
            if self.on_event is not None:
                self.on_event(index, event)


# The most padded prompt tokens (rows x longest row) one prefill forward takes. A prefill is
# compute-bound, so padding costs as much as real tokens: requests are prefilled in groups of
# similar length, and a group of a few hundred tokens is already as fast per token as a larger
# one (SmolLM2 on 2 CPU cores: 1.4-1.6 ms per token from 180 to 1,800 tokens).
PREFILL_GROUP_TOKENS = 512


def prefill_groups(
    prepared: Mapping[int, Sequence[Sequence[int]]], budget: int | None = None
) -> list[list[int]]:
    """The requests of ``prepared`` in prefill groups: shortest first, each group as many
    requests as fit ``budget`` padded tokens (default :data:`PREFILL_GROUP_TOKENS`; at least
    one request per group).

    Example:
        >>> prefill_groups({0: [[1] * 90, [1] * 92], 1: [[1] * 10], 2: [[1] * 12]}, budget=100)
        [[1, 2], [0]]
    """
    budget = PREFILL_GROUP_TOKENS if budget is None else budget
    groups: list[list[int]] = []
    rows = width = 0
    for index in sorted(prepared, key=lambda i: max(map(len, prepared[i]), default=0)):
        own_rows = len(prepared[index])
        own_width = max(map(len, prepared[index]), default=0)
        if groups and (rows + own_rows) * max(width, own_width) <= budget:
            groups[-1].append(index)
            rows, width = rows + own_rows, max(width, own_width)
        else:
            groups.append([index])
            rows, width = own_rows, own_width
    return groups


def decode_shared(
    backend: Backend,
    prepared: Mapping[int, list[list[int]]],
    running: dict[int, RunningRequest],
    fail: Callable[[int, PersonaJudgeError], None],
) -> dict[int, GenerationResult]:
    """Decode the prepared requests in one shared batch until every one has finished or
    failed; ``fail`` records (or raises) a request's own error.

    ``prepared[i]`` holds request ``i``'s rows (its persona prompts, then its neutral prompt
    when it is guided); ``running[i]`` its event stream, whose emission source reads its
    rows of each shared step through ``running[i].rows``. Returns each finished request's
    result, with the shared prefill and its own decode time in ``stats``."""
    decoder = SharedDecoder(backend, fail)
    decoder.add(prepared, running)
    while decoder.running:
        decoder.step()
    running.clear()
    return decoder.results


def next_final(events: Iterator[StreamEvent]) -> StreamEvent:
    event = next(events)
    if not event.done:
        raise RuntimeError(
            "a batched request emitted a token after its budget or EOS; this is a bug in "
            "pj_core.decoding.batched, please report it"
        )
    return event
