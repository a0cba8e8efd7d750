"""Many users at once: several Persona-judge requests in one batched decode.

:func:`generate_batch` runs the *lockstep* strategy of every request together: the persona
rows of all requests (each request has its own prompt and personas) sit in one left-padded
batch cache, and every step is ONE forward over all rows still running. Each request keeps
its own settings, its own ``torch.Generator`` and its own round logic — the engine's
:func:`pj_core.decoding.lockstep.lockstep_emissions` and event stream run unchanged for it, and only
read their rows of the shared step. A request that finishes (EOS, stop string, budget) leaves
the batch and its rows are dropped, so the others no longer pay for them.

Why lockstep: a batched step of many rows costs far less than one forward per row (the
weights are read once per step), and lockstep emits exactly one token per request per step,
so rows never wait for each other. The tokens are those of the request's own single run with
the same seed — whatever strategy that run used, since both strategies emit the same tokens —
up to floating-point differences between a batched forward and a single one (padding and
batch shape change the order of float additions). ``tests/test_batch.py`` measures how often
that flips a token; with float32 weights it is rare.

Example:
    >>> from tests._tiny import make_tiny_model, make_tiny_tokenizer
    >>> from pj_core.engine import PersonaJudge
    >>> tokenizer = make_tiny_tokenizer()
    >>> pj = PersonaJudge(make_tiny_model(len(tokenizer)), tokenizer)
    >>> requests = [
    ...     {"conversation": "hello", "personas": ["be funny", "be brief"], "seed": 1,
    ...      "max_new_tokens": 6},
    ...     BatchRequest("why cat", ["be brief", "be funny"], seed=2, max_new_tokens=4),
    ... ]
    >>> results = generate_batch(pj, requests)
    >>> [r.token_ids == pj.generate(**q).token_ids for r, q in zip(results, [
    ...     requests[0], {"conversation": "why cat", "personas": ["be brief", "be funny"],
    ...                   "seed": 2, "max_new_tokens": 4}])]
    [True, True]
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from transformers import PreTrainedModel

from pj_core.backends.hf.kv import BatchedContexts
from pj_core.decoding.generation_config import GenerationConfig
from pj_core.decoding.lockstep import lockstep_emissions
from pj_core.decoding.logits import TransformFactory
from pj_core.decoding.pool import pool_emissions
from pj_core.errors import InvalidGenerationConfigError, PersonaJudgeError
from pj_core.results import GenerationResult, StreamEvent

if TYPE_CHECKING:
    from pj_core.engine import PersonaJudge


@dataclass(frozen=True)
class BatchRequest:
    """One request of a batch: the arguments of :meth:`PersonaJudge.generate`.

    ``strategy`` is accepted so that the keyword arguments of ``generate`` can be passed
    unchanged, but a batch always decodes in lockstep (which emits the same tokens as the
    other strategies); the result's ``stats.strategy`` says ``"lockstep"``. A setting left at
    ``None`` takes its value from :data:`pj_core.settings.DEFAULTS`, as in ``generate``.
    ``logit_transforms`` are as in :meth:`PersonaJudge.generate_from_ids`. With
    ``strength > 0`` the request's neutral row joins the batch beside its persona rows and is
    stepped with them (no extra forward).

    Example:
        >>> BatchRequest("Hi!", ["Be funny.", "Be brief."], seed=3, top_k=5).top_k
        5
    """

    conversation: Any
    personas: Any
    lookahead: int | None = None
    alternate: bool | None = None
    strategy: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    strength: float | None = None
    neutral_system: str | None = None
    decoder: str | None = None
    seed: int | None = None
    stop: Sequence[str] | None = None
    logit_transforms: Sequence[TransformFactory] = ()
    """Factories of this request's logit transforms (see :mod:`pj_core.decoding.logits`); each is
    called once for the request."""

    @classmethod
    def coerce(cls, request: BatchRequest | Mapping[str, Any], index: int) -> BatchRequest:
        """A :class:`BatchRequest` from itself or from a dict of ``generate`` arguments.

        Raises:
            InvalidGenerationConfigError: unknown or missing keys, or not a dict at all.
        """
        if isinstance(request, BatchRequest):
            return request
        if not isinstance(request, Mapping):
            raise InvalidGenerationConfigError(
                f"request {index} is a {type(request).__name__}; give a BatchRequest or a dict "
                "such as {'conversation': 'Hi!', 'personas': ['Be funny.', 'Be brief.']}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(request) - known)
        if unknown:
            raise InvalidGenerationConfigError(
                f"request {index} has unknown key(s) {unknown}; allowed: {sorted(known)}"
            )
        missing = [k for k in ("conversation", "personas") if k not in request]
        if missing:
            raise InvalidGenerationConfigError(
                f"request {index} lacks {' and '.join(missing)}; every request needs both"
            )
        return cls(**request)


class SharedRows:
    """The persona rows of every request in one left-padded batch cache.

    Rows are grouped by request (a request is its position in ``prefixes``, or its key when
    ``prefixes`` is a mapping); :meth:`step` appends one token per row of the requests
    given and returns their logits; :meth:`drop` removes a finished request's rows (and
    padding columns no remaining row needs).

    Example:
        >>> from tests._tiny import make_tiny_model
        >>> rows = SharedRows(make_tiny_model(vocab_size=22), [[[5, 6], [7]], [[8, 9, 10], [11]]])
        >>> {r: t.shape for r, t in rows.step({0: [3, 3], 1: [4, 4]}).items()}
        {0: torch.Size([2, 22]), 1: torch.Size([2, 22])}
        >>> rows.drop(1); rows.step({0: [5, 5]})[0].shape
        torch.Size([2, 22])
    """

    def __init__(
        self,
        model: PreTrainedModel,
        prefixes: Sequence[Sequence[Sequence[int]]] | Mapping[int, Sequence[Sequence[int]]],
    ) -> None:
        self._requests: list[int] = []  # request of each row, in row order
        flat: list[Sequence[int]] = []
        by_request = prefixes if isinstance(prefixes, Mapping) else dict(enumerate(prefixes))
        for request, rows in by_request.items():
            self._requests += [request] * len(rows)
            flat += list(rows)
        self._contexts = BatchedContexts(model, flat)

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

    def drop(self, request: int) -> None:
        """Remove the rows of a finished request from the batch."""
        keep = [row for row, owner in enumerate(self._requests) if owner != request]
        if len(keep) == len(self._requests):
            return
        self._requests = [self._requests[row] for row in keep]
        self._contexts.keep_rows(keep)


class _RequestRows:
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
                "this is a bug in pj_core.batch, please report it"
            )
        logits, self._logits, self._fed = self._logits, None, None
        self.forward_passes += 1
        return logits


@dataclass
class _Running:
    """Book-keeping of one request while the batch runs."""

    events: Iterator[StreamEvent]
    rows: _RequestRows
    config: GenerationConfig
    eos_ids: frozenset[int]
    next_inputs: list[int]
    emitted: int = 0
    last_token: int | None = None
    last_token_time: float = 0.0

    def ends_without_step(self) -> bool:
        """True when the next event is the final one without another forward (the last
        token was EOS or used up the budget; lockstep_emissions stops on the same test)."""
        return self.emitted > 0 and (
            self.last_token in self.eos_ids or self.emitted >= self.config.max_new_tokens
        )


def _prepare(
    engine: PersonaJudge, request: BatchRequest
) -> tuple[list[list[int]], list[str], GenerationConfig, list[int] | None]:
    """Validate a request and render its persona prompts (and its neutral prompt when it is
    guided), as ``PersonaJudge.stream`` does."""
    config = GenerationConfig.create(
        defaults=engine.defaults,
        lookahead=request.lookahead,
        alternate=request.alternate,
        strategy=request.strategy,
        max_new_tokens=request.max_new_tokens,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        strength=request.strength,
        decoder=request.decoder,
        seed=request.seed,
        stop=request.stop,
    )
    config = dataclasses.replace(config, strategy="lockstep")
    prompts, names = engine.render_prompts(request.conversation, request.personas)
    neutral = (
        engine.render_neutral_prompt(request.conversation, request.neutral_system)
        if config.strength > 0
        else None
    )
    return prompts, names, config, neutral


@overload
def generate_batch(
    engine: PersonaJudge,
    requests: Sequence[BatchRequest | Mapping[str, Any]],
    *,
    return_exceptions: Literal[False] = False,
) -> list[GenerationResult]: ...


@overload
def generate_batch(
    engine: PersonaJudge,
    requests: Sequence[BatchRequest | Mapping[str, Any]],
    *,
    return_exceptions: Literal[True],
) -> list[GenerationResult | PersonaJudgeError]: ...


def generate_batch(
    engine: PersonaJudge,
    requests: Sequence[BatchRequest | Mapping[str, Any]],
    *,
    return_exceptions: bool = False,
) -> list[GenerationResult] | list[GenerationResult | PersonaJudgeError]:
    """Run several requests in one batched decode; results come back in request order.

    Every request is validated (and its prompts rendered) before any decoding starts. In each
    result, ``stats.prefill_seconds`` is the batch's shared prefill and ``stats.decode_seconds``
    the time from its end to this request's last token (shared forwards are not split between
    requests); ``stats.forward_passes`` counts the batched forwards that carried this
    request's rows.

    ``return_exceptions`` says what a request's own error does (one that concerns that request
    only: it fails validation, or its logit transforms fail while it decodes):

    - ``False`` (the default): it is raised, its message prefixed with ``request <i>: `` and
      its ``request_index`` set; a bad request raises before any decoding.
    - ``True``: it comes back in that request's slot instead of a result, with the message a
      single :meth:`PersonaJudge.generate` call would give and ``request_index`` set; the other
      requests decode as if it had never been there (a request that fails while decoding
      leaves the batch at once). This is how an adapter batches many users' calls: one bad
      call never costs the others their answers, and nothing is decoded twice.

    Any other exception (a failure of the model's forward, a bug) propagates either way: it
    concerns the whole batch.

    Raises:
        InvalidGenerationConfigError, InvalidPersonaError, InvalidPromptError,
        ContextOverflowError: as :meth:`PersonaJudge.generate`, naming the request index
        (only with ``return_exceptions=False``). A ``requests`` that is not a list of requests
        raises either way.

    Example:
        >>> from tests._tiny import make_tiny_model, make_tiny_tokenizer
        >>> from pj_core.engine import PersonaJudge
        >>> tokenizer = make_tiny_tokenizer()
        >>> pj = PersonaJudge(make_tiny_model(len(tokenizer)), tokenizer, context_window=64)
        >>> good = {"conversation": "hello", "personas": ["be funny", "be brief"], "seed": 1,
        ...         "max_new_tokens": 4}
        >>> too_long = {**good, "max_new_tokens": 500}
        >>> outcomes = generate_batch(pj, [good, too_long, good], return_exceptions=True)
        >>> [type(outcome).__name__ for outcome in outcomes]
        ['GenerationResult', 'ContextOverflowError', 'GenerationResult']
        >>> outcomes[1].request_index
        1
    """
    if isinstance(requests, Mapping | BatchRequest) or not isinstance(requests, Sequence):
        raise InvalidGenerationConfigError(
            "generate_batch takes a list of requests (BatchRequest or dicts of generate's "
            "arguments), e.g. [{'conversation': 'Hi!', 'personas': ['Be funny.', 'Be brief.']}]"
        )
    if not requests:
        return []
    failed: dict[int, PersonaJudgeError] = {}

    def fail(index: int, exc: PersonaJudgeError) -> None:
        """Record a request's own error, or raise it naming the request."""
        if not return_exceptions:
            _name_request(exc, index)
            raise exc
        exc.request_index = index
        failed[index] = exc

    prepared: dict[int, list[list[int]]] = {}
    running: dict[int, _Running] = {}
    for index, raw in enumerate(requests):
        view = _RequestRows()
        try:
            request = BatchRequest.coerce(raw, index)
            prompts, names, config, neutral = _prepare(engine, request)
            # The engine's own checks and event stream; only the rows come from the batch.
            decode = pool_emissions if config.decoder == "pool" else lockstep_emissions
            source = functools.partial(decode, contexts=view)
            events = engine.stream_prepared(
                prompts,
                names,
                config,
                emission_source=source,
                logit_transforms=request.logit_transforms,
                neutral_prompt=neutral,
            )
        except PersonaJudgeError as exc:
            fail(index, exc)
            continue
        # The request's rows: its personas, then its neutral row when it is guided.
        rows = [*prompts, neutral] if neutral is not None else prompts
        prepared[index] = rows
        running[index] = _Running(
            events=events,
            rows=view,
            config=config,
            eos_ids=engine.eos_token_ids,
            next_inputs=[row[-1] for row in rows],
        )
    results: dict[int, GenerationResult] = {}
    if running:
        results = _decode(engine, prepared, running, fail)
    outcomes: list[GenerationResult | PersonaJudgeError] = []
    for index in range(len(requests)):
        outcomes.append(failed[index] if index in failed else results[index])
    return outcomes


def _decode(
    engine: PersonaJudge,
    prepared: Mapping[int, list[list[int]]],
    running: dict[int, _Running],
    fail: Callable[[int, PersonaJudgeError], None],
) -> dict[int, GenerationResult]:
    """Decode the prepared requests in one shared batch until every one has finished or
    failed; ``fail`` records (or raises) a request's own error."""
    started = time.perf_counter()
    with torch.inference_mode():
        shared = SharedRows(
            engine.model, {index: [p[:-1] for p in rows] for index, rows in prepared.items()}
        )
    prefill_seconds = time.perf_counter() - started
    results: dict[int, GenerationResult] = {}

    def finish(index: int, event: StreamEvent) -> None:
        state = running.pop(index)
        assert event.result is not None
        stats = dataclasses.replace(
            event.result.stats,
            prefill_seconds=prefill_seconds,
            decode_seconds=max(state.last_token_time - started - prefill_seconds, 0.0),
        )
        results[index] = dataclasses.replace(event.result, stats=stats)
        shared.drop(index)

    def next_event(index: int, final: bool) -> StreamEvent | None:
        """The request's next event, or None when it failed (and has left the batch)."""
        try:
            events = running[index].events
            return _next_final(events) if final else next(events)
        except PersonaJudgeError as exc:
            running.pop(index)
            shared.drop(index)
            fail(index, exc)
            return None

    while running:
        for index in [i for i, s in running.items() if s.ends_without_step()]:
            event = next_event(index, final=True)
            if event is not None:
                finish(index, event)
        if not running:
            break
        with torch.inference_mode():
            logits = shared.step({i: s.next_inputs for i, s in running.items()})
        for index, state in list(running.items()):
            state.rows.ready(state.next_inputs, logits[index])
            event = next_event(index, final=False)
            if event is None:
                continue
            if event.done:  # ended by a stop string on its previous token: row unused
                finish(index, event)
                continue
            token = event.token_ids[0]
            state.emitted += 1
            state.last_token = token
            state.last_token_time = time.perf_counter()
            state.next_inputs = [token] * len(state.next_inputs)
    return results


def _name_request(exc: PersonaJudgeError, index: int) -> None:
    """Record the index of the request that caused ``exc`` and prefix its message with it."""
    exc.request_index = index
    already_named = str(exc.args[0]).startswith(f"request {index} ") if exc.args else False
    if exc.args and isinstance(exc.args[0], str) and not already_named:
        exc.args = (f"request {index}: {exc.args[0]}", *exc.args[1:])


def _next_final(events: Iterator[StreamEvent]) -> StreamEvent:
    event = next(events)
    if not event.done:
        raise RuntimeError(
            "a batched request emitted a token after its budget or EOS; this is a bug in "
            "pj_core.batch, please report it"
        )
    return event
