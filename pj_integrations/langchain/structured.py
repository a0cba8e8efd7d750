"""``ChatPersonaJudge.with_structured_output``: objects that parse, by construction.

Three methods, as LangChain's providers name them:

- ``"json_schema"`` (default): the answer is constrained to JSON valid against the schema
  (the engine's ``response_format``) and parsed: a pydantic instance for a pydantic class,
  else a dict;
- ``"function_calling"``: the schema as a tool the answer must call (``bind_tools`` with
  that tool as ``tool_choice``), its arguments parsed;
- ``"json_mode"``: any JSON object, parsed to a dict; given a schema, the object is
  constrained to it as with ``"json_schema"`` (LangChain's providers only parse with it, and
  a small model then often leaves out a field).

``include_raw=True`` returns ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}``
instead, as LangChain's providers do. An answer cut short by its budget is never returned as
an object: it fails to parse (``OutputParserException``, or ``parsing_error`` with
``include_raw``).

Example:
    >>> from pydantic import BaseModel
    >>> class Fruit(BaseModel):
    ...     name: str
    >>> structured = llm.with_structured_output(Fruit)  # doctest: +SKIP
    >>> structured.invoke("Name a fruit.")  # doctest: +SKIP
    Fruit(name='apple')
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, Literal

from langchain_core.language_models import LanguageModelInput
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import BaseModel

from pj_core.errors import InvalidConstraintError

Method = Literal["json_schema", "function_calling", "json_mode"]
METHODS: tuple[str, ...] = ("json_schema", "function_calling", "json_mode")


def structured_output(
    llm: Any,
    schema: Any,
    *,
    method: str = "json_schema",
    include_raw: bool = False,
) -> Runnable[LanguageModelInput, Any]:
    """The runnable ``with_structured_output`` returns for chat model ``llm``.

    Raises:
        InvalidConstraintError: an unknown method, or no schema for a method that needs one.
    """
    if method not in METHODS:
        raise InvalidConstraintError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    is_model = isinstance(schema, type) and issubclass(schema, BaseModel)
    if schema is None and method != "json_mode":
        raise InvalidConstraintError(f"method={method!r} needs a schema (a pydantic class or dict)")
    parser: Runnable[Any, Any]
    if method == "function_calling":
        tool = convert_to_openai_tool(schema)
        name = tool["function"]["name"]
        bound = llm.bind_tools(
            [schema],
            tool_choice=name,
            ls_structured_output_format={"kwargs": {"method": method}, "schema": tool},
        )
        parser = (
            PydanticToolsParser(tools=[schema], first_tool_only=True)
            if is_model
            else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        )
    else:
        if schema is not None:  # json_mode with a schema: constrained to it all the same
            response_format: Any = schema if is_model else convert_to_json_schema(schema)
        else:
            response_format = {"type": "object"}
        bound = llm.bind(
            response_format=response_format,
            ls_structured_output_format={
                "kwargs": {"method": method},
                "schema": convert_to_json_schema(schema) if schema is not None else None,
            },
        )
        parser = PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()
    if not include_raw:
        return bound | parser
    parsed = RunnablePassthrough.assign(
        parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
    )
    failed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=bound) | parsed.with_fallbacks([failed], exception_key="parsing_error")
