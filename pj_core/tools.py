"""Tool calling: tools described to the model, calls that parse, valid by construction.

A call with ``tools=`` gets, in its conversation's system text, a description of every tool
(:func:`tools_system_text`: name, description, JSON schema of the arguments, and how to call
them), and a constraint on its answer (:func:`tool_grammar`) that depends on ``tool_choice``:

- ``"auto"`` (default): plain text, or a tool call;
- ``"required"`` (or ``"any"``): a tool call;
- a tool's name: exactly one call of that tool;
- ``"none"``: plain text only.

One call per answer unless ``parallel_tool_calls=True`` (then one or more, one after the other):
small models given the choice repeat the same call until the budget runs out (SmolLM2 does),
and an agent loop gets the next call in the next turn anyway.

A tool call is written as :func:`pj_core.prompts.tool_call_block` lays it out, and its
arguments are constrained by the tool's own JSON schema, so every call the engine returns
names a real tool and has valid arguments (no keys beyond its declared parameters, unless
its schema allows them). Plain text may not start with ``<`` (so it can
never be mistaken for a call). :func:`parse_tool_calls` turns a finished answer into
:class:`ToolCall` objects with fresh ids. Tool results come back as ``{"role": "tool",
"content": ..., "name": ...}`` messages and the assistant's calls as its message's
``"tool_calls"`` (see :func:`pj_core.prompts.normalize_conversation`).

The shipped models' chat templates take no ``tools`` argument, so the description is the
system text above for every model; it is the same for both persona prefixes, so both
personas argue over the same calls. With ``tool_choice="none"`` the tools are not described
at all: a small model shown a catalogue it may not use imitates it in its text.

Example:
    >>> add = Tool("add", "Add two integers.", {"type": "object",
    ...     "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    ...     "required": ["a", "b"]})
    >>> text = '<tool_call>\\n{"name": "add", "arguments": {"a": 1, "b": 2}}\\n</tool_call>'
    >>> content, calls = parse_tool_calls(text, [add])
    >>> content, calls[0].name, calls[0].arguments
    ('', 'add', {'a': 1, 'b': 2})
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pj_core.decoding.constraints import JSON_LAYOUT, Grammar, closed_schema
from pj_core.errors import InvalidToolError
from pj_core.prompts import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from pj_core.results import GenerationResult, ToolCall

TOOL_CHOICES = ("auto", "required", "any", "none")
"""The ``tool_choice`` values besides a tool's name (``"any"`` is ``"required"``)."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_EMPTY_PARAMETERS: Mapping[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    """A tool the model may call.

    Attributes:
        name: 1-64 letters, digits, ``_ . -``, starting with a letter or ``_``.
        description: what the tool does (the model reads it).
        parameters: the JSON schema of its arguments (an object schema).
    """

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(_EMPTY_PARAMETERS))

    def spec(self) -> dict[str, Any]:
        """The tool as the model sees it (OpenAI's function layout)."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": dict(self.parameters),
        }


ToolLike = Tool | Mapping[str, Any]
"""A :class:`Tool`, or a dict: ``{"name", "description", "parameters"}`` or OpenAI's
``{"type": "function", "function": {...}}``."""


def as_tools(tools: Sequence[ToolLike]) -> list[Tool]:
    """Validated :class:`Tool` objects.

    Raises:
        InvalidToolError: not a list, an empty list, a tool without a valid name, a
            ``parameters`` that is not an object schema, or two different tools with one
            name (the same tool given twice, annotations aside, is kept once).

    Example:
        >>> [t.name for t in as_tools([{"type": "function", "function": {"name": "now"}}])]
        ['now']
    """
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise InvalidToolError(
            f"tools must be a list of tools, got {type(tools).__name__}; e.g. "
            '[{"name": "add", "description": "...", "parameters": {"type": "object", ...}}]'
        )
    if not tools:
        raise InvalidToolError("tools is an empty list; give at least one tool, or none at all")
    out: list[Tool] = []
    for index, item in enumerate(tools):
        tool = _as_tool(index, item)
        same_name = next((t for t in out if t.name == tool.name), None)
        if same_name is None:
            out.append(tool)
        elif _meaning(same_name.parameters) != _meaning(tool.parameters):
            raise InvalidToolError(
                f"two different tools are called {tool.name!r}; give each tool its own name"
            )
        # else: the same tool twice (e.g. a pydantic class and its JSON schema): kept once
    return out


def _meaning(schema: object) -> object:
    """A schema without its annotations (``title``, ``description``, ``examples``), to tell
    the same tool given twice from two tools that share a name."""
    if isinstance(schema, Mapping):
        return {
            k: _meaning(v)
            for k, v in schema.items()
            if k not in ("title", "description", "examples")
        }
    if isinstance(schema, list):
        return [_meaning(v) for v in schema]
    return schema


