"""Engine answers and errors as OpenAI's wire format (built with the ``openai`` package's own
response models, so a field OpenAI renames fails here rather than in a client).

- :func:`completion`: a whole answer as a ``chat.completion`` object;
- :class:`ChunkWriter`: a streamed answer as ``chat.completion.chunk`` objects;
- :func:`error_body`: OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``.

Every response also carries ``persona_judge``: the statistics of the decode and the personas
it used (clients that do not know the field ignore it).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from openai.types import CompletionUsage
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageToolCallUnion,
)
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import (
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.chat.chat_completion_message_function_tool_call import (
    ChatCompletionMessageFunctionToolCall,
    Function,
)

from pj_core.calls import CallRequest
from pj_core.prompts import TOOL_CALL_OPEN
from pj_core.results import GenerationResult, ToolCall
from pj_core.tools import unfinished_call

FinishReason = Literal["stop", "length", "tool_calls"]


def new_id() -> str:
    """A fresh completion id, ``chatcmpl-<hex>``."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def finish_reason(call: CallRequest, result: GenerationResult) -> FinishReason:
    """OpenAI's finish reason: ``tool_calls`` for an answer that calls tools, ``length`` when
    the budget ended it (a tool call cut short included), else ``stop``."""
    if result.tool_calls:
        return "tool_calls"
    if result.finish_reason == "length" or unfinished_call(result, call.generate_kwargs):
        return "length"
    return "stop"


def usage(result: GenerationResult) -> CompletionUsage:
    """Token counts: the prompt (the longest persona prompt) and every emitted token."""
    completion_tokens = len(result.token_ids)
    return CompletionUsage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=result.prompt_tokens + completion_tokens,
    )


def tool_calls(calls: list[ToolCall]) -> list[ChatCompletionMessageToolCallUnion]:
    """The answer's tool calls with their arguments as JSON text (OpenAI's shape)."""
    return [
        ChatCompletionMessageFunctionToolCall(
            id=c.id,
            type="function",
            function=Function(name=c.name, arguments=json.dumps(c.arguments)),
        )
        for c in calls
    ]


def completion(
    call: CallRequest, result: GenerationResult, *, model: str, completion_id: str
) -> dict[str, Any]:
    """The ``chat.completion`` object of a whole answer, with ``persona_judge`` added."""
    message = ChatCompletionMessage(
        role="assistant",
        content=None if result.tool_calls else result.text,
        tool_calls=tool_calls(result.tool_calls) or None,
    )
    body = ChatCompletion(
        id=completion_id,
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[Choice(index=0, message=message, finish_reason=finish_reason(call, result))],
        usage=usage(result),
    ).model_dump(mode="json", exclude_none=True)
    body["choices"][0]["message"].setdefault("content", None)  # OpenAI always sends it
    body["persona_judge"] = call.info(result)
    return body


class ChunkWriter:
    """The ``chat.completion.chunk`` objects of one streamed answer.

    The first chunk says the role; then one chunk per piece of text; the last chunk has the
    finish reason (and, with tools, the calls, whole). With ``include_usage`` a final chunk
    with no choices carries the usage, as OpenAI sends it. When the answer turns out to be a
    tool call (its text opens with the call markup), its text is held back: the calls come
    whole in the last chunk.
    """

    def __init__(self, call: CallRequest, *, model: str, include_usage: bool) -> None:
        self.call = call
        self.model = model
        self.include_usage = include_usage
        self.id = new_id()
        self.created = int(time.time())
        self._calling = False  # the answer is tool calls: their markup is held back
        self._sent_text = False

    def _chunk(
        self, delta: ChoiceDelta | None, reason: FinishReason | None = None, **extra: Any
    ) -> dict[str, Any]:
        choices = [] if delta is None else [ChunkChoice(index=0, delta=delta, finish_reason=reason)]
        body = ChatCompletionChunk(
            id=self.id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model,
            choices=choices,
            **extra,
        ).model_dump(mode="json", exclude_none=True)
        if delta is not None:
            body["choices"][0].setdefault("finish_reason", None)
        return body

    def first(self) -> dict[str, Any]:
        """The opening chunk: the assistant role and no text yet."""
        return self._chunk(ChoiceDelta(role="assistant", content=""))

    def text(self, text: str) -> dict[str, Any] | None:
        """The chunk of a piece of text, or None when there is nothing to send (empty, or
        the markup of a tool call)."""
        if self.call.generate_kwargs.get("tools") and not self._calling:
            self._calling = text.startswith(TOOL_CALL_OPEN[0]) and not self._sent_text
        if not text or self._calling:
            return None
        self._sent_text = True
        return self._chunk(ChoiceDelta(content=text))

    def last(self, result: GenerationResult) -> list[dict[str, Any]]:
        """The closing chunk(s): the finish reason (with the tool calls, if any), then the
        usage chunk if asked for."""
        calls = [
            ChoiceDeltaToolCall(
                index=i,
                id=c.id,
                type="function",
                function=ChoiceDeltaToolCallFunction(
                    name=c.name, arguments=json.dumps(c.arguments)
                ),
            )
            for i, c in enumerate(result.tool_calls)
        ]
        held_back = result.text if self._calling and not result.tool_calls else ""
        delta = ChoiceDelta(content=held_back or None, tool_calls=calls or None)
        last = self._chunk(delta, finish_reason(self.call, result))
        last["persona_judge"] = self.call.info(result)
        chunks = [last]
        if self.include_usage:
            chunks.append(self._chunk(None, usage=usage(result)))
        return chunks


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape.

    Example:
        >>> error_body(404, "no such user", code="profile_not_found")["error"]["type"]
        'invalid_request_error'
    """
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
