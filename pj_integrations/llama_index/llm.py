"""LlamaIndex LLM for Persona-judge decoding: :class:`PersonaJudgeLLM`."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, field_serializer, model_validator
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.llm import ToolSelection
from pydantic import ValidationError
from typing_extensions import Self

from pj_core.backends.hf.models import DEFAULT_MODEL
from pj_core.calls import (
    GENERATION_OPTIONS,
    AdapterSettings,
    CallRequest,
    PersonaSources,
    build_call,
    check_setting_names,
    field_names,
    prompt_overhead,
    settings_error,
    shared_engine,
)
from pj_core.engine import PersonaJudge
from pj_core.errors import InvalidGenerationConfigError
from pj_core.personas import PersonaProfile, PreferenceSpec
from pj_core.results import GenerationResult
from pj_core.settings import DEFAULTS
from pj_core.threads import iterate_in_thread, last_in_thread
from pj_integrations.llama_index.batching import BatchCalls
from pj_integrations.llama_index.messages import (
    chat_chunks,
    chat_conversation,
    chat_response,
    completion_chunks,
    completion_conversation,
    completion_response,
)
from pj_integrations.llama_index.structured import ConstrainedStructuredLLM
from pj_integrations.llama_index.tools import is_tool_result, tool_options, tool_selections

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool


class PersonaJudgeLLM(BatchCalls, ConstrainedStructuredLLM):
    """A LlamaIndex LLM that answers with Persona-judge decoding on a local model.

    Personas come from exactly one of ``preferences`` (catalog names or free-text
    sentences), ``persona`` (a :class:`~pj_core.personas.PersonaProfile`) or ``profile_id``
    (a user whose profile is saved in ``profile_store``). A saved profile's generation
    defaults apply to the settings you left at their defaults, never to ones you set. The
    persona and generation settings (all but ``model`` and ``profile_store``) can be
    overridden for one call with keyword arguments of the same names
    (``llm.complete("Hi", preferences=["humor"], max_tokens=16)``; ``user_id=`` is accepted
    as a synonym of ``profile_id=``); a call's persona option replaces the object's. Any
    other keyword argument is an :class:`~pj_core.errors.InvalidGenerationConfigError`.

    The async methods decode in a worker thread. Cancelling the awaiting task (or leaving a
    stream) frees the caller at once and stops decoding at the next token.

    Messages are rendered with the model's own chat template; ``system_prompt`` (like any
    system message) is combined with each persona's text in the system turn. Responses
    carry the decoding statistics in ``additional_kwargs`` (``stats``, ``finish_reason``,
    ``prompt_tokens``, ``completion_tokens``, ``personas``). ``raw`` is a dict, as
    LlamaIndex's callbacks expect (``TokenCountingHandler`` reads its ``usage``):
    ``{"usage": {...}, "result": GenerationResult}``. While streaming, each chunk's ``raw`` is
    ``{"event": StreamEvent}``, and the last chunk carries the statistics, the usage and the
    result.

    For several users, make one copy each: ``llm.model_copy(update={"profile_id": "bob"})``.
    Copies share the loaded weights (one engine per model spec per process). For many
    prompts at once, :meth:`complete_batch` and :meth:`chat_batch` answer them all in ONE
    batched decode, each answer the one :meth:`complete` / :meth:`chat` gives.

    Example:
        >>> from llama_index.core.llms import ChatMessage
        >>> llm = PersonaJudgeLLM(preferences=["concise", "expert"], max_tokens=48, seed=1)
        >>> reply = llm.chat([ChatMessage(role="user", content="What is RAG?")])  # doctest: +SKIP
        >>> reply.additional_kwargs["stats"]["acceptance_rate"]  # doctest: +SKIP
        0.83
        >>> alice = llm.model_copy(update={"preferences": None, "profile_id": "alice"})
        >>> alice.profile_id, alice.model == llm.model
        ('alice', True)
        >>> replies = llm.complete_batch(["What is RAG?", "What is BM25?"])  # doctest: +SKIP
        >>> [r.additional_kwargs["stats"]["strategy"] for r in replies]  # doctest: +SKIP
        ['lockstep', 'lockstep']
    """

    model: str = Field(
        default=DEFAULT_MODEL,
        description="Model alias ('smollm2-135m-instruct', 'gemma3-270m'), path or hub id.",
    )
    backend: str | None = Field(
        default=None, description="'transformers' (None) or 'llama.cpp' (the GGUF as it is)."
    )
    allowed_models: list[str] | None = Field(
        default=None,
        description="Specs a call's model= may name besides `model` and the built-in aliases.",
    )
    preferences: PreferenceSpec | None = Field(
        default=None, description="Catalog preference names or free-text sentences."
    )
    persona: PersonaProfile | None = Field(
        default=None, description="A PersonaProfile giving preferences and generation defaults."
    )
    profile_id: str | None = Field(
        default=None, description="A user id whose profile is saved in profile_store."
    )
    profile_store: Any = Field(
        default=None,
        exclude=True,
        description="A store object, a SQLite path or a postgresql:// URL for profile_id "
        "(None: default store).",
    )
    # Generation settings: None leaves the user's saved default, else the engine's
    # (pj_core.settings.DEFAULTS), so the defaults live in one place.
    lookahead: int | None = Field(default=None, description="Draft tokens per round (λ).")
    alternate: bool | None = Field(default=None, description="Swap draft and judge every round.")
    strategy: Literal["speculative", "lockstep", "auto"] | None = Field(
        default=None, description="Decoding strategy of the engine."
    )
    temperature: float | None = Field(
        default=None, description="Sampling temperature; 0 is greedy."
    )
    top_k: int | None = Field(default=None, description="Top-k filter; 0 switches it off.")
    top_p: float | None = Field(default=None, description="Nucleus filter in (0, 1].")
    strength: float | None = Field(
        default=None,
        description="How strongly the preferences act (>= 0; 0: Persona-judge exactly): each "
        "persona is guided away from the conversation with no persona text.",
    )
    neutral_system: str | None = Field(
        default=None, description="System text of the neutral row strength guides against."
    )
    decoder: Literal["persona-judge", "pool"] | None = Field(
        default=None,
        description="persona-judge (draft and judge rounds) or pool (every token from the pool "
        "of all personas).",
    )
    max_tokens: int | None = Field(default=None, description="Most new tokens per answer.")
    stop: list[str] | None = Field(default=None, description="Strings that end the answer.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    parallel_tool_calls: bool | None = Field(
        default=None,
        description="Let one answer hold several tool calls where the caller allows them "
        "(allow_parallel_tool_calls). Off by default: small models given the choice repeat one "
        "call until the budget runs out, and an agent makes its next call in its next step.",
    )
    tool_choice_after_tool: str | None = Field(
        default=None,
        description="tool_choice of an answer that follows a tool's result when the caller "
        "sets none (FunctionAgent sets one for its first step only). 'none' makes that answer "
        "text: a small model given the choice calls the same tool again, and the agent loop "
        "runs out of iterations. None: 'auto'.",
    )
    engine: PersonaJudge | None = Field(
        default=None,
        exclude=True,
        description="A ready engine to use instead of loading `model` (e.g. a custom model).",
    )

    def __init__(self, **data: Any) -> None:
        # Unknown or bad settings: typed errors saying what to fix, at construction.
        check_setting_names(data, field_names(type(self)), type(self).__name__)
        if data.get("messages_to_prompt") is not None:
            raise InvalidGenerationConfigError(
                "PersonaJudgeLLM renders chat messages with the model's own chat template (the "
                "personas go in its system turn), so messages_to_prompt would be ignored; drop "
                "it (complete() honours completion_to_prompt)"
            )
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise settings_error(exc, type(self).__name__) from None

    @model_validator(mode="after")
    def _check_settings(self) -> Self:
        self._settings().check()
        return self

    @classmethod
    def class_name(cls) -> str:
        return "PersonaJudgeLLM"

    @field_serializer("persona")
    def _persona_as_data(self, persona: PersonaProfile | None) -> dict[str, Any] | None:
        # JSON-ready (timestamps as text) so LlamaIndex's to_json()/from_json() round-trip.
        return None if persona is None else persona.model_dump(mode="json")

    # ------------------------------------------------------------------ engine and settings

    def get_engine(self) -> PersonaJudge:
        """The engine this object decodes with (loaded on first use, shared per model spec)."""
        if self.engine is not None:
            return self.engine
        engine: PersonaJudge = shared_engine(self.model, self.backend).engine
        return engine

    @property
    def metadata(self) -> LLMMetadata:
        """``num_output`` is ``max_tokens``; ``context_window`` is the model's window less what
        the engine adds to the messages (chat template, persona texts:
        :func:`pj_core.calls.prompt_overhead`), so text LlamaIndex packs up to it still fits.
        LlamaIndex counts with ``Settings.tokenizer`` (tiktoken by default); to count in the
        model's tokens, set ``Settings.tokenizer = llm.get_engine().tokenizer.encode``."""
        engine = self.get_engine()
        return LLMMetadata(
            context_window=max(engine.context_window - prompt_overhead(engine, self._plan), 1),
            num_output=self.max_tokens or DEFAULTS.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=engine.name if self.engine is not None else self.model,
        )

    def _settings(self) -> AdapterSettings:
        return AdapterSettings(
            model=self.model,
            generation={name: getattr(self, name) for name in GENERATION_OPTIONS},
            personas=PersonaSources(self.preferences, self.persona, self.profile_id),
            profile_store=self.profile_store,
            engine=self.engine,
            allowed_models=self.allowed_models or (),
            backend=self.backend,
        )

    def _plan(self, conversation: list[dict[str, Any]], options: Mapping[str, Any]) -> CallRequest:
        # LlamaIndex has no per-run config carrying a user id.
        return build_call(self._settings(), conversation, options)

    # ------------------------------------------------------------------ prompts

    def _chat_conversation(self, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
        return chat_conversation(messages, self.system_prompt)

    def _completion_conversation(self, prompt: str, formatted: bool) -> list[dict[str, str]]:
        return completion_conversation(
            prompt, formatted, self.system_prompt, self.completion_to_prompt
        )

    # ------------------------------------------------------------------ running the engine

    @staticmethod
    async def _result(plan: CallRequest) -> GenerationResult:
        """The call decoded in a worker thread, as a stream: cancelling the caller stops it."""
        final = await last_in_thread(plan.stream)
        assert final.result is not None  # the engine's last event carries the result
        return final.result

    # ------------------------------------------------------------------ sync API

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Answer one prompt; ``kwargs`` override settings for this call.

        Example:
            >>> llm = PersonaJudgeLLM(preferences="humor")
            >>> llm.complete("Hi!", max_tokens=8).text  # doctest: +SKIP
            'Hello there, sunshine!'
        """
        plan = self._plan(self._completion_conversation(prompt, formatted), kwargs)
        return completion_response(plan.generate(), plan)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Stream an answer: each chunk's ``text`` is cumulative and ``delta`` the new piece."""
        plan = self._plan(self._completion_conversation(prompt, formatted), kwargs)
        return completion_chunks(plan.stream(), plan)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer a conversation rendered with the model's chat template."""
        plan = self._plan(self._chat_conversation(messages), kwargs)
        return chat_response(plan.generate(), plan)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream a chat answer; ``message.content`` is cumulative, ``delta`` the new piece."""
        plan = self._plan(self._chat_conversation(messages), kwargs)
        return chat_chunks(plan.stream(), plan)

    # ------------------------------------------------------------------ tools
    # FunctionCallingLLM's chat_with_tools / achat_with_tools / stream_chat_with_tools call
    # this hook, then chat / achat / stream_chat with what it returns.

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The ``chat`` arguments of a call with ``tools``: the messages, the tools as
        OpenAI-style dicts and ``tool_choice`` ("auto", "required" (also when
        ``tool_required``), "none" or a tool's name); the answer is then text or calls that
        name one of the tools with valid arguments, by construction. Several calls in one
        answer need both ``allow_parallel_tool_calls`` and the ``parallel_tool_calls`` field.
        After a tool's result, with no ``tool_choice`` and no ``tool_required``, the
        ``tool_choice_after_tool`` field chooses.

        Raises:
            InvalidToolError: a tool LlamaIndex cannot describe, or an unknown ``tool_choice``.
        """
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(
                user_msg if isinstance(user_msg, ChatMessage) else ChatMessage(content=user_msg)
            )
        if tool_choice is None and not tool_required and messages and is_tool_result(messages[-1]):
            tool_choice = self.tool_choice_after_tool
        options = tool_options(
            tools,
            tool_choice=tool_choice,
            tool_required=tool_required,
            parallel=allow_parallel_tool_calls and bool(self.parallel_tool_calls),
        )
        return {"messages": messages, **options, **kwargs}

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The tool calls of a ``chat_with_tools`` response (its message's ``ToolCallBlock`` s).

        Raises:
            ValueError: no call in the response, with ``error_on_no_tool_call``.

        Example:
            >>> from llama_index.core.tools import FunctionTool
            >>> def add(a: int, b: int) -> int:
            ...     '''Add two integers.'''
            ...     return a + b
            >>> llm = PersonaJudgeLLM(preferences=["concise", "expert"], max_tokens=64)
            >>> reply = llm.chat_with_tools([FunctionTool.from_defaults(add)],
            ...                             "What is 2 + 3?", tool_required=True)  # doctest: +SKIP
            >>> llm.get_tool_calls_from_response(reply)[0].tool_kwargs  # doctest: +SKIP
            {'a': 2, 'b': 3}
        """
        return tool_selections(response, error_on_no_tool_call)

    # ------------------------------------------------------------------ async API
    # Decoding is CPU/GPU-bound and synchronous; it runs in a worker thread so that other
    # coroutines keep running while tokens are produced.

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        """Async :meth:`complete`; decoding runs in a worker thread and stops within a
        token when the awaiting task is cancelled (e.g. ``asyncio.wait_for``)."""
        conversation = self._completion_conversation(prompt, formatted)
        plan = await asyncio.to_thread(self._plan, conversation, kwargs)
        return completion_response(await self._result(plan), plan)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        """Async :meth:`stream_complete`; tokens are decoded in a worker thread."""
        conversation = self._completion_conversation(prompt, formatted)
        plan = await asyncio.to_thread(self._plan, conversation, kwargs)

        async def chunks() -> CompletionResponseAsyncGen:
            stream = iterate_in_thread(lambda: completion_chunks(plan.stream(), plan))
            async for chunk in stream:
                yield chunk

        return chunks()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Async :meth:`chat`; decoding runs in a worker thread and stops within a token
        when the awaiting task is cancelled."""
        conversation = self._chat_conversation(messages)
        plan = await asyncio.to_thread(self._plan, conversation, kwargs)
        return chat_response(await self._result(plan), plan)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        """Async :meth:`stream_chat`; tokens are decoded in a worker thread."""
        conversation = self._chat_conversation(messages)
        plan = await asyncio.to_thread(self._plan, conversation, kwargs)

        async def chunks() -> ChatResponseAsyncGen:
            stream = iterate_in_thread(lambda: chat_chunks(plan.stream(), plan))
            async for chunk in stream:
                yield chunk

        return chunks()
