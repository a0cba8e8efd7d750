"""Continuous batching: one scheduler thread owns the model and decodes every request that is
under way as one batch; a new request joins at the next step.

:class:`ContinuousBatcher` is what a server puts in front of an engine. ``submit(request)``
validates a request (a :class:`~pj_core.batch.BatchRequest` or a dict of
``PersonaJudge.generate``'s arguments) in the caller's thread, then hands it to the scheduler
and returns at once with an iterator of its :class:`~pj_core.results.StreamEvent` s. Between two
batched forwards the scheduler admits every request that arrived (their rows are prefilled in
forwards of their own, in groups of similar length, the running rows untouched: see
:meth:`pj_core.backends.hf.kv.BatchedContexts.add_rows`), and a request that finishes leaves
the batch at once, so a short request never waits for a long one and a new request never
waits for the batch to end.

Each request keeps its own seed and settings: its tokens are those of its own
``generate_batch`` run with the same seed (up to the float differences of batched forwards,
as in :mod:`pj_core.batch`). Requests decode in lockstep (or the pool decoder), which has the
same output distribution as the speculative strategy.

Example:
    >>> from tests._tiny import make_tiny_model, make_tiny_tokenizer
    >>> from pj_core.engine import PersonaJudge
    >>> tokenizer = make_tiny_tokenizer()
    >>> pj = PersonaJudge(make_tiny_model(len(tokenizer)), tokenizer, context_window=64)
    >>> with ContinuousBatcher(pj) as batcher:
    ...     events = batcher.submit({"conversation": "hello", "personas": ["be funny", "be brief"],
    ...                              "seed": 0, "max_new_tokens": 4})
    ...     final = [e for e in events if e.done][0]
    >>> final.result.stats.tokens <= 4
    True
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pj_core.backends.protocol import Backend
from pj_core.batch import BatchRequest, start_request
from pj_core.decoding.batched import RunningRequest, SharedDecoder
from pj_core.errors import (
    InvalidGenerationConfigError,
    PersonaJudgeError,
    RequestTimeoutError,
    ServerBusyError,
)
from pj_core.results import GenerationResult, StreamEvent, final_result

if TYPE_CHECKING:
    from pj_core.engine import PersonaJudge

THREAD_NAME = "pj-scheduler"
# Prompt tokens kept for prefix reuse by default (about 190 MB with SmolLM2-135M in float32).
DEFAULT_PREFIX_CACHE_TOKENS = 4096


@dataclass
class _Submitted:
    """A validated request waiting for the scheduler, and where its events go."""

    index: int
    rows: list[list[int]]
    state: RunningRequest
    out: queue.SimpleQueue[StreamEvent | BaseException] = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic() after which it is stopped


@dataclass
class SchedulerStats:
    """What the scheduler has done so far.

    Attributes:
        requests: requests admitted.
        steps: batched decode forwards.
        prefills: prefill forwards (requests admitted together are prefilled in groups of
            similar length: :func:`pj_core.decoding.batched.prefill_groups`).
        max_rows: the most rows (persona and neutral rows of all requests) in one step.
        joined_running: requests admitted while others were decoding.
        refused: requests refused because the queue was full.
        timed_out: requests stopped at their time limit.
    """

    requests: int = 0
    steps: int = 0
    prefills: int = 0
    max_rows: int = 0
    joined_running: int = 0
    refused: int = 0
    timed_out: int = 0


class ContinuousBatcher:
    """A scheduler thread that decodes every submitted request in one running batch.

    Args:
        engine: the engine whose model the scheduler owns (other callers of the same engine
            still work, but compete for the CPU).
        max_rows: the most rows (persona and neutral rows of all requests) one step may
            carry; a request that does not fit waits in the queue until rows free up
            (``None``: no limit).
        max_queue: the most requests waiting to be admitted; :meth:`submit` refuses more
            with :class:`ServerBusyError` (``None``: no limit).
        prefix_cache_tokens: prompt tokens whose keys and values are kept for later prompts
            that begin the same way (a user's persona text, a chat's earlier turns): those
            beginnings are not computed again (:mod:`pj_core.backends.hf.prefix_cache`).
            ``0`` turns this off. Each token costs the model's key/value size (about 46 KB
            for SmolLM2-135M).

    Use it as a context manager, or call :meth:`close` when done; the thread starts on the
    first :meth:`submit`.
    """

    def __init__(
        self,
        engine: PersonaJudge,
        *,
        max_rows: int | None = None,
        max_queue: int | None = None,
        prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS,
    ) -> None:
        for name, value in (("max_rows", max_rows), ("max_queue", max_queue)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise InvalidGenerationConfigError(f"{name} must be a whole number >= 1 or None")
        if (
            isinstance(prefix_cache_tokens, bool)
            or not isinstance(prefix_cache_tokens, int)
            or prefix_cache_tokens < 0
        ):
            raise InvalidGenerationConfigError(
                f"prefix_cache_tokens must be a whole number >= 0 (0: off), got "
                f"{prefix_cache_tokens!r}"
            )
        self.engine = engine
        # The engine's model, with a cache of prompt beginnings when asked for.
        self.backend: Backend = (
            engine.backend.with_prefix_cache(prefix_cache_tokens)
            if prefix_cache_tokens
            else engine.backend
        )
        # The transformers backend's cache, for its statistics (hits); None when off.
        self.prefix_cache = getattr(self.backend, "prefix_cache", None)
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.stats = SchedulerStats()
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._waiting: list[_Submitted] = []
        self._active: dict[int, _Submitted] = {}
        self._closed = False
        self._thread: threading.Thread | None = None

    # ----- the caller's side

    def submit(
        self, request: BatchRequest | Mapping[str, Any], *, timeout: float | None = None
    ) -> Iterator[StreamEvent]:
        """Validate ``request`` and queue it; returns its events (one per token, then the
        final one with the result), yielded as the scheduler produces them. Closing the
        iterator early (``break``, a dropped client) cancels the request: its rows leave
        the batch at the next step.

        Args:
            request: a :class:`~pj_core.batch.BatchRequest` or a dict of its fields.
            timeout: seconds from now (waiting in the queue included) after which the
                request is stopped: its rows leave the batch and its events end with
                :class:`RequestTimeoutError`.

        Raises:
            PersonaJudgeError: an invalid request (at once, as ``PersonaJudge.generate``).
            ServerBusyError: the queue is full (``max_queue``), or the request alone needs
                more rows than ``max_rows``.
            RuntimeError: the batcher is closed.
        """
        if timeout is not None and not timeout > 0:
            raise InvalidGenerationConfigError(f"timeout must be > 0 seconds, got {timeout}")
        index = next(self._ids)
        rows, state = start_request(self.engine, request, index)
        if self.max_rows is not None and len(rows) > self.max_rows:
            raise InvalidGenerationConfigError(
                f"the request needs {len(rows)} rows (its personas, and a neutral row when "
                f"guided) but a step carries at most {self.max_rows}; use fewer personas"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        item = _Submitted(index=index, rows=rows, state=state, deadline=deadline)
        with self._lock:
            if self._closed:
                raise RuntimeError("the ContinuousBatcher is closed; make a new one")
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                self.stats.refused += 1
                raise ServerBusyError(
                    f"{len(self._waiting)} requests are already waiting (the queue holds "
                    f"{self.max_queue}); retry in a moment",
                    retry_after=1.0,
                )
            self._waiting.append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
            self._lock.notify()
        return self._events(item)

    def generate(self, request: BatchRequest | Mapping[str, Any]) -> GenerationResult:
        """Submit ``request`` and wait for its result."""
        return final_result(self.submit(request))

    def _events(self, item: _Submitted) -> Iterator[StreamEvent]:
        try:
            while True:
                event = item.out.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.done:
                    return
        finally:
            item.cancelled.set()  # no-op when it finished; else its rows leave the batch
            with self._lock:
                self._lock.notify()

    @property
    def active_requests(self) -> int:
        """Requests queued or decoding now."""
        with self._lock:
            return len(self._waiting) + len(self._active)

    def close(self) -> None:
        """Stop admitting requests; the scheduler finishes the ones under way, then ends."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> ContinuousBatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ----- the scheduler thread

    def _run(self) -> None:
        decoder = self._decoder()
        while True:
            with self._lock:
                while not self._waiting and not decoder.running and not self._closed:
                    self._lock.wait()
                if self._closed and not self._waiting and not decoder.running:
                    return
                admitted = self._take_fitting(decoder)
            self._stop_cancelled_and_late(decoder)
            try:
                self._admit(decoder, admitted)
                if decoder.running:
                    decoder.step()
                    self.stats.steps += 1
            except Exception as exc:  # the model itself failed: every request gets the error
                for item in [*self._active.values(), *admitted]:
                    item.out.put(exc)
                self._active.clear()
                self.backend.clear_prefix_cache()  # a forward broke: keep nothing it made
                decoder = self._decoder()

    def _decoder(self) -> SharedDecoder:
        return SharedDecoder(self.backend, self._fail, self._deliver, keep_results=False)

    def _take_fitting(self, decoder: SharedDecoder) -> list[_Submitted]:
        """The waiting requests to admit now, in arrival order, while their rows fit in
        ``max_rows`` beside the running ones (called with the lock held)."""
        now = time.monotonic()
        late = [item for item in self._waiting if item.deadline is not None and item.deadline < now]
        for item in late:
            self._waiting.remove(item)
            self.stats.timed_out += 1
            item.out.put(RequestTimeoutError("the request waited in the queue past its time limit"))
        if self.max_rows is None:
            admitted, self._waiting = self._waiting, []
            return admitted
        used = sum(len(self._active[i].rows) for i in decoder.running if i in self._active)
        admitted = []
        while self._waiting and used + len(self._waiting[0].rows) <= self.max_rows:
            item = self._waiting.pop(0)
            admitted.append(item)
            used += len(item.rows)
        return admitted

    def _stop_cancelled_and_late(self, decoder: SharedDecoder) -> None:
        """Drop the rows of requests whose consumer left or whose time ran out."""
        now = time.monotonic()
        for index, item in list(self._active.items()):
            late = item.deadline is not None and item.deadline < now
            if item.cancelled.is_set() or late:
                decoder.cancel(index)
                self._active.pop(index)
                if late and not item.cancelled.is_set():
                    self.stats.timed_out += 1
                    item.out.put(
                        RequestTimeoutError(
                            "the request ran past its time limit and was stopped; ask for "
                            "fewer tokens or allow more time"
                        )
                    )

    def _admit(self, decoder: SharedDecoder, admitted: list[_Submitted]) -> None:
        admitted = [item for item in admitted if not item.cancelled.is_set()]
        if not admitted:
            return
        if decoder.running:
            self.stats.joined_running += len(admitted)
        for item in admitted:
            self._active[item.index] = item
        forwards = decoder.forward_passes
        decoder.add(
            {item.index: item.rows for item in admitted},
            {item.index: item.state for item in admitted},
        )
        self.stats.requests += len(admitted)
        self.stats.prefills += decoder.forward_passes - forwards
        rows = sum(len(self._active[i].rows) for i in decoder.running)
        self.stats.max_rows = max(self.stats.max_rows, rows)

    def _deliver(self, index: int, event: StreamEvent) -> None:
        item = self._active.get(index)
        if item is None:
            return
        item.out.put(event)
        if event.done:
            self._active.pop(index, None)

    def _fail(self, index: int, exc: PersonaJudgeError) -> None:
        item = self._active.pop(index, None)
        if item is not None:
            item.out.put(exc)
