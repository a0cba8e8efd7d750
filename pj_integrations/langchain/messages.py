"""LangChain messages as the ``{"role", "content"}`` conversation ``pj_core`` renders.

Example:
    >>> from langchain_core.messages import HumanMessage, SystemMessage
    >>> to_conversation([SystemMessage("Be kind."), HumanMessage("Hi!")])
    [{'role': 'system', 'content': 'Be kind.'}, {'role': 'user', 'content': 'Hi!'}]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    UsageMetadata,
    convert_to_messages,
)
from langchain_core.prompt_values import PromptValue, StringPromptValue

from pj_core.calls import CallRequest, stats_dict
from pj_core.errors import InvalidPromptError
from pj_core.prompts import tool_call_block
from pj_core.results import GenerationResult
from pj_integrations.langchain.tools import check_complete, message_tool_calls


def to_conversation(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """Turn LangChain messages into the ``{"role", "content"}`` list ``pj_core`` renders.

    - System messages, wherever they are, are joined into one system message placed first;
      the persona text is later combined with it in each persona prefix.
    - Human messages become ``user`` turns, AI messages ``assistant`` turns (their tool
      calls written after the text as the model writes them); a tool (or function) result
      becomes a ``user`` turn that says which tool answered, because small models' chat
      templates have no tool role.
    - Runs of the same role are merged into one turn (chat templates expect alternation);
      messages without text are left out.
    - Only text is read; images, audio and files raise :class:`InvalidPromptError`.

    Example:
        >>> from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
        >>> turns = to_conversation([SystemMessage("Be kind."), HumanMessage("Hi"),
        ...                          HumanMessage("?"), AIMessage("Hello!")])
        >>> [(t["role"], t["content"]) for t in turns]
        [('system', 'Be kind.'), ('user', 'Hi\\n\\n?'), ('assistant', 'Hello!')]
    """
    system_parts: list[str] = []
    turns: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        role = _role_of(message, index)
        text = _text_of(message, index)
        if isinstance(message, AIMessage) and message.tool_calls:
            # The model's own earlier calls, written as it writes them, so it sees what it did.
            calls = "\n".join(tool_call_block(c["name"], c["args"]) for c in message.tool_calls)
            text = f"{text.strip()}\n{calls}" if text.strip() else calls
        if not text.strip():
            continue
        if role == "system":
            system_parts.append(text)
            continue
        if isinstance(message, ToolMessage | FunctionMessage):
            label = getattr(message, "name", None) or getattr(message, "tool_call_id", None)
            text = f"Result of tool {label}:\n{text}" if label else f"Tool result:\n{text}"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = f"{turns[-1]['content']}\n\n{text}"
        else:
            turns.append({"role": role, "content": text})
    if not any(turn["role"] == "user" for turn in turns):
        raise InvalidPromptError(
            "the messages hold no human (user) message; add one, e.g. HumanMessage('Hello')"
        )
    system = [{"role": "system", "content": "\n\n".join(system_parts)}] if system_parts else []
    return system + turns


_CHAT_ROLES = {
    "system": "system",
    "developer": "system",
    "human": "user",
    "user": "user",
    "ai": "assistant",
    "assistant": "assistant",
    "tool": "user",
    "function": "user",
}


def _role_of(message: BaseMessage, index: int) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ToolMessage | FunctionMessage):
        return "user"
    if isinstance(message, ChatMessage) and message.role.lower() in _CHAT_ROLES:
        return _CHAT_ROLES[message.role.lower()]
    raise InvalidPromptError(
        f"message {index} has type {message.type!r}, which ChatPersonaJudge cannot place; use "
        "SystemMessage, HumanMessage, AIMessage or ToolMessage (or a ChatMessage whose role is "
        f"one of {', '.join(sorted(_CHAT_ROLES))})"
    )


def _text_of(message: BaseMessage, index: int) -> str:
    if isinstance(message.content, str):
        return message.content
    parts: list[str] = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, Mapping) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, Mapping) and block.get("type") in (
            "reasoning",
            "tool_call",
            "tool_use",  # Anthropic's form of a call; the calls themselves are in tool_calls
        ):
            continue  # another model's reasoning or tool request: not part of the dialogue
        else:
            kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
            raise InvalidPromptError(
                f"message {index} holds a {kind!r} content block; ChatPersonaJudge reads text "
                "only (its models are text-only): send the text, or describe the image/file in "
                "words"
            )
    return "".join(parts)


# ----------------------------------------------------------------------------- inputs


def messages_of(input_: Any) -> list[BaseMessage]:
    """The messages ``invoke`` reads from an input: a string, a prompt value or messages
    (anything ``convert_to_messages`` takes).

    Example:
        >>> [type(m).__name__ for m in messages_of("Hi!")]
        ['HumanMessage']
    """
    if isinstance(input_, PromptValue):
        return input_.to_messages()
    if isinstance(input_, str):
        return StringPromptValue(text=input_).to_messages()
    if isinstance(input_, Sequence):
        return convert_to_messages(input_)
    raise InvalidPromptError(
        f"a chat model input is a string, a prompt value or a list of messages, got "
        f"{type(input_).__name__}"
    )


# ----------------------------------------------------------------------------- responses


def ai_message(request: CallRequest, result: GenerationResult) -> AIMessage:
    """The answer as an ``AIMessage``: its text, or its tool calls (with empty content).

    Raises:
        OutputParserException: the answer ran out of budget inside a tool call.
    """
    check_complete(result, request.generate_kwargs)
    return AIMessage(
        content="" if result.tool_calls else result.text,
        tool_calls=message_tool_calls(result),
        usage_metadata=usage(result),
        response_metadata=response_metadata(request, result),
    )


def usage(result: GenerationResult) -> UsageMetadata:
    output_tokens = len(result.token_ids)
    return UsageMetadata(
        input_tokens=result.prompt_tokens,
        output_tokens=output_tokens,
        total_tokens=result.prompt_tokens + output_tokens,
    )


def response_metadata(request: CallRequest, result: GenerationResult) -> dict[str, Any]:
    return {
        "model_name": request.model_name,
        "finish_reason": result.finish_reason,
        "stats": stats_dict(result.stats),
        "personas": [persona.text for persona in request.personas],
        "persona_source": request.persona_source,
    }
