"""LlamaIndex chat messages and responses as ``pj_core`` conversations, and back."""

from __future__ import annotations

from collections.abc import Mapping

from llama_index.core.base.llms.types import (
    AudioBlock,
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    DocumentBlock,
    ImageBlock,
    MessageRole,
    VideoBlock,
)

from pj_core.errors import InvalidPromptError

# LlamaIndex has more roles than chat templates know; these keep each message's meaning.
_ROLE_NAMES: Mapping[MessageRole, str] = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    # Tool results are what the user side hands back to the model; few small models' chat
    # templates know a "tool" role, so they are shown as user turns.
    MessageRole.TOOL: "user",
    MessageRole.FUNCTION: "user",
}
_MEDIA_BLOCKS = (ImageBlock, AudioBlock, VideoBlock, DocumentBlock)


def message_to_dict(message: ChatMessage) -> dict[str, str]:
    if any(isinstance(block, _MEDIA_BLOCKS) for block in message.blocks):
        raise InvalidPromptError(
            "PersonaJudgeLLM reads text only: remove image, audio, video and document blocks "
            "from the messages (or describe them in text)"
        )
    return {"role": _ROLE_NAMES.get(message.role, "user"), "content": message.content or ""}


def chunk_to_chat(chunk: CompletionResponse) -> ChatResponse:
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, content=chunk.text),
        delta=chunk.delta,
        raw=chunk.raw,
        additional_kwargs=chunk.additional_kwargs,
    )
