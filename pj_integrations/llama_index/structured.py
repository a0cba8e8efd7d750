"""Structured output for LlamaIndex: objects that parse, by construction.

:class:`ConstrainedStructuredLLM` gives ``PersonaJudgeLLM`` LlamaIndex's structured-output
methods (``structured_predict``, ``astructured_predict``, ``stream_structured_predict``,
``astream_structured_predict``, and through them ``as_structured_llm`` and
``LLMTextCompletionProgram``-free pipelines) on the engine's ``response_format``: the answer
is constrained to JSON valid against the output class's schema and parsed into it, in one
call, without describing the schema as a tool. An answer cut short by its budget (or a stop
string) is never returned as an object: it raises LlamaIndex's ``OutputParserException``.
With a ``pydantic_program_mode`` other than ``DEFAULT``, LlamaIndex's own programs run
instead (e.g. ``"function"``: ``FunctionCallingProgram`` on the constrained tool calls).

Example:
    >>> from pydantic import BaseModel
    >>> from llama_index.core.prompts import PromptTemplate
    >>> class Fruit(BaseModel):
    ...     name: str
    ...     colour: str
    >>> llm.structured_predict(Fruit, PromptTemplate("Name a {kind} fruit."),
    ...                        kind="yellow")  # doctest: +SKIP
    Fruit(name='banana', colour='yellow')
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping
from typing import Any, Generic, TypeVar

from llama_index.core.base.llms.types import ChatMessage, ChatResponse
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictInProgressEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.utils import parse_partial_json
from llama_index.core.output_parsers.base import OutputParserException
from llama_index.core.program.utils import FlexibleModel, create_flexible_model
from llama_index.core.prompts import BasePromptTemplate, PromptTemplate
from llama_index.core.types import PydanticProgramMode
from pydantic import BaseModel, ValidationError

from pj_integrations.llama_index.messages import result_of

Model = TypeVar("Model", bound=BaseModel)

dispatcher = get_dispatcher(__name__)


class ConstrainedStructuredLLM(FunctionCallingLLM):
    """A ``FunctionCallingLLM`` whose structured-output methods constrain the answer to the
    output class's JSON schema (``response_format=output_cls`` on ``chat``)."""

    def structured_predict(
        self,
        output_cls: type[Model],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """An ``output_cls`` object answering ``prompt`` formatted with ``prompt_args``;
        ``llm_kwargs`` override settings for the call (``max_tokens=``, ``seed=``...).

        Raises:
            OutputParserException: the answer ended before its object was complete.
        """
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        _start(output_cls, prompt, prompt_args)
        response = self.chat(
            _messages(self, prompt, prompt_args), **_options(output_cls, llm_kwargs)
        )
        output = parse_object(response, output_cls)
        dispatcher.event(LLMStructuredPredictEndEvent(output=output))
        return output

    async def astructured_predict(
        self,
        output_cls: type[Model],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """Async :meth:`structured_predict` (decoding runs in a worker thread)."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        _start(output_cls, prompt, prompt_args)
        response = await self.achat(
            _messages(self, prompt, prompt_args), **_options(output_cls, llm_kwargs)
        )
        output = parse_object(response, output_cls)
        dispatcher.event(LLMStructuredPredictEndEvent(output=output))
        return output

    def stream_structured_predict(
        self,
        output_cls: type[Model],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Generator[Model | FlexibleModel, None, None]:
        """Partial objects as the JSON streams (``FlexibleModel`` copies of ``output_cls``
        whose missing fields are None), then the whole ``output_cls`` object.

        Raises:
            OutputParserException: at the end, if the answer ended before its object was
                complete.
        """
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            yield from super().stream_structured_predict(
                output_cls, prompt, llm_kwargs, **prompt_args
            )
            return
        _start(output_cls, prompt, prompt_args)
        chunks = self.stream_chat(
            _messages(self, prompt, prompt_args), **_options(output_cls, llm_kwargs)
        )
        yield from partial_objects(chunks, output_cls)

    async def astream_structured_predict(
        self,
        output_cls: type[Model],
        prompt: PromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> AsyncGenerator[Model | FlexibleModel, None]:
        """Async :meth:`stream_structured_predict`."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astream_structured_predict(
                output_cls, prompt, llm_kwargs, **prompt_args
            )
        _start(output_cls, prompt, prompt_args)
        chunks = await self.astream_chat(
            _messages(self, prompt, prompt_args), **_options(output_cls, llm_kwargs)
        )
        return apartial_objects(chunks, output_cls)


def _start(
    output_cls: type[BaseModel], prompt: BasePromptTemplate, args: Mapping[str, Any]
) -> None:
    dispatcher.event(
        LLMStructuredPredictStartEvent(
            output_cls=output_cls, template=prompt, template_args=dict(args)
        )
    )


def _messages(
    llm: FunctionCallingLLM, prompt: BasePromptTemplate, prompt_args: Mapping[str, Any]
) -> list[ChatMessage]:
    return prompt.format_messages(llm=llm, **prompt_args)


def _options(output_cls: type[BaseModel], llm_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**(llm_kwargs or {}), "response_format": output_cls}


def parse_object(response: ChatResponse, output_cls: type[Model]) -> Model:
    """The object of a constrained answer (the engine parsed it into ``output_cls``).

    Raises:
        OutputParserException: the answer ended (budget or stop string) before the object
            was complete, or broke a rule of the schema the grammar does not enforce.
    """
    result = result_of(response)
    if result is None:
        raise OutputParserException(f"no engine result to parse a {output_cls.__name__} from")
    if isinstance(result.parsed, output_cls):
        return result.parsed
    if result.finish_reason != "eos":
        raise OutputParserException(
            f"the answer ended ({result.finish_reason}) after {len(result.token_ids)} tokens "
            f"before its {output_cls.__name__} object was complete; raise max_tokens: "
            f"{result.text[:200]!r}"
        )
    try:  # a rule the grammar engine does not check (e.g. a custom validator): say which
        return output_cls.model_validate_json(result.text)
    except ValidationError as exc:
        raise OutputParserException(
            f"the answer is not a valid {output_cls.__name__}: {exc}"
        ) from None


class ObjectStream(Generic[Model]):
    """Reads a constrained answer's chunks: each one's JSON so far as a partial object (a
    ``FlexibleModel`` copy of ``output_cls``), then the whole object."""

    def __init__(self, output_cls: type[Model]) -> None:
        self.output_cls = output_cls
        self.flexible = create_flexible_model(output_cls)
        self.last: ChatResponse | None = None

    def partial(self, chunk: ChatResponse) -> FlexibleModel | None:
        """The object so far; None for the last chunk, or while it is not yet an object."""
        self.last = chunk
        text = chunk.message.content or ""
        if result_of(chunk) is not None or not text.strip():
            return None
        try:
            partial = self.flexible.model_validate(parse_partial_json(text))
        except (ValueError, ValidationError):  # not yet an object (e.g. only "{")
            return None
        dispatcher.event(LLMStructuredPredictInProgressEvent(output=partial))
        return partial

    def whole(self) -> Model:
        """The finished object (see :func:`parse_object`)."""
        if self.last is None:
            raise OutputParserException(
                f"the answer ended before its {self.output_cls.__name__} began"
            )
        output = parse_object(self.last, self.output_cls)
        dispatcher.event(LLMStructuredPredictEndEvent(output=output))
        return output


def partial_objects(
    chunks: Iterator[ChatResponse], output_cls: type[Model]
) -> Iterator[Model | FlexibleModel]:
    """Each chunk's JSON so far as a partial object, then the whole object."""
    stream = ObjectStream(output_cls)
    for chunk in chunks:
        partial = stream.partial(chunk)
        if partial is not None:
            yield partial
    yield stream.whole()


async def apartial_objects(
    chunks: AsyncIterator[ChatResponse], output_cls: type[Model]
) -> AsyncGenerator[Model | FlexibleModel, None]:
    """Async :func:`partial_objects`."""
    stream = ObjectStream(output_cls)
    async for chunk in chunks:
        partial = stream.partial(chunk)
        if partial is not None:
            yield partial
    yield stream.whole()
