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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

from pj_core.decoding.batched import RequestRows, RunningRequest, decode_shared
from pj_core.decoding.constraints import CompiledConstraint
from pj_core.decoding.generation_config import GenerationConfig
from pj_core.decoding.lockstep import lockstep_emissions
from pj_core.decoding.logits import TransformFactory
from pj_core.decoding.pool import pool_emissions
from pj_core.errors import InvalidGenerationConfigError, PersonaJudgeError
from pj_core.results import GenerationResult
from pj_core.tools import Tool

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
    response_format: Any = None
    """This request's constraint (as ``generate``'s ``response_format``); each request of a
    batch gets its own matcher."""
    tools: Sequence[Any] | None = None
    """Tools this request's answer may call (as ``generate``'s ``tools``)."""
    tool_choice: str | None = None
    """As ``generate``'s ``tool_choice``."""
    parallel_tool_calls: bool | None = None
    """As ``generate``'s ``parallel_tool_calls``."""

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


@dataclass(frozen=True)
class _Prepared:
    prompts: list[list[int]]
    names: list[str]
    config: GenerationConfig
    neutral: list[int] | None
    constraint: CompiledConstraint | None
    tools: list[Tool] | None


def _prepare(engine: PersonaJudge, request: BatchRequest) -> _Prepared:
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
    conversation, constraint, tools = engine.prepare_output(
        request.conversation,
        request.response_format,
        request.tools,
        request.tool_choice,
        request.parallel_tool_calls,
    )
    prompts, names = engine.render_prompts(conversation, request.personas)
    neutral = (
        engine.render_neutral_prompt(conversation, request.neutral_system)
        if config.strength > 0
        else None
    )
    return _Prepared(prompts, names, config, neutral, constraint, tools)


def start_request(
    engine: PersonaJudge, raw: BatchRequest | Mapping[str, Any], index: int = 0
) -> tuple[list[list[int]], RunningRequest]:
    """Validate one request and start its event stream on rows of a shared batch.

    Returns its rows (its persona prompts, then its neutral prompt when it is guided) and
    its :class:`~pj_core.decoding.batched.RunningRequest`, for a
    :class:`~pj_core.decoding.batched.SharedDecoder` to step.

    Raises:
        PersonaJudgeError: the request is invalid (as :meth:`PersonaJudge.generate` says).
    """
    view = RequestRows()
    request = BatchRequest.coerce(raw, index)
    ready = _prepare(engine, request)
    prompts, config, neutral = ready.prompts, ready.config, ready.neutral
    # The engine's own checks and event stream; only the rows come from the batch.
    decode = pool_emissions if config.decoder == "pool" else lockstep_emissions
    events = engine.stream_prepared(
        prompts,
        ready.names,
        config,
        emission_source=functools.partial(decode, contexts=view),
        logit_transforms=request.logit_transforms,
        neutral_prompt=neutral,
        constraint=ready.constraint,
        tools=ready.tools,
    )
    rows = [*prompts, neutral] if neutral is not None else prompts
    return rows, RunningRequest(
        events=events,
        rows=view,
        config=config,
        eos_ids=engine.eos_token_ids,
        next_inputs=[row[-1] for row in rows],
    )


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
    running: dict[int, RunningRequest] = {}
    for index, raw in enumerate(requests):
        try:
            prepared[index], running[index] = start_request(engine, raw, index)
        except PersonaJudgeError as exc:
            fail(index, exc)
    results: dict[int, GenerationResult] = {}
    if running:
        results = decode_shared(engine.backend, prepared, running, fail)
    outcomes: list[GenerationResult | PersonaJudgeError] = []
    for index in range(len(requests)):
        outcomes.append(failed[index] if index in failed else results[index])
    return outcomes


def _name_request(exc: PersonaJudgeError, index: int) -> None:
    """Record the index of the request that caused ``exc`` and prefix its message with it."""
    exc.request_index = index
    already_named = str(exc.args[0]).startswith(f"request {index} ") if exc.args else False
    if exc.args and isinstance(exc.args[0], str) and not already_named:
        exc.args = (f"request {index}: {exc.args[0]}", *exc.args[1:])
