"""LlamaIndex chat messages as ``pj_core`` conversations, and answers as LlamaIndex responses."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    AudioBlock,
    ChatMessage,
    ChatResponse,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseGen,
    DocumentBlock,
    ImageBlock,
    MessageRole,
    ToolCallBlock,
    VideoBlock,
)

from pj_core.calls import CallRequest
from pj_core.errors import InvalidPromptError
from pj_core.prompts import TOOL_CALL_OPEN
from pj_core.results import GenerationResult, StreamEvent
from pj_integrations.llama_index.tools import call_blocks, check_complete

# LlamaIndex has more roles than chat templates know; these keep each message's meaning.
_ROLE_NAMES: Mapping[MessageRole, str] = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    # A tool's result: pj_core shows it to the model as a user turn naming the tool, since
    # few small models' chat templates know a "tool" role.
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}
_MEDIA_BLOCKS = (ImageBlock, AudioBlock, VideoBlock, DocumentBlock)


def to_conversation(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages as the conversation ``pj_core`` renders (see
    :func:`pj_core.prompts.normalize_conversation`).

    An assistant message's ``ToolCallBlock`` s become its ``"tool_calls"``; a tool message
    becomes a ``"tool"`` turn named after the call it answers (its ``tool_call_id``, as
    ``FunctionAgent`` writes it, looked up among the earlier calls).

    Example:
        >>> from llama_index.core.base.llms.types import ToolCallBlock
        >>> call = ToolCallBlock(tool_call_id="c1", tool_name="add", tool_kwargs={"a": 1})
        >>> turns = to_conversation([
        ...     ChatMessage(role="user", content="1+?"),
        ...     ChatMessage(role="assistant", blocks=[call]),
        ...     ChatMessage(role="tool", content="1", additional_kwargs={"tool_call_id": "c1"})])
        >>> turns[1]["tool_calls"], turns[2]
        ([{'name': 'add', 'arguments': {'a': 1}}], {'role': 'tool', 'content': '1', 'name': 'add'})
    """
    names: dict[str, str] = {}  # tool call id -> tool name, from the calls seen so far
    conversation = []
    for message in messages:
        turn = message_to_dict(message)
        for block in message.blocks:
            if isinstance(block, ToolCallBlock) and block.tool_call_id:
                names[block.tool_call_id] = block.tool_name
        if turn["role"] == "tool":
            extra = message.additional_kwargs
            name = (
                extra.get("name")
                or extra.get("tool_name")
                or names.get(str(extra.get("tool_call_id")))
            )
            turn["content"] = turn["content"] or "(no output)"
            if isinstance(name, str) and name:
                turn["name"] = name
        conversation.append(turn)
    return conversation


def message_to_dict(message: ChatMessage) -> dict[str, Any]:
    """One message as a ``{"role", "content"}`` turn (with ``"tool_calls"`` for an assistant
    message that called tools).

    Raises:
        InvalidPromptError: an image, audio, video or document block.
    """
    if any(isinstance(block, _MEDIA_BLOCKS) for block in message.blocks):
        raise InvalidPromptError(
            "PersonaJudgeLLM reads text only: remove image, audio, video and document blocks "
            "from the messages (or describe them in text)"
        )
    turn: dict[str, Any] = {
        "role": _ROLE_NAMES.get(message.role, "user"),
        "content": message.content or "",
    }
    calls = [
        {"name": block.tool_name, "arguments": block.tool_kwargs}
        for block in message.blocks
        if isinstance(block, ToolCallBlock)
    ]
    if calls and turn["role"] == "assistant":
        turn["tool_calls"] = calls
    return turn


def chat_conversation(
    messages: Sequence[ChatMessage], system_prompt: str | None
) -> list[dict[str, Any]]:
    """The conversation of ``chat``: the messages, with ``system_prompt`` in front unless a
    system message already says it (LlamaIndex's ``predict()`` prepends it itself; it is
    never said twice)."""
    conversation = to_conversation(messages)
    if system_prompt and not any(
        turn["role"] == "system" and system_prompt in turn["content"] for turn in conversation
    ):
        conversation.insert(0, {"role": "system", "content": system_prompt})
    return conversation


