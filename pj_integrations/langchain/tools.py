"""LangChain's tool calling on Persona-judge's constrained tool calls.

``ChatPersonaJudge.bind_tools`` turns LangChain tools (``BaseTool``, functions, pydantic
models, dict schemas) into OpenAI-style tool dicts with LangChain's own
``convert_to_openai_tool`` and binds them, with ``tool_choice``, to every call; the engine
then constrains each answer so that every call names a bound tool and has valid arguments
(:mod:`pj_core.tools`). This module translates between the two sides and nothing else.

Example:
    >>> def add(a: int, b: int) -> int:
    ...     '''Add two integers.'''
    ...     return a + b
    >>> [t["function"]["name"] for t in format_tools([add])]
    ['add']
    >>> resolve_tool_choice(True), resolve_tool_choice({"type": "function",
    ...                                                  "function": {"name": "add"}})
    ('required', 'add')
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages.tool import ToolCall, ToolCallChunk, tool_call, tool_call_chunk
from langchain_core.utils.function_calling import convert_to_openai_tool

from pj_core.errors import InvalidToolError
from pj_core.results import GenerationResult
from pj_core.tools import as_tools, check_tool_choice, tool_choice_name, unfinished_call


def tool_bindings(
    tools: Sequence[Any], tool_choice: object, parallel_tool_calls: bool | None
) -> dict[str, Any]:
    """What ``bind_tools`` binds: the tools as dicts, the resolved ``tool_choice`` and
    ``parallel_tool_calls``, checked now (not at the first call).

    Raises:
        InvalidToolError: a tool LangChain cannot describe, duplicate names, an unknown or
            malformed ``tool_choice``.
    """
    formatted = format_tools(tools)
    choice = resolve_tool_choice(tool_choice)
    check_tool_choice(choice, as_tools(formatted))
    bound: dict[str, Any] = {"tools": formatted}
    if choice is not None:
        bound["tool_choice"] = choice
    if parallel_tool_calls is not None:
        bound["parallel_tool_calls"] = parallel_tool_calls
    return bound


def format_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """LangChain tools as OpenAI-style tool dicts (what ``pj_core.tools`` reads).

    Raises:
        InvalidToolError: a tool LangChain cannot describe.
    """
    if isinstance(tools, str | bytes) or not isinstance(tools, Sequence):
        raise InvalidToolError(f"bind_tools takes a list of tools, got {type(tools).__name__}")
    formatted = []
    for index, tool in enumerate(tools):
        try:
            formatted.append(convert_to_openai_tool(tool))
        except Exception as exc:  # LangChain raises ValueError/TypeError/NotImplementedError
            raise InvalidToolError(
                f"tool {index} ({tool!r:.60}) cannot be described: {exc}"
            ) from None
    return formatted


def resolve_tool_choice(tool_choice: object) -> str | None:
    """LangChain's ``tool_choice`` forms as ``pj_core.tools``' one: None/False (auto),
    True (required), a string, or ``{"type": "function", "function": {"name": ...}}``.

    Raises:
        InvalidToolError: any other form.
    """
    if tool_choice is None or tool_choice is False:
        return None
    if tool_choice is True:
        return "required"
    return tool_choice_name(tool_choice)


def message_tool_calls(result: GenerationResult) -> list[ToolCall]:
    """The answer's tool calls as LangChain ``ToolCall`` dicts (``AIMessage.tool_calls``)."""
    return [tool_call(name=c.name, args=c.arguments, id=c.id) for c in result.tool_calls]


def message_tool_call_chunks(result: GenerationResult) -> list[ToolCallChunk]:
    """The answer's tool calls as ``tool_call_chunks`` of a streamed message (one per call,
    whole: a call is known once it parses)."""
    return [
        tool_call_chunk(name=c.name, args=json.dumps(c.arguments), id=c.id, index=i)
        for i, c in enumerate(result.tool_calls)
    ]


def check_complete(result: GenerationResult, options: dict[str, Any]) -> None:
    """Raise LangChain's output-parsing error for an answer that had to call a tool, or
    started a call, and ran out of budget before finishing it: an incomplete call is never
    returned as a success. (Plain text never starts with ``<``.)

    Raises:
        OutputParserException: with the partial answer as ``llm_output``.
    """
    problem = unfinished_call(result, options)
    if problem is not None:
        raise OutputParserException(problem, llm_output=result.text)