def _as_tool(index: int, item: ToolLike) -> Tool:
    name: object
    description: object
    parameters: object
    if isinstance(item, Tool):
        name, description, parameters = item.name, item.description, item.parameters
    elif isinstance(item, Mapping):
        spec = item.get("function", item) if item.get("type") == "function" else item
        if not isinstance(spec, Mapping):
            raise InvalidToolError(f"tool {index}: 'function' must be a dict")
        name = spec.get("name")
        description = spec.get("description") or ""
        parameters = spec.get("parameters") or dict(_EMPTY_PARAMETERS)
    else:
        raise InvalidToolError(
            f"tool {index} is a {type(item).__name__}; give a pj_core.tools.Tool or a dict with "
            "'name', 'description' and 'parameters'"
        )
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidToolError(
            f"tool {index} has name {name!r}; use 1-64 letters, digits or '_.-', starting "
            "with a letter or '_'"
        )
    if not isinstance(description, str):
        raise InvalidToolError(f"tool {name!r}: description must be text")
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise InvalidToolError(
            f"tool {name!r}: parameters must be a JSON schema of an object, e.g. "
            '{"type": "object", "properties": {"x": {"type": "integer"}}}'
        )
    try:
        json.dumps(parameters)
    except (TypeError, ValueError) as exc:
        raise InvalidToolError(f"tool {name!r}: parameters are not JSON data: {exc}") from None
    return Tool(name=name, description=description, parameters=dict(parameters))


def tool_choice_name(tool_choice: object) -> str | None:
    """A framework's ``tool_choice`` as a string: None stays None, a string is kept, and
    OpenAI's ``{"type": "function", "function": {"name": ...}}`` (or ``{"name": ...}``) gives
    the name. Whether the string names a tool is :func:`check_tool_choice`'s job.

    Raises:
        InvalidToolError: any other form.

    Example:
        >>> tool_choice_name({"type": "function", "function": {"name": "add"}})
        'add'
    """
    if tool_choice is None or isinstance(tool_choice, str):
        return tool_choice
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function", tool_choice)
        name = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(name, str):
            return name
    raise InvalidToolError(
        f"tool_choice {tool_choice!r} is not understood; give 'auto', 'required', 'any', "
        "'none', a tool's name, or {'type': 'function', 'function': {'name': ...}}"
    )


def check_tool_choice(tool_choice: str | None, tools: Sequence[Tool]) -> str:
    """``tool_choice`` resolved (None is ``"auto"``, ``"any"`` is ``"required"``).

    Raises:
        InvalidToolError: not a string, or a name that is no tool's.
    """
    if tool_choice is None:
        return "auto"
    if not isinstance(tool_choice, str):
        raise InvalidToolError(
            f"tool_choice must be 'auto', 'required', 'any', 'none' or a tool's name, got "
            f"{type(tool_choice).__name__}"
        )
    if tool_choice == "any":
        return "required"
    if tool_choice in TOOL_CHOICES:
        return tool_choice
    names = [t.name for t in tools]
    if tool_choice not in names:
        raise InvalidToolError(
            f"tool_choice {tool_choice!r} names no tool; the tools are {names} (or use 'auto', "
            "'required', 'none')"
        )
    return tool_choice


def tools_system_text(
    tools: Sequence[Tool], tool_choice: str = "auto", parallel: bool = False
) -> str:
    """The system text that describes ``tools`` and how to call them.

    Example:
        >>> print(tools_system_text([Tool("now", "The time.")]).splitlines()[0])
        You can call tools. Each tool, as JSON (name, description, JSON schema of arguments):
    """
    lines = [
        "You can call tools. Each tool, as JSON (name, description, JSON schema of arguments):",
        *(json.dumps(tool.spec(), ensure_ascii=False) for tool in tools),
        f"To call a tool, answer with {TOOL_CALL_OPEN} on its own line, then one line of JSON "
        '{"name": <tool name>, "arguments": <arguments>}, then ' + TOOL_CALL_CLOSE + " on its "
        "own line"
        + ("; several calls follow each other." if parallel else "; one call per answer.")
        + " A tool's result comes back in the next message.",
    ]
    if tool_choice == "required":
        lines.append("Answer with tool calls only.")
    elif tool_choice == "none":
        lines.append("Do not call a tool now: answer in text.")
    elif tool_choice != "auto":
        lines.append(f"Call the tool {tool_choice} now.")
    else:
        lines.append("Call tools when they help; otherwise answer in text.")
    return "\n".join(lines)


