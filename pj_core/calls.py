"""What an adapter call means: the one request builder both framework adapters share.

An adapter (LangChain's ``ChatPersonaJudge``, LlamaIndex's ``PersonaJudgeLLM``) holds
settings under the frameworks' option names and receives calls with per-call options. Turning
them into a decode is policy, and it lives here, once, so the adapters only translate types:

- :func:`build_call`: the :class:`CallRequest` of one call (engine, conversation, personas and
  ``generate`` keyword arguments) from the instance's :class:`AdapterSettings`, the call's
  options and the user id of the framework's run config. It checks the options, picks the
  personas (:func:`choose_personas`), merges generation settings (:func:`generation_kwargs`),
  finds the shared engine and adds the prompt layout's stop strings.
- :func:`shared_engine`: one :class:`~pj_core.engine.PersonaJudge` per model spec per process,
  loaded lazily on first use and thread safe, so any number of adapter instances on the same
  model share one copy of the weights;
- :func:`choose_personas`: which persona source wins for a call (per-call arguments, then a
  user id from the framework's config, then the instance's defaults) and the personas and
  user generation defaults it gives;
- :func:`generation_kwargs`: the keyword arguments for ``PersonaJudge.generate`` from the
  adapter's fields, the user's saved defaults and per-call overrides, in that order;
- :func:`stats_dict`: the Persona-judge statistics as plain JSON-able data for metadata;
- :func:`run_batch`: many calls as requests of ONE ``PersonaJudge.generate_batch``, a request
  that fails getting its own error.

Nothing here imports LangChain or LlamaIndex.

Example:
    >>> generation_kwargs(defaults={"temperature": 0.7, "max_tokens": 64}, explicit=set(),
    ...                   profile_defaults={"temperature": 0.2}, overrides={"seed": 1})
    {'temperature': 0.2, 'max_new_tokens': 64, 'seed': 1}
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pj_core.backends import backend_name
from pj_core.decoding.generation_config import GenerationConfig
from pj_core.errors import (
    ContextOverflowError,
    InvalidGenerationConfigError,
    InvalidPersonaError,
    PersonaJudgeError,
)
from pj_core.personas import (
    Persona,
    PersonaProfile,
    PreferenceSpec,
    resolve_personas,
)
from pj_core.prompts import stop_strings

if TYPE_CHECKING:
    from pj_core.batch import BatchRequest
    from pj_core.engine import PersonaJudge
    from pj_core.results import GenerationResult, StreamEvent

ProfileStoreLike = Any
"""A :class:`pj_core.personas.store.AbstractProfileStore`, a SQLite path, a ``postgresql://`` URL,
or ``None`` (the default store). Typed loosely so this module imports without the store module."""

GENERATION_OPTIONS: tuple[str, ...] = (
    "lookahead",
    "alternate",
    "strategy",
    "temperature",
    "top_k",
    "top_p",
    "strength",
    "neutral_system",
    "decoder",
    "max_tokens",
    "seed",
    "stop",
)
"""Adapter option names that map onto ``PersonaJudge.generate`` arguments (``max_tokens`` is
the frameworks' name for the engine's ``max_new_tokens``)."""

PERSONA_OPTIONS: tuple[str, ...] = ("preferences", "persona", "profile_id", "user_id")
"""Per-call option names that choose the personas."""

TOOL_OPTIONS: tuple[str, ...] = ("tools", "tool_choice", "parallel_tool_calls", "response_format")
"""Per-call options that shape the answer (``PersonaJudge.generate``'s names); a framework
binds them to a call (LangChain's ``bind_tools``, ``with_structured_output``)."""

CALL_OPTIONS: tuple[str, ...] = (*GENERATION_OPTIONS, *PERSONA_OPTIONS, *TOOL_OPTIONS, "model")
"""Every per-call option an adapter accepts (``model``: another model spec for this call)."""

_ENGINE_NAMES = {"max_tokens": "max_new_tokens"}
ADAPTER_BUDGET = "max_tokens"  # the answer budget's name in both adapters and the server
# The engine arguments that change a call's prompt (count_prompt_tokens takes these).
_PROMPT_OPTIONS = frozenset(
    {"strength", "neutral_system", "response_format", "tools", "tool_choice", "parallel_tool_calls"}
)
# A saved profile stores the engine's names; the adapters expose the frameworks' names.
_PROFILE_NAMES = {"max_new_tokens": "max_tokens"}


@dataclass(frozen=True)
class SharedModel:
    """A loaded model and the engine built on it, shared by every adapter on one spec.

    Attributes:
        loaded: the :class:`pj_core.backends.hf.models.LoadedModel` (tokenizer, name, context
        window). engine: the :class:`pj_core.engine.PersonaJudge` that decodes with it.
    """

    loaded: Any
    engine: Any


# Engines by model identity (every spelling of a spec shares one), least recently used first,
# at most max_loaded_models() of them.
_SHARED: OrderedDict[str, SharedModel] = OrderedDict()
_SHARED_LOCK = threading.Lock()  # guards _SHARED (held for microseconds)
_LOADING_LOCK = threading.Lock()  # one load at a time


def shared_engine(spec: str | os.PathLike[str], backend: str | None = None) -> SharedModel:
    """The process-wide :class:`SharedModel` for ``spec`` on ``backend`` (``"transformers"``,
    the default, or ``"llama.cpp"``), loading it on first use.

    Every spelling of one model (an alias and its GGUF file, a relative and an absolute path)
    gets the same engine (``pj_core.backends.hf.models.model_identity``). Loading happens once
    even when many threads ask at the same time; later calls return the cached object without
    touching the weights. At most ``max_loaded_models()`` engines stay cached (default 3,
    ``$PJ_MAX_LOADED_MODELS``): loading one more releases the least recently used, whose
    memory is freed once no running call holds it.

    Raises:
        ModelNotFoundError, ModelPackageMissingError, ModelLoadError: from ``load_model``.
        InvalidModelOptionError: an unknown backend.
        BackendNotInstalledError: llama.cpp without llama-cpp-python.
    """
    from pj_core.backends.hf.models import max_loaded_models

    on = backend_name(backend)
    key = _engine_key(spec, on)
    limit = max_loaded_models()  # a bad setting fails before any loading
    shared = _use(key)
    if shared is not None:
        return shared
    # One loading lock for all specs: loading two models at once gains nothing on a small
    # machine. Calls on models already loaded do not wait for it.
    with _LOADING_LOCK:
        shared = _use(key)
        if shared is None:
            from pj_core.backends.loading import load_model
            from pj_core.engine import PersonaJudge

            engine = PersonaJudge.from_pretrained(spec, backend=on)
            loaded = load_model(spec, backend=on)  # the same object: load_model keeps it
            shared = SharedModel(loaded=loaded, engine=engine)
            with _SHARED_LOCK:
                _SHARED[key] = shared
                while len(_SHARED) > limit:
                    _SHARED.popitem(last=False)
    return shared


def _use(key: str) -> SharedModel | None:
    """The cached engine of ``key``, marked most recently used."""
    with _SHARED_LOCK:
        shared = _SHARED.get(key)
        if shared is not None:
            _SHARED.move_to_end(key)
        return shared


def _engine_key(spec: str | os.PathLike[str], backend: str | None) -> str:
    """The key of ``spec``'s engine on ``backend`` in :data:`_SHARED`: the model's identity
    (every spelling of it), marked with the backend unless it is transformers."""
    from pj_core.backends.hf.models import model_identity

    on = backend_name(backend)
    return model_identity(spec) if on == "transformers" else f"{on}:{model_identity(spec)}"


def is_loaded(spec: str | os.PathLike[str], backend: str | None = None) -> bool:
    """Whether :func:`shared_engine` holds a loaded engine for ``spec`` (any spelling of it)
    on ``backend``."""
    try:
        return _engine_key(spec, backend) in _SHARED
    except PersonaJudgeError:  # not a model (or backend) at all: certainly not loaded
        return False


@dataclass(frozen=True)
class PersonaChoice:
    """The personas of one call and where they came from.

    Attributes:
        personas: the persona prefixes to decode with (two or more).
        source: ``"profile:<user id>"``, ``"persona"`` or ``"preferences"``.
        generation_defaults: the user's saved generation defaults (adapter names), empty
            unless the personas came from a profile.
    """

    personas: list[Persona]
    source: str
    generation_defaults: dict[str, Any]


@dataclass(frozen=True)
class PersonaSources:
    """The persona options given at one level (the call, or the instance)."""

    preferences: PreferenceSpec | None = None
    persona: PersonaProfile | None = None
    profile_id: str | None = None

    def given(self) -> list[str]:
        """Names of the options that are set."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


def choose_personas(
    call: PersonaSources,
    config_user_id: str | None,
    instance: PersonaSources,
    store: ProfileStoreLike,
) -> PersonaChoice:
    """Pick the persona source of a call and resolve it.

    Order: the call's own options (``preferences=``, ``persona=``, ``profile_id=``/``user_id=``),
    then ``config_user_id`` (the user id from the framework's run config), then the instance's
    options. At one level at most one option may be set.

    Raises:
        InvalidPersonaError: two options at one level, none anywhere, or an invalid persona.
        ProfileNotFoundError: a user id with no saved profile in ``store``.
    """
    for level, sources in (("call", call), ("instance", instance)):
        given = sources.given()
        if len(given) > 1:
            raise InvalidPersonaError(
                f"{' and '.join(given)} were both given to the {level}; give only one of "
                "preferences=, persona= or profile_id= (a user id)"
            )
    if call.given():
        return _resolve(call, store)
    if config_user_id is not None:
        return _resolve(PersonaSources(profile_id=config_user_id), store)
    if instance.given():
        return _resolve(instance, store)
    raise InvalidPersonaError(
        "no personas: set preferences= (e.g. ['humor', 'concise']), persona= (a "
        "PersonaProfile) or profile_id= (a user id in profile_store) on the model, pass one "
        "per call, or put a 'user_id' in the run config's 'configurable'"
    )


def _resolve(sources: PersonaSources, store: ProfileStoreLike) -> PersonaChoice:
    if sources.profile_id is not None:
        profile = load_profile(sources.profile_id, store)
        return PersonaChoice(
            personas=resolve_personas(profile),
            source=f"profile:{profile.user_id}",
            generation_defaults=profile_generation_defaults(profile),
        )
    if sources.persona is not None:
        if not isinstance(sources.persona, PersonaProfile):
            raise InvalidPersonaError(
                "persona= takes a PersonaProfile; for names or free text use preferences=, "
                f"got {type(sources.persona).__name__}"
            )
        return PersonaChoice(
            personas=resolve_personas(sources.persona),
            source="persona",
            generation_defaults=profile_generation_defaults(sources.persona),
        )
    assert sources.preferences is not None  # given() was non-empty
    return PersonaChoice(
        personas=resolve_personas(sources.preferences), source="preferences", generation_defaults={}
    )


def call_user_id(options: Mapping[str, Any]) -> str | None:
    """The user id a call names with ``profile_id=`` or ``user_id=`` (they are synonyms).

    Raises:
        InvalidPersonaError: both given and different, or not a string.

    Example:
        >>> call_user_id({"user_id": "alice"})
        'alice'
    """
    profile_id, user_id = options.get("profile_id"), options.get("user_id")
    if profile_id is not None and user_id is not None and profile_id != user_id:
        raise InvalidPersonaError(
            f"profile_id={profile_id!r} and user_id={user_id!r} disagree; pass one of them"
        )
    chosen = profile_id if profile_id is not None else user_id
    if chosen is not None and not isinstance(chosen, str):
        raise InvalidPersonaError(
            f"a user id must be a string, got {type(chosen).__name__}: {chosen!r}"
        )
    return chosen


def load_profile(user_id: str, store: ProfileStoreLike) -> PersonaProfile:
    """The saved profile of ``user_id`` in ``store`` (a store object, a path, or ``None``).

    Raises:
        InvalidPersonaError: an invalid user id.
        ProfileNotFoundError: no such profile.
    """
    from pj_core.personas.store import load_profile as load_from_store

    return load_from_store(user_id, store)


def profile_revision(user_id: str, store: ProfileStoreLike) -> int | None:
    """The revision of ``user_id``'s saved profile; ``None`` when there is none, or the id is
    invalid (a cache key only needs to change when the profile does).

    Example:
        >>> from pj_core.personas.store import open_store
        >>> with open_store(":memory:") as store:
        ...     _ = store.put(PersonaProfile(user_id="alice", preferences=["humor"]))
        ...     profile_revision("alice", store), profile_revision("bob", store)
        (1, None)
    """
    try:
        return load_profile(user_id, store).revision
    except PersonaJudgeError:
        return None


def profile_generation_defaults(profile: PersonaProfile) -> dict[str, Any]:
    """A profile's saved generation defaults under the adapters' option names."""
    return {_PROFILE_NAMES.get(k, k): v for k, v in profile.generation_kwargs().items()}


def check_call_options(kwargs: Mapping[str, Any], extra_allowed: Iterable[str] = ()) -> None:
    """Reject per-call keyword arguments that no adapter option matches.

    Raises:
        InvalidGenerationConfigError: naming the unknown options and listing the valid ones.
    """
    allowed = {*GENERATION_OPTIONS, *PERSONA_OPTIONS, *extra_allowed}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise InvalidGenerationConfigError(
            f"unknown option(s) {', '.join(unknown)}; per-call options are: "
            + ", ".join(sorted(allowed))
        )


# Names people write for an adapter setting that has another name.
_SETTING_SYNONYMS = {
    "max_new_tokens": "max_tokens",
    "max_length": "max_tokens",
    "num_predict": "max_tokens",
    "user_id": "profile_id",
    "personas": "preferences",
    "model_name": "model",
}


def check_setting_names(data: Mapping[str, Any], known: Iterable[str], owner: str) -> None:
    """Reject constructor arguments that are no setting of ``owner`` (a typo would otherwise
    be dropped without a word), suggesting the setting meant. ``known``: the setting names
    (for a pydantic model, :func:`field_names`).

    Raises:
        InvalidGenerationConfigError: naming each unknown argument and its likely setting.

    Example:
        >>> check_setting_names({"temprature": 0.3}, ["temperature", "top_p"], "Chat")
        Traceback (most recent call last):
        pj_core.errors.InvalidGenerationConfigError: Chat has no setting 'temprature' (did you mean 'temperature'?)
    """  # noqa: E501
    import difflib

    names = set(known)
    unknown = [name for name in data if name not in names]
    if not unknown:
        return
    parts = []
    for name in unknown:
        meant = _SETTING_SYNONYMS.get(name)
        close = [meant] if meant in names else difflib.get_close_matches(name, names, 1, 0.75)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise InvalidGenerationConfigError(f"{owner} has no setting " + ", ".join(parts))


def field_names(model: type[Any]) -> set[str]:
    """A pydantic model class's field names and their aliases."""
    fields = model.model_fields
    return {*fields, *(field.alias for field in fields.values() if field.alias)}


def generation_kwargs(
    *,
    defaults: Mapping[str, Any],
    explicit: set[str],
    profile_defaults: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """Keyword arguments for ``PersonaJudge.generate`` (engine names, ``None`` dropped).

    Precedence, lowest first: the adapter's field values (``defaults``), the user's saved
    profile defaults, the fields the developer set explicitly on the instance (``explicit``
    names them), then per-call ``overrides``. A profile thus personalises what the developer
    left at its default, but never overrides a deliberate setting.
    """
    merged: dict[str, Any] = {}
    for name in GENERATION_OPTIONS:
        value = defaults.get(name)
        if name in profile_defaults and name not in explicit:
            value = profile_defaults[name]
        if name in overrides and overrides[name] is not None:
            value = overrides[name]
        if value is not None:
            merged[_ENGINE_NAMES.get(name, name)] = value
    return merged


def stats_dict(stats: Any) -> dict[str, Any]:
    """Persona-judge statistics as plain data, derived rates included.

    Example:
        >>> from pj_core.results import GenerationStats
        >>> s = GenerationStats(tokens=4, rounds=1, drafted=4, accepted=3, resampled=1, bonus=0,
        ...                     forward_passes=3, prefill_seconds=0.1, decode_seconds=0.2,
        ...                     strategy="speculative")
        >>> stats_dict(s)["acceptance_rate"]
        0.75
    """
    data = dataclasses.asdict(stats)
    data["acceptance_rate"] = stats.acceptance_rate
    data["tokens_per_second"] = stats.tokens_per_second
    return data


# ----------------------------------------------------------------------------- batches


def unbatchable_options(options: Mapping[str, Any]) -> list[str]:
    """Names in ``options`` (``PersonaJudge.generate`` keyword arguments) that a
    :class:`pj_core.batch.BatchRequest` has no field for; such a call must run on its own.

    Example:
        >>> unbatchable_options({"seed": 1, "max_new_tokens": 8})
        []
        >>> unbatchable_options({"seed": 1, "logits_hook": print})
        ['logits_hook']
    """
    from pj_core.batch import BatchRequest

    fields = {field.name for field in dataclasses.fields(BatchRequest)}
    return sorted(set(options) - fields)


def batch_request(
    conversation: Any, personas: Sequence[Persona], options: Mapping[str, Any]
) -> BatchRequest:
    """The ``generate_batch`` request of one adapter call: the same conversation, personas and
    keyword arguments the call would hand ``PersonaJudge.generate``.

    Raises:
        InvalidGenerationConfigError: ``options`` hold an argument a batch cannot take (check
            :func:`unbatchable_options` first to run such a call on its own instead).

    Example:
        >>> batch_request("Hi!", resolve_personas(["humor"]), {"seed": 3}).seed
        3
    """
    from pj_core.batch import BatchRequest

    unknown = unbatchable_options(options)
    if unknown:
        raise InvalidGenerationConfigError(
            f"option(s) {', '.join(unknown)} cannot be batched; run this call on its own"
        )
    return BatchRequest(conversation=conversation, personas=list(personas), **options)


def run_batch(
    engine: PersonaJudge, requests: Sequence[BatchRequest]
) -> list[GenerationResult | PersonaJudgeError]:
    """Run ``requests`` through ONE ``engine.generate_batch``; results in request order.

    A request that the engine rejects, or whose decoding fails on its own, gets its typed
    error in its slot, with the message a single call would have given
    (``generate_batch(..., return_exceptions=True)``): a bad request never costs the others
    their answers, and nothing is decoded twice. Other exceptions (a failure of the model
    itself) propagate.

    Example:
        >>> from tests._tiny import make_tiny_model, make_tiny_tokenizer
        >>> from pj_core.engine import PersonaJudge
        >>> tokenizer = make_tiny_tokenizer()
        >>> pj = PersonaJudge(make_tiny_model(len(tokenizer)), tokenizer, context_window=64)
        >>> personas = resolve_personas(["be funny", "be brief"])
        >>> good = batch_request("hello", personas, {"seed": 1, "max_new_tokens": 4})
        >>> too_long = batch_request("hello", personas, {"max_new_tokens": 500})
        >>> [type(outcome).__name__ for outcome in run_batch(pj, [good, too_long, good])]
        ['GenerationResult', 'ContextOverflowError', 'GenerationResult']
    """
    outcomes = engine.generate_batch(requests, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, PersonaJudgeError):
            outcome.request_index = None  # an index into this batch, not the caller's list
        if isinstance(outcome, ContextOverflowError):
            outcome.naming_budget(ADAPTER_BUDGET)
    return outcomes


@contextlib.contextmanager
def adapter_names() -> Iterator[None]:
    """Within it, a :class:`ContextOverflowError`'s hint names the adapters' budget
    (``max_tokens``) instead of the engine's ``max_new_tokens``.

    Example:
        >>> with adapter_names():  # doctest: +ELLIPSIS
        ...     raise ContextOverflowError.over_budget(100, 50, 120)
        Traceback (most recent call last):
        pj_core.errors.ContextOverflowError: ... lower max_tokens to at most 20
    """
    try:
        yield
    except ContextOverflowError as exc:
        raise exc.naming_budget(ADAPTER_BUDGET) from None


def name_request(exc: PersonaJudgeError, index: int) -> PersonaJudgeError:
    """Put ``request <index>: `` in front of ``exc``'s message (as ``generate_batch`` does),
    so an error raised for one item of a batch says which item it was."""
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"request {index}: {exc.args[0]}", *exc.args[1:])
    return exc


# ----------------------------------------------------------------------------- the request builder


@dataclass(frozen=True)
class AdapterSettings:
    """What an adapter instance holds, under the frameworks' option names.

    Attributes:
        model: the model spec (alias or path) calls decode with unless they name another.
        generation: the instance's value (``None`` = not set) of each of
            :data:`GENERATION_OPTIONS`; set values count as deliberate, so a user's saved
            profile defaults never override them.
        personas: the instance's persona options (at most one set).
        profile_store: where ``user_id``/``profile_id`` profiles are read (``None``: the
            default store).
        engine: a ready engine to decode with instead of the shared one of ``model``.
        allowed_models: specs a call's ``model=`` may name besides ``model`` and the built-in
            aliases (:func:`call_model`).
        backend: what runs the model: ``"transformers"`` (``None``, the default) or
            ``"llama.cpp"`` (the GGUF file as it is; needs llama-cpp-python).
    """

    model: str | os.PathLike[str]
    generation: Mapping[str, Any]
    personas: PersonaSources = PersonaSources()
    profile_store: ProfileStoreLike = None
    engine: PersonaJudge | None = None
    allowed_models: Sequence[str | os.PathLike[str]] = ()
    backend: str | None = None

    def check(self) -> None:
        """Check the settings as the engine will (so an adapter fails at construction, not
        at its first call): generation values in range, at most one persona option, known
        preference names.

        Raises:
            InvalidGenerationConfigError, InvalidPersonaError: saying what to fix.
        """
        engine_names = {_ENGINE_NAMES.get(k, k): v for k, v in self.generation.items()}
        GenerationConfig.create(**{k: v for k, v in engine_names.items() if v is not None})
        given = self.personas.given()
        if len(given) > 1:
            raise InvalidPersonaError(
                f"{' and '.join(given)} were both set; give only one of "
                "preferences=, persona= or profile_id="
            )
        if self.personas.preferences is not None:
            resolve_personas(self.personas.preferences)  # unknown names and bad texts fail
        backend_name(self.backend)  # an unknown backend fails here too


@dataclass(frozen=True)
class CallRequest:
    """One call, resolved before any decoding: what the engine is asked and with what.

    Attributes:
        engine: the engine that decodes it.
        conversation: the ``{"role", "content"}`` turns.
        personas: the persona prefixes (two or more).
        persona_source: where they came from (``"profile:<user id>"``, ``"persona"`` or
            ``"preferences"``).
        generate_kwargs: the keyword arguments of ``engine.generate`` (engine names).
        model_name: the model as the call named it (the adapter's spec or the call's
            ``model=``; the engine's name for an adapter built on a ready engine).
    """

    engine: PersonaJudge
    conversation: list[dict[str, str]]
    personas: list[Persona]
    persona_source: str
    generate_kwargs: dict[str, Any]
    model_name: str

    def generate(self) -> GenerationResult:
        """Decode the call (``engine.generate``).

        Raises:
            ContextOverflowError: its hint names the adapters' ``max_tokens``.
        """
        with adapter_names():
            result: GenerationResult = self.engine.generate(
                self.conversation, self.personas, **self.generate_kwargs
            )
        return result

    def stream(self) -> Iterator[StreamEvent]:
        """Decode the call as a stream of events (``engine.stream``)."""
        with adapter_names():
            events: Iterator[StreamEvent] = self.engine.stream(
                self.conversation, self.personas, **self.generate_kwargs
            )
        return events

    def prompt_tokens(self) -> int:
        """The tokens this call's prompt takes in the context window: chat template, persona
        texts and tools included (:meth:`PersonaJudge.count_prompt_tokens`)."""
        counted = {k: v for k, v in self.generate_kwargs.items() if k in _PROMPT_OPTIONS}
        tokens: int = self.engine.count_prompt_tokens(self.conversation, self.personas, **counted)
        return tokens

    @property
    def batchable(self) -> bool:
        """Whether ``generate_batch`` can run this call (every option has a batch field)."""
        return not unbatchable_options(self.generate_kwargs)

    def batch_request(self) -> BatchRequest:
        """This call as a request of ``generate_batch`` (see :func:`batch_request`)."""
        return batch_request(self.conversation, self.personas, self.generate_kwargs)

    def info(self, result: GenerationResult) -> dict[str, Any]:
        """What a response carries besides its text, as plain data: statistics, finish
        reason, token counts and the personas with where they came from."""
        return {
            "stats": stats_dict(result.stats),
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": len(result.token_ids),
            "persona_source": self.persona_source,
            "personas": [{"name": p.name, "text": p.text} for p in self.personas],
        }


def build_call(
    settings: AdapterSettings,
    conversation: list[dict[str, str]],
    options: Mapping[str, Any],
    *,
    config_user_id: str | None = None,
) -> CallRequest:
    """The :class:`CallRequest` of one adapter call; the one place a call's meaning is decided.

    - ``options`` (the call's keyword arguments, frameworks' names) are checked against
      :data:`CALL_OPTIONS`;
    - the model is the call's ``model=`` if given, else the instance's; an instance built on
      a ready engine takes no other model;
    - the personas come from the call's options, then ``config_user_id`` (the user id of the
      framework's run config), then the instance (:func:`choose_personas`);
    - the generation settings merge instance, saved profile and call
      (:func:`generation_kwargs`);
    - the prompt layout's own stop strings are added (a base model without a chat template
      goes on to write the user's next turn; they end the reply there).

    Raises:
        InvalidGenerationConfigError: an unknown option or a bad model spec.
        InvalidPersonaError, ProfileNotFoundError: no usable personas.
        ModelNotFoundError, ModelPackageMissingError, ModelLoadError: loading the model.

    Example:
        >>> from tests._tiny import make_tiny_model, make_tiny_tokenizer
        >>> from pj_core.engine import PersonaJudge
        >>> tokenizer = make_tiny_tokenizer()
        >>> pj = PersonaJudge(make_tiny_model(len(tokenizer)), tokenizer)
        >>> settings = AdapterSettings(
        ...     model="tiny", generation={"temperature": 0.5}, engine=pj,
        ...     personas=PersonaSources(preferences=["be funny", "be brief"]))
        >>> call = build_call(settings, [{"role": "user", "content": "hello"}], {"seed": 1})
        >>> call.generate_kwargs, call.persona_source
        ({'temperature': 0.5, 'seed': 1}, 'preferences')
    """
    check_call_options(options, extra_allowed=("model", *TOOL_OPTIONS))
    spec = call_model(settings, options.get("model"))
    choice = choose_personas(
        PersonaSources(
            preferences=options.get("preferences"),
            persona=options.get("persona"),
            profile_id=call_user_id(options),
        ),
        config_user_id,
        settings.personas,
        settings.profile_store,
    )
    generation = {name: settings.generation.get(name) for name in GENERATION_OPTIONS}
    kwargs = generation_kwargs(
        defaults=generation,
        explicit={name for name, value in generation.items() if value is not None},
        profile_defaults=choice.generation_defaults,
        overrides={name: options[name] for name in GENERATION_OPTIONS if name in options},
    )
    kwargs.update({name: options[name] for name in TOOL_OPTIONS if options.get(name) is not None})
    engine = (
        settings.engine
        if settings.engine is not None
        else shared_engine(spec, settings.backend).engine
    )
    layout_stops = stop_strings(engine.tokenizer)
    if layout_stops:
        kwargs["stop"] = [*(kwargs.get("stop") or ()), *layout_stops]
    return CallRequest(
        engine=engine,
        model_name=engine.name if settings.engine is not None else os.fspath(spec),
        conversation=conversation,
        personas=choice.personas,
        persona_source=choice.source,
        generate_kwargs=kwargs,
    )


def call_model(settings: AdapterSettings, model: object) -> str | os.PathLike[str]:
    """The model spec a call decodes with: its ``model=`` if the adapter allows it, else the
    instance's.

    A call may name the instance's model (any spelling of it), a built-in alias, or a spec in
    ``settings.allowed_models``: a prompt-driven agent or a request handler that forwards
    options must not make the process load whatever path it is given. An adapter built on a
    ready engine takes no other model.

    Raises:
        InvalidGenerationConfigError: a spec that is not a string or path, or not allowed
            (nothing is loaded, and the message does not say whether the path exists).

    Example:
        >>> settings = AdapterSettings(model="smollm2-135m-instruct", generation={})
        >>> call_model(settings, "gemma3-270m")
        'gemma3-270m'
        >>> call_model(settings, "/etc")
        Traceback (most recent call last):
        ...
        pj_core.errors.InvalidGenerationConfigError: model='/etc' is not allowed in a call: ...
    """
    from pj_core.backends.hf.models import BUILTIN_MODELS

    if model is None:
        return settings.model
    if not isinstance(model, str | os.PathLike):
        raise InvalidGenerationConfigError(
            f"model must be a model alias or path, got {type(model).__name__}"
        )
    text = os.fspath(model)
    if settings.engine is not None:
        if text == os.fspath(settings.model):
            return model
        raise InvalidGenerationConfigError(
            f"model={text!r} was given to a call of an adapter built on a ready engine; build "
            "another adapter for that model"
        )
    trusted = [os.fspath(settings.model), *(os.fspath(m) for m in settings.allowed_models)]
    if text in trusted or text.strip().lower() in BUILTIN_MODELS:
        return model
    if _identity_or_none(text) in {_identity_or_none(m) for m in trusted} - {None}:
        return model  # another spelling of an allowed model
    raise InvalidGenerationConfigError(
        f"model={text!r} is not allowed in a call: a call may name the adapter's model "
        f"({trusted[0]!r}), a built-in alias ({', '.join(BUILTIN_MODELS)}) or a model listed "
        "in the adapter's allowed_models; to decode with this one, add it there (e.g. "
        f"allowed_models=[{text!r}]) or build an adapter with model={text!r}"
    )


def _identity_or_none(spec: str | os.PathLike[str]) -> str | None:
    """:func:`~pj_core.backends.hf.models.model_identity`, or None for a spec that names no
    model."""
    from pj_core.backends.hf.models import model_identity

    try:
        return model_identity(spec)
    except PersonaJudgeError:
        return None


def settings_error(exc: ValidationError, owner: str) -> PersonaJudgeError:
    """A pydantic error from an adapter's constructor as one typed error: the library's own
    error if a validator raised one, else one listing every bad field (persona fields give
    :class:`InvalidPersonaError`, others :class:`InvalidGenerationConfigError`)."""
    errors = exc.errors()
    if len(errors) == 1:
        original = errors[0].get("ctx", {}).get("error")
        if isinstance(original, PersonaJudgeError):
            return original
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        parts.append(f"{where}: {str(error['msg']).removeprefix('Value error, ')}")
    fields = {str(error["loc"][0]) for error in errors if error["loc"]}
    persona_only = bool(fields) and fields <= {"preferences", "persona", "profile_id"}
    kind = InvalidPersonaError if persona_only else InvalidGenerationConfigError
    return kind(f"invalid {owner} settings: " + "; ".join(parts))


_TOKENIZERS: dict[int, tuple[Any, threading.Lock]] = {}
_TOKENIZERS_LOCK = threading.Lock()


def counting_tokenizer(engine: PersonaJudge) -> tuple[Any, threading.Lock]:
    """A private copy of the engine's tokenizer for counting tokens, with its own lock.

    Fast tokenizers refuse concurrent use; a copy keeps token counting (an adapter's
    ``get_token_ids``) from contending with, or breaking, generations in other threads.
    """
    key = id(engine)
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = (copy.deepcopy(engine.tokenizer), threading.Lock())
        return _TOKENIZERS[key]


def prompt_overhead(
    engine: PersonaJudge,
    plan: Callable[[list[dict[str, str]], Mapping[str, Any]], CallRequest],
) -> int:
    """Tokens an adapter's call adds to its messages' own text: the chat template, the
    longest persona text (and the neutral prompt of a guided call), measured on a system and
    a user message of one word each. A framework that packs text up to a context window
    (LlamaIndex's prompt helper) must leave this much room.

    ``plan(conversation, options)`` is the adapter's request builder; when it fails (no
    usable personas yet, which the call itself will report), the template alone is counted.
    """
    from pj_core.prompts import render_ids

    word = "hello"
    conversation = [{"role": "system", "content": word}, {"role": "user", "content": word}]
    words = 2 * len(engine.tokenizer.encode(word, add_special_tokens=False))
    try:
        tokens = plan(conversation, {}).prompt_tokens()
    except PersonaJudgeError:
        tokens = len(render_ids(engine.tokenizer, conversation, None))
    return max(tokens - words, 0)
