"""Many prompts in ONE batched decode: ``PersonaJudgeLLM.complete_batch`` and ``chat_batch``.

LlamaIndex's LLM interface has no batch call; these serve many prompts (e.g. many users'
copies of one query) with one batched decode instead of one call each.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse

from pj_core.calls import CallRequest, adapter_names, name_request
from pj_core.errors import InvalidPromptError, PersonaJudgeError
from pj_core.results import GenerationResult
from pj_integrations.llama_index.messages import chat_response, completion_response


class _Host(Protocol):
    """What the batch calls use of the LLM they are mixed into."""

    rate_limiter: Any

    def _plan(
        self, conversation: list[dict[str, Any]], options: Mapping[str, Any]
    ) -> CallRequest: ...

    def _completion_conversation(self, prompt: str, formatted: bool) -> list[dict[str, str]]: ...

    def _chat_conversation(self, messages: Sequence[ChatMessage]) -> list[dict[str, Any]]: ...


class BatchCalls:
    """``complete_batch`` and ``chat_batch`` of :class:`PersonaJudgeLLM` (a mixin)."""

    def complete_batch(
        self: _Host,
        prompts: Sequence[str],
        formatted: bool = False,
        *,
        profile_ids: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> list[CompletionResponse]:
        """Answer several prompts in ONE batched decode
        (:meth:`pj_core.engine.PersonaJudge.generate_batch`); responses in prompt order.

        Each prompt is read as :meth:`complete` reads it, and ``kwargs`` (personas or
        settings) apply to every prompt; ``profile_ids`` gives each prompt its own user (one
        saved profile id per prompt, ``None`` for the object's personas). Each response is
        :meth:`complete`'s for the same settings and seed (up to rare float rounding
        differences between batched and single forwards); its ``stats`` describe the
        batched run (``strategy`` is ``"lockstep"``). A prompt that fails validation raises
        its typed error, whose message starts with ``request <index>:``, before anything is
        decoded. LlamaIndex's per-call LLM events belong to :meth:`complete` and are not
        emitted by a batch.

        Example:
            >>> llm = PersonaJudgeLLM(preferences=["humor", "concise"], max_tokens=32, seed=0)
            >>> replies = llm.complete_batch(["Name a fruit.", "Name a tree."])  # doctest: +SKIP
            >>> [r.additional_kwargs["finish_reason"] for r in replies]  # doctest: +SKIP
            ['eos', 'eos']
            >>> llm.complete_batch(["Hi!", "Hi!"], profile_ids=["alice", "bob"])  # doctest: +SKIP
        """
        if isinstance(prompts, str):
            raise InvalidPromptError(
                "complete_batch takes a list of prompts, e.g. ['Hi!', 'Why?']; for one prompt "
                "use complete()"
            )
        options = _per_item_options(kwargs, profile_ids, len(prompts))
        plans = [
            _batch_plan(
                self,
                index,
                functools.partial(self._completion_conversation, prompt, formatted),
                options[index],
            )
            for index, prompt in enumerate(prompts)
        ]
        results = _generate_batch(self, plans)
        return [
            completion_response(result, plan) for result, plan in zip(results, plans, strict=True)
        ]

    def chat_batch(
        self: _Host,
        messages_list: Sequence[Sequence[ChatMessage]],
        *,
        profile_ids: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> list[ChatResponse]:
        """Answer several conversations in ONE batched decode; responses in input order.

        :meth:`complete_batch` for :meth:`chat`: each conversation is rendered as
        :meth:`chat` renders it (``profile_ids``: one user per conversation), and each
        response equals :meth:`chat`'s with the same settings and seed.

        Example:
            >>> from llama_index.core.llms import ChatMessage
            >>> llm = PersonaJudgeLLM(preferences=["concise", "expert"], max_tokens=48, seed=1)
            >>> talks = [[ChatMessage(role="user", content="What is RAG?")],
            ...          [ChatMessage(role="user", content="What is BM25?")]]
            >>> [r.message.content for r in llm.chat_batch(talks)]  # doctest: +SKIP
        """
        if isinstance(messages_list, str) or any(
            isinstance(item, ChatMessage | str) for item in messages_list
        ):
            raise InvalidPromptError(
                "chat_batch takes a list of conversations, each a list of ChatMessage; for "
                "one conversation use chat()"
            )
        options = _per_item_options(kwargs, profile_ids, len(messages_list))
        plans = [
            _batch_plan(
                self,
                index,
                functools.partial(self._chat_conversation, messages),
                options[index],
            )
            for index, messages in enumerate(messages_list)
        ]
        results = _generate_batch(self, plans)
        return [chat_response(result, plan) for result, plan in zip(results, plans, strict=True)]


def _per_item_options(
    kwargs: Mapping[str, Any], profile_ids: Sequence[str | None] | None, count: int
) -> list[dict[str, Any]]:
    """Each item's call options: ``kwargs``, and its own ``profile_id`` when given."""
    if profile_ids is None:
        return [dict(kwargs)] * count
    if isinstance(profile_ids, str) or len(profile_ids) != count:
        raise InvalidPromptError(
            f"profile_ids needs one user id (or None) per item: {count} items, got {profile_ids!r}"
        )
    return [
        dict(kwargs) if user is None else {**kwargs, "profile_id": user} for user in profile_ids
    ]


def _batch_plan(
    llm: _Host,
    index: int,
    conversation: Callable[[], list[dict[str, Any]]],
    options: Mapping[str, Any],
) -> CallRequest:
    """The plan of one batch item; its error names the item, as generate_batch's do."""
    try:
        return llm._plan(conversation(), options)
    except PersonaJudgeError as exc:
        raise name_request(exc, index) from None


def _generate_batch(llm: _Host, plans: list[CallRequest]) -> list[GenerationResult]:
    if not plans:
        return []
    if not all(plan.batchable for plan in plans):
        # An option generate_batch has no field for: only single calls honour it.
        return [plan.generate() for plan in plans]
    if llm.rate_limiter is not None:
        for _ in plans:  # one token per answer, as for single calls
            llm.rate_limiter.acquire()
    requests = [plan.batch_request() for plan in plans]
    # Every plan of one object decodes with the object's engine.
    with adapter_names():
        results: list[GenerationResult] = plans[0].engine.generate_batch(requests)
    return results
