"""The OpenAI chat-completions request as the server reads it, and what it means for the engine.

- :class:`ChatCompletionRequest`: the request body. It takes OpenAI's field names and types; a
  field OpenAI does not define is refused (a typo such as ``"temprature"`` must not be ignored
  silently), except ``persona_judge``, this server's own extension (:class:`PersonaJudgeOptions`).
- :func:`check_supported`: OpenAI fields this server cannot honour (``n`` > 1, ``logprobs``,
  penalties, ...) are refused when set to anything but their no-op value, so a client never
  gets an answer that silently ignored what it asked for.
- :func:`call_options`: the request as the per-call options of :func:`pj_core.calls.build_call`
  (``tools``, ``tool_choice`` and ``response_format`` become the engine's constrained decoding:
  :func:`response_format`);
- :func:`conversation`: the messages as the engine's ``{"role", "content"}`` turns.

Example:
    >>> body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "user": "alice",
    ...         "max_tokens": 8, "persona_judge": {"lookahead": 2}}
    >>> request = ChatCompletionRequest.model_validate(body)
    >>> call_options(request)
    {'user_id': 'alice', 'max_tokens': 8, 'lookahead': 2}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pj_core.errors import (
    InvalidConstraintError,
    InvalidGenerationConfigError,
    InvalidPromptError,
)
from pj_core.tools import tool_choice_name

# Fields of OpenAI's chat-completions request (``openai.types.chat.CompletionCreateParams``,
# plus ``stream``), grouped by what this server does with them.
IMPLEMENTED_FIELDS: frozenset[str] = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "n",
        "stop",
        "stream",
        "stream_options",
        "user",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
    }
)
"""Fields the server reads (typed fields of :class:`ChatCompletionRequest`)."""

IGNORED_FIELDS: frozenset[str] = frozenset(
    {
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "safety_identifier",
    }
)
"""OpenAI fields about the hosted service (billing, storage, caching, abuse tracking) that do
not change the answer: accepted and ignored."""

NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "moderation": (None,),
    "function_call": (None,),
    "functions": (None,),
}
"""OpenAI fields the server cannot honour, with the values that ask for nothing (accepted).
Any other value is refused by :func:`check_supported`."""

_HINTS = {
    "functions": "use tools",
    "function_call": "use tool_choice",
    "n": "send one request per answer",
}


class PersonaJudgeOptions(BaseModel):
    """The request's ``persona_judge`` object: Persona-judge's own settings for this call.

    Every field is optional; an unset field takes the user's saved profile default, then the
    engine's default.

    Attributes:
        preferences: catalog names or preference sentences to personalise with, instead of
            the ``user``'s saved profile.
        lookahead: λ, the tokens the draft persona proposes per round.
        strategy: ``"speculative"``, ``"lockstep"`` or ``"auto"``.
        strength: how strongly each persona's preferences are followed (0 = the paper).
        neutral_system: the system text of the neutral row that ``strength`` guides against.
        decoder: ``"persona-judge"`` or ``"pool"``.
        top_k: keep the k most likely tokens (0 = off).
        alternate: swap draft and judge every round.
    """

    model_config = ConfigDict(extra="forbid")

    preferences: list[str] | str | None = None
    lookahead: int | None = None
    strategy: str | None = None
    strength: float | None = None
    neutral_system: str | None = None
    decoder: str | None = None
    top_k: int | None = None
    alternate: bool | None = None


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class ChatMessage(BaseModel):
    """One message of OpenAI's ``messages``. ``content`` is text or a list of parts (text
    parts only); other keys a client echoes back (``refusal``, ``annotations``, ...) are kept
    and ignored."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` (OpenAI's names and types).

    Fields OpenAI does not define are refused (a 422 naming them); OpenAI fields that do not
    change the answer (:data:`IGNORED_FIELDS`) are accepted and ignored; OpenAI fields this
    server cannot honour are checked by :func:`check_supported`.
    """

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    persona_judge: PersonaJudgeOptions | None = None

    @model_validator(mode="after")
    def _known_fields_only(self) -> ChatCompletionRequest:
        known = IGNORED_FIELDS | NO_OP_VALUES.keys()
        unknown = sorted(set(self.model_extra or {}) - known)
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(map(repr, unknown))}: not part of OpenAI's chat "
                "completions request; Persona-judge settings go in the 'persona_judge' object"
            )
        return self


def check_supported(request: ChatCompletionRequest) -> None:
    """Refuse what the server would otherwise have to ignore.

    Raises:
        InvalidGenerationConfigError: ``n`` other than 1; ``max_tokens`` and
            ``max_completion_tokens`` that disagree; an OpenAI field of
            :data:`NO_OP_VALUES` set to something this server cannot do.
    """
    if request.n is not None and request.n != 1:
        raise InvalidGenerationConfigError(
            f"n={request.n} is not supported: this server returns one choice per request "
            f"({_HINTS['n']})"
        )
    both = (request.max_tokens, request.max_completion_tokens)
    if None not in both and both[0] != both[1]:
        raise InvalidGenerationConfigError(
            f"max_tokens={both[0]} and max_completion_tokens={both[1]} disagree; send one of them"
        )
    for name, value in (request.model_extra or {}).items():
        allowed = NO_OP_VALUES.get(name)
        if allowed is not None and not any(_same(value, ok) for ok in allowed):
            hint = f" ({_HINTS[name]})" if name in _HINTS else ""
            raise InvalidGenerationConfigError(
                f"{name}={value!r} is not supported by this server{hint}; leave it out"
            )


def _same(value: object, allowed: object) -> bool:
    # 0 == False in Python: compare types too, so logprobs=0 is not taken for False.
    return value == allowed and (
        allowed is None
        or type(value) is type(allowed)
        or (
            isinstance(value, int | float)
            and isinstance(allowed, int | float)
            and not isinstance(value, bool)
            and not isinstance(allowed, bool)
        )
    )


def call_options(request: ChatCompletionRequest) -> dict[str, Any]:
    """The request as per-call options of :func:`pj_core.calls.build_call` (frameworks'
    names, unset ones left out): ``user`` is the user id whose saved profile personalises
    the answer.

    Raises:
        InvalidGenerationConfigError: see :func:`check_supported`.
    """
    check_supported(request)
    extension = request.persona_judge or PersonaJudgeOptions()
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    max_tokens = (
        request.max_completion_tokens
        if request.max_completion_tokens is not None
        else request.max_tokens
    )
    options: dict[str, Any] = {
        "user_id": request.user,
        "max_tokens": max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "stop": stop,
        **extension.model_dump(),
        "tools": request.tools,
        "tool_choice": tool_choice_name(request.tool_choice),
        "parallel_tool_calls": request.parallel_tool_calls,
        "response_format": response_format(request.response_format),
    }
    return {name: value for name, value in options.items() if value is not None}


ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
"""The schema of OpenAI's ``json_object`` mode: any JSON object."""


