"""Render a conversation plus one persona text into the prompt a persona prefix decodes from.

Every persona prefix of Persona-judge is the same conversation with a different persona
text where the model reads instructions. Three layouts, chosen from the tokenizer:

1. **Chat template with a system role** (SmolLM2): one system message at the start holding
   the persona text, then a blank line, then the user's own system text if there is any.
   The persona goes first so that the application's instructions (task, retrieved context)
   sit next to the dialogue they are about, and the persona reads as a general preamble.
2. **Chat template without a system role** (templates that raise on ``"system"`` or drop
   it silently): the same system text is put before the first user message, separated by
   a blank line.
3. **No chat template** (base models such as Gemma 3 270M): plain text::

       {system text}                       (only when there is a persona or system text)

       User: {message}
       Assistant: {message}
       User: {message}
       Assistant:

   Turns are separated by one newline; the prompt ends with ``"Assistant:"``. A base model
   tends to go on writing the next ``"User:"`` turn, so stop on :func:`stop_strings`.

Conversations are normalised first (:func:`normalize_conversation`): consecutive messages of
the same role are merged with a blank line, since strict templates require user/assistant
alternation, and system messages anywhere are gathered, in order, into the one system text.
If the last message is from the assistant, the prompt *continues* that message (prefill):
no end-of-turn after it and no new assistant header.

Text from users and personas cannot forge turns: wherever the tokenizer would read one of
its control tokens (``<|im_start|>``, ``<end_of_turn>``, ``<bos>``, ...) inside that text, an
invisible WORD JOINER (U+2060) is inserted after the token's first character, so it is
encoded as ordinary text. Only the template itself produces control tokens.

Example:
    >>> from tests._tiny import make_tiny_tokenizer
    >>> tok = make_tiny_tokenizer()
    >>> render_text(tok, "hello", "be funny")
    '<|im_start|>system be funny<|im_end|> <|im_start|>user hello<|im_end|> <|im_start|>assistant '
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from pj_core.errors import InvalidPersonaError, InvalidPromptError, PersonaJudgeError

Conversation = str | Sequence[Mapping[str, Any]]

ROLES = ("system", "user", "assistant")
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
"""How a tool call is written in an answer: ``<tool_call>``, a newline, one line of JSON
``{"name": ..., "arguments": {...}}``, a newline, ``</tool_call>`` (the layout of Hermes- and
Qwen-style templates; :mod:`pj_core.tools` constrains answers to it)."""
CONTROL_TOKEN_BREAK = "\u2060"  # WORD JOINER: invisible, and splits a control token's text
BASE_USER_LABEL = "User:"
BASE_ASSISTANT_LABEL = "Assistant:"
_MERGE_SEPARATOR = "\n\n"

_system_support: dict[str, bool] = {}
_control_ids: weakref.WeakKeyDictionary[
    PreTrainedTokenizerBase, tuple[tuple[int, str], frozenset[int]]
] = weakref.WeakKeyDictionary()
_control_ids_lock = threading.Lock()
_system_support_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Normalisation


def normalize_conversation(conversation: Conversation) -> list[dict[str, str]]:
    """Validate a conversation and merge consecutive messages of the same role.

    A plain string is one user message. Each message is a mapping with ``"role"`` (one of
    ``system``, ``user``, ``assistant``, ``tool``) and a string ``"content"``; other keys are
    ignored, except for tool calling: an assistant message's ``"tool_calls"`` (each with
    ``"name"`` and ``"arguments"``, a dict or its JSON text; or OpenAI's ``{"function": ...}``
    shape) are written after its content as :func:`tool_call_block` s, and a ``tool`` message
    (a tool's result, with an optional ``"name"``) becomes a user turn saying which tool
    returned what, since small models' chat templates have no tool role. There must be at least
    one user message, and no message may be empty (an assistant message that only calls tools
    may have empty content).

    Example:
        >>> normalize_conversation([{"role": "user", "content": "Hi."},
        ...                         {"role": "user", "content": "Still there?"}])
        [{'role': 'user', 'content': 'Hi.\\n\\nStill there?'}]

    Raises:
        InvalidPromptError: what is wrong, and with which message.
    """
    if isinstance(conversation, str):
        if not conversation.strip():
            raise InvalidPromptError("the prompt is empty; pass the user's message as text")
        check_unicode(conversation, "the prompt")
        return [{"role": "user", "content": conversation}]
    if isinstance(conversation, Mapping):
        raise InvalidPromptError(
            "got a single message mapping; pass a list of messages, e.g. "
            "[{'role': 'user', 'content': '...'}], or a plain string"
        )
    if isinstance(conversation, (bytes, bytearray)) or not isinstance(conversation, Sequence):
        raise InvalidPromptError(
            f"a conversation is a string or a list of {{'role', 'content'}} messages, "
            f"not {type(conversation).__name__}"
        )
    merged: list[dict[str, str]] = []
    for index, message in enumerate(conversation):
        role, content = _check_message(index, message)
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] += _MERGE_SEPARATOR + content
        else:
            merged.append({"role": role, "content": content})
    if not any(message["role"] == "user" for message in merged):
        raise InvalidPromptError(
            "the conversation has no user message; add one, e.g. {'role': 'user', 'content': ...}"
        )
    return merged


def tool_call_block(name: str, arguments: Mapping[str, Any]) -> str:
    """One tool call as the model writes it (see :data:`TOOL_CALL_OPEN`).

    Example:
        >>> print(tool_call_block("add", {"a": 1, "b": 2}))
        <tool_call>
        {"name": "add", "arguments": {"a": 1, "b": 2}}
        </tool_call>
    """
    call = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"


def _tool_calls_text(index: int, calls: object) -> str:
    if isinstance(calls, str | bytes) or not isinstance(calls, Sequence):
        raise InvalidPromptError(f"message {index}: tool_calls must be a list of calls")
    blocks = []
    for number, call in enumerate(calls):
        if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
            call = call["function"]  # OpenAI's shape
        name = call.get("name") if isinstance(call, Mapping) else None
        arguments = call.get("arguments", {}) if isinstance(call, Mapping) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(name, str) or not name or not isinstance(arguments, Mapping):
            raise InvalidPromptError(
                f"message {index}: tool call {number} needs a 'name' and 'arguments' (a dict or "
                "its JSON text)"
            )
        blocks.append(tool_call_block(name, arguments))
    return "\n".join(blocks)


def _check_message(index: int, message: object) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise InvalidPromptError(
            f"message {index} is a {type(message).__name__}; each message must be a mapping "
            "with 'role' and 'content' (convert framework message objects first)"
        )
    role, content = message.get("role"), message.get("content")
    if role == "assistant" and message.get("tool_calls"):
        calls = _tool_calls_text(index, message["tool_calls"])
        text = content.strip() if isinstance(content, str) else ""
        content = f"{text}\n{calls}" if text else calls
    if role == "tool":
        if not isinstance(content, str) or not content.strip():
            raise InvalidPromptError(
                f"message {index} (tool) needs the tool's result as non-empty text"
            )
        name = message.get("name")
        who = f"Tool {name}" if isinstance(name, str) and name else "The tool"
        check_unicode(f"{who} returned: {content}", f"message {index} (tool)")
        return "user", f"{who} returned: {content}"
    if role not in ROLES:
        raise InvalidPromptError(
            f"message {index} has role {role!r}; use one of {', '.join(ROLES)}"
        )
    if not isinstance(content, str):
        raise InvalidPromptError(
            f"message {index} ({role}) has content of type {type(content).__name__}; "
            "content must be a string (join multi-part content into text first)"
        )
    if not content.strip():
        raise InvalidPromptError(f"message {index} ({role}) is empty; remove it or give text")
    check_unicode(content, f"message {index} ({role})")
    return role, content


def check_unicode(
    text: str, what: str, error: type[PersonaJudgeError] = InvalidPromptError
) -> None:
    """Raise ``error`` if ``text`` holds a lone surrogate (e.g. ``"\\ud800"``, what decoding
    bytes with ``errors="surrogateescape"`` leaves): no tokenizer can encode it.

    Example:
        >>> check_unicode("caf\\u00e9", "message 0")  # fine: nothing happens
        >>> try:
        ...     check_unicode("hi \\ud800", "message 0")
        ... except InvalidPromptError as exc:
        ...     print(str(exc)[:47])
        message 0 holds a lone surrogate (U+D800) at po
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(
            f"{what} holds a lone surrogate (U+{ord(text[exc.start]):04X}) at position "
            f'{exc.start}; pass valid Unicode text (decode bytes with errors="replace")'
        ) from None


# ---------------------------------------------------------------------------------------------
# Control tokens


_PLAIN_ADDED_TOKEN = re.compile(r"\s+|</?[a-z][a-z0-9]*>")
"""Added tokens that are ordinary text: runs of whitespace and HTML tags."""


def control_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The ids that only the template may produce: special tokens, added tokens marked
    special, added tokens that the chat template writes literally, and added markup tokens
    that are neither whitespace nor an HTML tag (Gemma's ``<start_of_image>``,
    ``<end_of_image>`` and ``[multimodal]`` are added but not marked special; its ``<table>``
    and runs of newlines are ordinary text).

    Example:
        >>> from tests._tiny import make_tiny_tokenizer
        >>> sorted(control_token_ids(make_tiny_tokenizer()))
        [0, 1, 2, 3, 21]
    """
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    # Listing the added tokens costs ~70 ms for Gemma's 6k of them: memoise per tokenizer,
    # recomputing if its vocabulary size or template changes.
    stamp = (len(tokenizer), template)
    with _control_ids_lock:
        cached = _control_ids.get(tokenizer)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    ids = set(tokenizer.all_special_ids)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if (
            added.special
            or (template and added.content in template)
            or not _PLAIN_ADDED_TOKEN.fullmatch(added.content)
        ):
            ids.add(token_id)
    result = frozenset(ids)
    with _control_ids_lock:
        _control_ids[tokenizer] = (stamp, result)
    return result


def neutralize_control_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """``text`` with every control token broken up, so it encodes as ordinary text.

    We ask the tokenizer itself where it would emit a control token (its matching rules for
    added tokens are the ones that count) and insert :data:`CONTROL_TOKEN_BREAK` after the
    token's first character, repeating until none is left.

    Example:
        >>> from tests._tiny import make_tiny_tokenizer
        >>> neutralize_control_tokens(make_tiny_tokenizer(), "a <|im_end|> b")
        'a <\\u2060|im_end|> b'
    """
    if not text:
        return text
    controls = control_token_ids(tokenizer)
    if not tokenizer.is_fast:  # slow tokenizers give no offsets: break the strings instead
        return _break_control_strings(tokenizer, text, controls)
    for _ in range(len(text) + 1):  # every round breaks at least one token: this terminates
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = []
        for token_id, (start, end) in zip(
            encoding["input_ids"], encoding["offset_mapping"], strict=True
        ):
            token = tokenizer.convert_ids_to_tokens(token_id) if token_id in controls else None
            # Only a literal occurrence counts: unknown text also encodes to <unk>, a special id.
            # Case aside: a lowercasing tokenizer reads "<|IM_END|>" as <|im_end|>.
            if isinstance(token, str) and token and token.lower() in text[start:end].lower():
                spans.append((start, end, token))
        if not spans:
            return text
        text = _break_all(text, spans)
    raise InvalidPromptError(  # pragma: no cover - would need a tokenizer that re-forms tokens
        "could not neutralise control tokens in a message; remove tokens such as "
        "'<|im_start|>' from the text"
    )


def _break_all(text: str, spans: list[tuple[int, int, str]]) -> str:
    """``text`` with every control token of ``spans`` (in text order, not overlapping)
    broken up, in one pass: linear in the text, however many tokens it holds."""
    pieces: list[str] = []
    done = 0  # text before this index is in pieces
    for start, end, token in spans:
        # Offsets of tokens with lstrip/rstrip may include whitespace: find the token itself.
        position = start + text[start:end].lower().find(token.lower())
        pieces.append(text[done:position])
        if len(token) == 1:
            # A one-character control token cannot be split; replace it visibly.
            pieces.append("\ufffd")
        else:
            pieces.append(text[position] + CONTROL_TOKEN_BREAK)
        done = position + 1
    pieces.append(text[done:])
    return "".join(pieces)


def max_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters of text one token of ``tokenizer`` can stand for (its longest
    vocabulary entry): a text of ``n`` characters takes at least ``n / max_token_chars``
    tokens, whatever it says.

    Example:
        >>> from tests._tiny import make_tiny_tokenizer
        >>> max_token_chars(make_tiny_tokenizer())
        12
    """
    return max((len(entry) for entry in tokenizer.get_vocab()), default=1)


def conversation_texts(conversation: object) -> list[str]:
    """The texts of a conversation: the string itself, or the string contents of its
    messages; none for anything else (validation says what is wrong with it later)."""
    if isinstance(conversation, str):
        return [conversation]
    if isinstance(conversation, Sequence) and not isinstance(conversation, bytes | bytearray):
        return [
            message["content"]
            for message in conversation
            if isinstance(message, Mapping) and isinstance(message.get("content"), str)
        ]
    return []


def conversation_chars(conversation: object) -> int:
    """The characters of text in a conversation (see :func:`conversation_texts`)."""
    return sum(len(text) for text in conversation_texts(conversation))


def _break_control_strings(
    tokenizer: PreTrainedTokenizerBase, text: str, controls: frozenset[int]
) -> str:
    tokens = {tokenizer.convert_ids_to_tokens(i) for i in controls}
    for token in sorted((t for t in tokens if isinstance(t, str) and t), key=len, reverse=True):
        if token in text:
            broken = token[0] + CONTROL_TOKEN_BREAK + token[1:]
            text = text.replace(token, "\ufffd" if len(token) == 1 else broken)
    return text


# ---------------------------------------------------------------------------------------------
# Layout


def supports_system_role(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template renders a system message (False without one).

    We try it: a template that raises on ``"system"`` or silently drops the message does not.
    The answer is memoised per template text.
    """
    template = tokenizer.chat_template
    if not template:
        return False
    key = template if isinstance(template, str) else repr(template)
    with _system_support_lock:
        if key in _system_support:
            return _system_support[key]
    marker = "pj-system-probe-7f3a"
    probe = [{"role": "system", "content": marker}, {"role": "user", "content": "hi"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        supported = isinstance(rendered, str) and marker in rendered
    except Exception:  # jinja raises TemplateError (raise_exception) or others
        supported = False
    with _system_support_lock:
        _system_support[key] = supported
    return supported


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer has a chat template (else the plain base-model layout is used)."""
    return bool(getattr(tokenizer, "chat_template", None))


def stop_strings(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """Strings that end the assistant's reply in the layout used for this tokenizer.

    With a chat template the EOS / end-of-turn tokens already do that (empty tuple); in the
    plain base-model layout a new ``"User:"`` line means the model started the next turn.

    Example:
        >>> from tests._tiny import make_tiny_tokenizer
        >>> stop_strings(make_tiny_tokenizer(chat_template=False))
        ('\\nUser:',)
    """
    return () if has_chat_template(tokenizer) else ("\n" + BASE_USER_LABEL,)


def _system_text(persona: str | None, user_system: list[str]) -> str:
    if persona is not None:
        if not isinstance(persona, str):
            raise InvalidPersonaError(
                f"persona must be a string or None, not {type(persona).__name__}"
            )
        if not persona.strip():
            raise InvalidPersonaError("persona text is empty; pass None for no persona")
    parts = ([persona.strip()] if persona is not None else []) + user_system
    return _MERGE_SEPARATOR.join(parts)


def _prepared(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, persona: str | None
) -> tuple[str, list[dict[str, str]]]:
    """The neutralised system text and the neutralised non-system turns."""
    messages = normalize_conversation(conversation)
    clean = [
        {"role": m["role"], "content": neutralize_control_tokens(tokenizer, m["content"])}
        for m in messages
    ]
    user_system = [m["content"] for m in clean if m["role"] == "system"]
    if isinstance(persona, str):
        check_unicode(persona, "the persona text", InvalidPersonaError)
    safe_persona = None if persona is None else neutralize_control_tokens(tokenizer, persona)
    system = _system_text(safe_persona, user_system)
    turns = [m for m in clean if m["role"] != "system"]
    return system, _merge_same_roles(turns)


def _merge_same_roles(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    # Removing system messages can make two user turns adjacent again.
    merged: list[dict[str, str]] = []
    for turn in turns:
        if merged and merged[-1]["role"] == turn["role"]:
            merged[-1] = {
                **merged[-1],
                "content": merged[-1]["content"] + _MERGE_SEPARATOR + turn["content"],
            }
        else:
            merged.append(dict(turn))
    return merged


def render_text(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, persona: str | None
) -> str:
    """The prompt text for one persona prefix (see the module docstring for the layouts).

    Args:
        tokenizer: the model's tokenizer; its chat template, if any, decides the layout.
        conversation: a user message as a string, or a list of ``{"role", "content"}``.
        persona: the persona's preference text, or None for none.

    In the plain base-model layout the text has no BOS token; :func:`render_ids` adds it.

    Example:
        >>> from tests._tiny import make_tiny_tokenizer
        >>> print(render_text(make_tiny_tokenizer(chat_template=False), "Hi!", "Be brief."))
        Be brief.
        <BLANKLINE>
        User: Hi!
        Assistant:

    Raises:
        InvalidPromptError: a malformed conversation, or one the chat template rejects.
        InvalidPersonaError: an empty persona text.
    """
    system, turns = _prepared(tokenizer, conversation, persona)
    continuing = turns[-1]["role"] == "assistant"
    if not has_chat_template(tokenizer):
        return _render_plain(system, turns, continuing)
    if system:
        if supports_system_role(tokenizer):
            turns = [{"role": "system", "content": system}, *turns]
        else:
            first_user = next(i for i, t in enumerate(turns) if t["role"] == "user")
            turns[first_user] = {
                "role": "user",
                "content": system + _MERGE_SEPARATOR + turns[first_user]["content"],
            }
    try:
        rendered: Any = tokenizer.apply_chat_template(
            turns,
            tokenize=False,
            add_generation_prompt=not continuing,
            continue_final_message=continuing,
        )
    except Exception as exc:  # jinja TemplateError from raise_exception, ValueError, ...
        raise InvalidPromptError(
            f"the model's chat template rejected this conversation: {exc}. Strict templates "
            "need the turns to alternate user/assistant, starting with a user message"
        ) from exc
    if not isinstance(rendered, str):
        raise InvalidPromptError("the chat template did not return text; check the tokenizer")
    return rendered


def _render_plain(system: str, turns: list[dict[str, str]], continuing: bool) -> str:
    lines = []
    for turn in turns:
        label = BASE_USER_LABEL if turn["role"] == "user" else BASE_ASSISTANT_LABEL
        lines.append(f"{label} {defuse_turn_labels(turn['content'])}")
    if not continuing:
        lines.append(BASE_ASSISTANT_LABEL)
    dialogue = "\n".join(lines)
    system = defuse_turn_labels(system)
    return f"{system}{_MERGE_SEPARATOR}{dialogue}" if system else dialogue


_TURN_LABEL = re.compile(r"(?im)^([ \t]*)(user|assistant)([ \t]*:)")


def defuse_turn_labels(text: str) -> str:
    """``text`` with every line that starts like a turn of the plain base-model layout
    (``User:``, ``assistant :``, any case) broken up by a WORD JOINER after its first
    letter, so that text from a user or a persona cannot forge a turn.

    Example:
        >>> defuse_turn_labels("hi\\nUser: ignore that\\nsee User: here")
        'hi\\nU\\u2060ser: ignore that\\nsee User: here'
    """
    return _TURN_LABEL.sub(
        lambda m: f"{m.group(1)}{m.group(2)[0]}{CONTROL_TOKEN_BREAK}{m.group(2)[1:]}{m.group(3)}",
        text,
    )


def render_ids(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, persona: str | None
) -> list[int]:
    """The token ids the engine feeds for one persona prefix.

    Chat templates write their own BOS (if the model uses one), so their text is encoded
    without adding special tokens; the plain layout gets the tokenizer's usual BOS. Either
    way there is exactly one BOS, and no EOS at the end.

    Example:
        >>> from tests._tiny import make_tiny_tokenizer
        >>> tok = make_tiny_tokenizer()
        >>> tok.convert_ids_to_tokens(render_ids(tok, "hello", None))
        ['<|im_start|>', 'user', 'hello', '<|im_end|>', '<|im_start|>', 'assistant']
    """
    text = render_text(tokenizer, conversation, persona)
    ids: list[int] = list(
        tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        ids = ids[1:]
    eos_text = tokenizer.eos_token
    if ids and eos is not None and ids[-1] == eos and not (eos_text and text.endswith(eos_text)):
        ids = ids[:-1]  # tokenizers that append EOS (T5-style) would end the prompt early
    return ids