def tool_grammar(
    tools: Sequence[Tool], tool_choice: str = "auto", parallel: bool = False
) -> Grammar:
    """The constraint on an answer with ``tools`` and a resolved ``tool_choice``; with
    ``parallel``, one or more calls where a call is allowed, else exactly one.

    Example:
        >>> tool_grammar([Tool("now")], "none").lark
        'start: TEXT\\nTEXT: /[^<][\\\\s\\\\S]*/'
    """
    text_rule = r"TEXT: /[^<][\s\S]*/"
    if tool_choice == "none":
        return Grammar(f"start: TEXT\n{text_rule}")
    callable_tools = [t for t in tools if tool_choice in ("auto", "required", t.name)]
    calls = {
        "x-guidance": dict(JSON_LAYOUT),
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.name},
                    "arguments": closed_schema(dict(t.parameters)),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in callable_tools
        ],
    }
    open_tag, close_tag = json.dumps(TOOL_CALL_OPEN + "\n"), json.dumps("\n" + TOOL_CALL_CLOSE)
    call_rule = f"call: {open_tag} %json {json.dumps(calls)} {close_tag}"
    calls_rule = 'calls: call ("\\n" call)*' if parallel else "calls: call"
    if tool_choice == "auto":
        return Grammar(f"start: TEXT | calls\n{calls_rule}\n{call_rule}\n{text_rule}")
    if tool_choice == "required":
        return Grammar(f"start: calls\n{calls_rule}\n{call_rule}")
    return Grammar(f"start: call\n{call_rule}")


_CALL_BLOCK = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"\n(.*?)\n" + re.escape(TOOL_CALL_CLOSE), re.DOTALL
)


def parse_tool_calls(text: str, tools: Sequence[Tool]) -> tuple[str, list[ToolCall]]:
    """A finished answer's text content and tool calls.

    An answer that starts with :data:`~pj_core.prompts.TOOL_CALL_OPEN` is all calls (the
    grammar allows nothing else), and its content is ``""``; any other answer is text with
    no calls. Each call gets a fresh id ``call_<hex>``.

    Raises:
        InvalidToolError: a call block that is not JSON of a known tool (only possible for an
            answer that did not come from the constrained decoder, or one cut short).
    """
    if not text.startswith(TOOL_CALL_OPEN):
        return text, []
    names = {t.name for t in tools}
    calls = []
    for block in _CALL_BLOCK.findall(text):
        try:
            data = json.loads(block)
        except json.JSONDecodeError as exc:
            raise InvalidToolError(f"a tool call is not JSON: {exc.msg}: {block[:200]}") from None
        name, arguments = data.get("name"), data.get("arguments")
        if name not in names or not isinstance(arguments, dict):
            raise InvalidToolError(f"a tool call names no known tool or has no arguments: {data}")
        calls.append(ToolCall(name=name, arguments=arguments, id=f"call_{uuid.uuid4().hex[:24]}"))
    if not calls:
        raise InvalidToolError(f"the answer starts a tool call but holds none complete: {text!r}")
    return "", calls


def unfinished_call(result: GenerationResult, options: Mapping[str, Any]) -> str | None:
    """Why an answer with tools is not a whole answer, or None when it is.

    An answer that had to call a tool (``tool_choice`` "required"/"any" or a tool's name),
    or that started a call, and then ran out of budget (or met a stop string) before the
    call was finished holds no usable call. The adapters raise their framework's parsing
    error with this text, so an incomplete call is never returned as a success. (Plain text
    never starts with ``<``, so a text answer cut short is still a text answer.)

    Args:
        result: the engine's answer.
        options: the call's ``generate`` keyword arguments (``tools``, ``tool_choice``).

    Example:
        >>> from pj_core.results import GenerationResult, GenerationStats
        >>> stats = GenerationStats(3, 1, 0, 0, 0, 0, 2, 0.0, 0.0, "lockstep")
        >>> cut = GenerationResult(text='<tool_call>\\n{"na', token_ids=[1, 2, 3],
        ...     stats=stats, trace=[], finish_reason="length", prompt_tokens=9)
        >>> print(unfinished_call(cut, {"tools": [Tool("now")]}))
        the answer ended (length) inside a tool call after 3 tokens; raise max_tokens
        >>> unfinished_call(cut, {}) is None
        True
    """
    if not options.get("tools") or result.finish_reason == "eos":
        return None
    must_call = options.get("tool_choice") not in (None, "auto", "none")
    if must_call or result.text.startswith(TOOL_CALL_OPEN[0]):
        return (
            f"the answer ended ({result.finish_reason}) inside a tool call after "
            f"{len(result.token_ids)} tokens; raise max_tokens"
        )
    return None
