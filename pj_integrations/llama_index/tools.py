"""LlamaIndex's function calling on Persona-judge's constrained tool calls.

``PersonaJudgeLLM`` is a ``FunctionCallingLLM``: ``chat_with_tools`` (and its async and
streaming forms, hence ``FunctionAgent``, ``FunctionCallingProgram``, ``predict_and_call``)
describes LlamaIndex tools to the model with their own ``to_openai_tool()`` and the engine
then constrains the answer so that every call names one of them with valid arguments
(:mod:`pj_core.tools`). A call comes back as a ``ToolCallBlock`` of the response message,
and :func:`tool_selections` reads it as LlamaIndex's ``ToolSelection``. This module translates
between the two sides and nothing else.

Example:
    >>> from llama_index.core.tools import FunctionTool
    >>> def add(a: int, b: int) -> int:
    ...     '''Add two integers.'''
    ...     return a + b
    >>> [t["function"]["name"] for t in format_tools([FunctionTool.from_defaults(add)])]
    ['add']
    >>> resolve_tool_choice(None, tool_required=True), resolve_tool_choice(
    ...     {"type": "function", "function": {"name": "add"}}, tool_required=False)
    ('required', 'add')
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    MessageRole,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.output_parsers.base import OutputParserException

from pj_core.errors import InvalidToolError
from pj_core.results import GenerationResult
from pj_core.tools import tool_choice_name, unfinished_call


def format_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """LlamaIndex tools (anything with ``metadata.to_openai_tool()``) as OpenAI-style dicts.

    Raises:
        InvalidToolError: not a list, or a tool LlamaIndex cannot describe.
    """
    if isinstance(tools, str | bytes) or not isinstance(tools, Sequence):
        raise InvalidToolError(f"chat_with_tools takes a list of tools, got {type(tools).__name__}")
    formatted = []
    for index, tool in enumerate(tools):
        metadata = getattr(tool, "metadata", None)
        if metadata is None or not hasattr(metadata, "to_openai_tool"):
            raise InvalidToolError(
                f"tool {index} ({tool!r:.60}) is not a LlamaIndex tool; wrap a function with "
                "FunctionTool.from_defaults(fn)"
            )
        try:
            formatted.append(metadata.to_openai_tool(skip_length_check=True))
        except Exception as exc:  # LlamaIndex raises ValueError/TypeError for odd schemas
            raise InvalidToolError(f"tool {index} cannot be described: {exc}") from None
    return formatted


def resolve_tool_choice(tool_choice: object, tool_required: bool) -> str | None:
    """LlamaIndex's ``tool_choice`` and ``tool_required`` as ``pj_core.tools``' one.

    ``tool_choice`` wins when given: "auto", "required", "none", a tool's name, or OpenAI's
    ``{"type": "function", "function": {"name": ...}}``; else ``tool_required`` means
    "required" and its absence None (auto).

    Raises:
        InvalidToolError: any other form.
    """
    if tool_choice is None:
        return "required" if tool_required else None
    return tool_choice_name(tool_choice)


def tool_options(
    tools: Sequence[Any],
    *,
    tool_choice: object,
    tool_required: bool,
    parallel: bool,
) -> dict[str, Any]:
    """The call options (``pj_core.calls.TOOL_OPTIONS``) of a ``chat_with_tools`` call; none
    for an empty list of tools (an agent with no tools answers in text)."""
    if not tools:
        return {}
    options: dict[str, Any] = {"tools": format_tools(tools)}
    choice = resolve_tool_choice(tool_choice, tool_required)
    if choice is not None:
        options["tool_choice"] = choice
    if parallel:
        options["parallel_tool_calls"] = True
    return options


def is_tool_result(message: ChatMessage) -> bool:
    """Whether a message is a tool's result (role ``tool`` or the older ``function``)."""
    return message.role in (MessageRole.TOOL, MessageRole.FUNCTION)


def call_blocks(result: GenerationResult) -> list[ToolCallBlock]:
    """The answer's tool calls as the ``ToolCallBlock`` s of its message."""
    return [
        ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments)
        for c in result.tool_calls
    ]


def tool_selections(response: ChatResponse, error_on_no_tool_call: bool) -> list[ToolSelection]:
    """The tool calls of a response message as LlamaIndex's ``ToolSelection`` s.

    Raises:
        ValueError: no call, with ``error_on_no_tool_call`` (as LlamaIndex's own LLMs do).
    """
    selections = [
        ToolSelection(
            tool_id=block.tool_call_id or f"call_{index}",
            tool_name=block.tool_name,
            tool_kwargs=_arguments(block.tool_kwargs),
        )
        for index, block in enumerate(_call_blocks_of(response.message))
    ]
    if not selections and error_on_no_tool_call:
        text = (response.message.content or "")[:200]
        raise ValueError(f"expected at least one tool call, got none; the answer was {text!r}")
    return selections


def _call_blocks_of(message: ChatMessage) -> list[ToolCallBlock]:
    return [block for block in message.blocks if isinstance(block, ToolCallBlock)]


def _arguments(kwargs: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(kwargs, dict):
        return kwargs
    try:
        data = json.loads(kwargs or "{}")
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def check_complete(result: GenerationResult, options: dict[str, Any]) -> None:
    """Raise LlamaIndex's parsing error for an answer with tools that ran out of budget
    inside a call (or before one it had to make): an incomplete call is never returned as a
    success.

    Raises:
        OutputParserException: saying how many tokens were spent and to raise max_tokens.
    """
    problem = unfinished_call(result, options)
    if problem is not None:
        raise OutputParserException(problem)