def response_format(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` as the engine's: the JSON schema the answer must follow,
    or None for plain text. ``json_schema`` gives its ``schema`` (always followed strictly:
    the answer is constrained token by token), ``json_object`` any JSON object.

    Raises:
        InvalidConstraintError: another type, or a ``json_schema`` without a schema object.

    Example:
        >>> response_format({"type": "json_schema", "json_schema": {"name": "n", "schema": {
        ...     "type": "object", "properties": {"a": {"type": "integer"}}}}})["properties"]
        {'a': {'type': 'integer'}}
        >>> response_format({"type": "json_object"}), response_format({"type": "text"})
        ({'type': 'object'}, None)
    """
    if value is None or value.get("type") == "text":
        return None
    kind = value.get("type")
    if kind == "json_object":
        return ANY_JSON_OBJECT
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidConstraintError(
                "response_format json_schema needs a schema: {'type': 'json_schema', "
                "'json_schema': {'name': ..., 'schema': {...}}}"
            )
        return schema
    raise InvalidConstraintError(
        f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
        "'json_schema'"
    )


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the engine's turns: ``developer`` is a ``system`` turn, text parts
    are joined, and an assistant's ``tool_calls`` and a ``tool`` result keep what
    :func:`pj_core.prompts.normalize_conversation` reads (a tool result is named after the
    call it answers, found by ``tool_call_id``).

    Raises:
        InvalidPromptError: a part that is not text (images, audio, files).
    """
    call_names: dict[str, str] = {}
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        turn: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": _text(index, message.content),
        }
        if message.tool_calls:
            turn["tool_calls"] = message.tool_calls
            for call in message.tool_calls:
                function = call.get("function")
                if isinstance(call.get("id"), str) and isinstance(function, dict):
                    call_names[call["id"]] = str(function.get("name", ""))
        if message.role == "tool":
            name = message.name or call_names.get(message.tool_call_id or "")
            if name:
                turn["name"] = name
        turns.append(turn)
    return turns


def _text(index: int, content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise InvalidPromptError(
                f"message {index} has a content part of type {kind!r}; this server reads text "
                "parts only ({'type': 'text', 'text': ...})"
            )
        texts.append(part["text"])
    return "\n".join(texts)
