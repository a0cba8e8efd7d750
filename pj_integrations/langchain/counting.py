"""Token counts of LangChain messages as a call uses them, for ``get_num_tokens_from_messages``.

LangChain's ``trim_messages`` counts parts of a conversation, and counts them in reverse order
(its ``strategy="last"``), so the count must add up message by message whatever the order; a
chat template's count depends on the order. :func:`count_message_tokens` adds: what every
call costs once (the chat template's frame, the persona texts, the tools' text), each
message's text, and the turn markers of each turn after the first, all measured by rendering
small conversations with the call's own settings. For an alternating conversation with a
system message this is the rendered prompt's count; otherwise it is a little more (turns of
one role rendered together share their markers), never less, so trimmed messages fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from pj_core.calls import CallRequest

_WORD = "hello"


def count_message_tokens(
    request_for: Callable[[list[BaseMessage]], CallRequest],
    tokens: Callable[[str], int],
    messages: Sequence[BaseMessage],
) -> int:
    """The tokens ``messages`` take in a call's context window, added message by message.

    Args:
        request_for: the adapter's request builder for a list of messages (with the call's
            personas, settings and tools).
        tokens: the model's token count of a text.
        messages: the messages to count.
    """
    word = tokens(_WORD)
    one = request_for([SystemMessage(_WORD), HumanMessage(_WORD)]).prompt_tokens()
    three = request_for(
        [SystemMessage(_WORD), HumanMessage(_WORD), AIMessage(_WORD), HumanMessage(_WORD)]
    ).prompt_tokens()
    once = max(one - 2 * word, 0)
    per_turn = max(-(-(three - one - 2 * word) // 2), 0)  # ceil: never under
    turns = sum(not isinstance(message, SystemMessage) for message in messages)
    text = sum(tokens(message.text) for message in messages)
    return once + text + per_turn * max(turns - 1, 0)