def completion_conversation(
    prompt: str,
    formatted: bool,
    system_prompt: str | None,
    completion_to_prompt: Callable[[str], str] | None,
) -> list[dict[str, str]]:
    """The conversation of ``complete``. ``formatted=True`` is LlamaIndex's signal that the
    prompt already went through ``completion_to_prompt`` and carries the system prompt, so
    neither is applied again.

    Raises:
        InvalidPromptError: ``prompt`` is not a str.
    """
    if not isinstance(prompt, str):
        raise InvalidPromptError(
            f"complete() takes the prompt as a str, got {type(prompt).__name__}"
        )
    if formatted:
        return [{"role": "user", "content": prompt}]
    conversation = []
    if system_prompt:
        conversation.append({"role": "system", "content": system_prompt})
    to_prompt = completion_to_prompt or (lambda text: text)  # LlamaIndex may leave None
    conversation.append({"role": "user", "content": to_prompt(prompt)})
    return conversation


# ----------------------------------------------------------------------------- responses


def raw_of(result: GenerationResult) -> dict[str, Any]:
    """A response's ``raw``: a dict, as LlamaIndex's callbacks read it (``TokenCountingHandler``
    does ``dict(raw)`` and looks for ``usage``), with the engine's result under ``"result"``.

    Example:
        >>> from types import SimpleNamespace
        >>> raw = raw_of(SimpleNamespace(prompt_tokens=12, token_ids=[5, 6, 7]))
        >>> raw["usage"]
        {'prompt_tokens': 12, 'completion_tokens': 3, 'total_tokens': 15}
    """
    completion = len(result.token_ids)
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": result.prompt_tokens + completion,
    }
    return {"usage": usage, "result": result}


def result_of(response: ChatResponse | CompletionResponse) -> GenerationResult | None:
    """The engine's result a response carries (the last chunk's, when streaming), else None."""
    raw = response.raw
    result = raw.get("result") if isinstance(raw, dict) else None
    return result if isinstance(result, GenerationResult) else None


def completion_response(result: GenerationResult, plan: CallRequest) -> CompletionResponse:
    """The answer of ``complete``: its text, :func:`raw_of` the result as ``raw``,
    statistics in ``additional_kwargs``."""
    return CompletionResponse(
        text=result.text, raw=raw_of(result), additional_kwargs=plan.info(result)
    )


def chat_response(result: GenerationResult, plan: CallRequest) -> ChatResponse:
    """The answer of ``chat``: its text, or its tool calls as ``ToolCallBlock`` s.

    Raises:
        OutputParserException: the answer ran out of budget inside a tool call.
    """
    check_complete(result, plan.generate_kwargs)
    return ChatResponse(
        message=assistant_message(result, result.text),
        raw=raw_of(result),
        additional_kwargs=plan.info(result),
    )


def assistant_message(result: GenerationResult, text: str) -> ChatMessage:
    """The answer as an assistant message: ``text``, or the tool calls (no text)."""
    if result.tool_calls:
        return ChatMessage(role=MessageRole.ASSISTANT, blocks=list(call_blocks(result)))
    return ChatMessage(role=MessageRole.ASSISTANT, content=text)


def completion_chunks(events: Iterator[StreamEvent], plan: CallRequest) -> CompletionResponseGen:
    """``stream_complete``'s chunks: cumulative ``text``, the new piece as ``delta``, and
    ``raw={"event": StreamEvent}``; the last chunk carries the statistics, and
    :func:`raw_of` the result as ``raw``."""
    text = ""
    for event in events:
        text += event.text
        if event.done and event.result is not None:
            info = plan.info(event.result)
            yield CompletionResponse(
                text=text, delta=event.text, raw=raw_of(event.result), additional_kwargs=info
            )
        elif event.text:  # an empty piece is text held back to check for a stop string
            yield CompletionResponse(text=text, delta=event.text, raw={"event": event})


def chat_chunks(events: Iterator[StreamEvent], plan: CallRequest) -> ChatResponseGen:
    """``stream_chat``'s chunks: cumulative ``message.content``, the new piece as ``delta``.

    An answer that is tool calls sends no text: its calls come whole, as the
    ``ToolCallBlock`` s of the last chunk's message (a call is known once it parses).

    Raises:
        OutputParserException: at the end, for a tool call cut short by the budget.
    """
    text = ""
    calling = False
    tools = bool(plan.generate_kwargs.get("tools"))
    for event in events:
        text += event.text
        if event.done and event.result is not None:
            check_complete(event.result, plan.generate_kwargs)
            yield ChatResponse(
                message=assistant_message(event.result, text),
                delta="" if calling else event.text,
                raw=raw_of(event.result),
                additional_kwargs=plan.info(event.result),
            )
        elif event.text:
            calling = calling or (tools and text.startswith(TOOL_CALL_OPEN[0]))
            if not calling:
                yield ChatResponse(
                    message=ChatMessage(role=MessageRole.ASSISTANT, content=text),
                    delta=event.text,
                    raw={"event": event},
                )
