"""LlamaIndex adapter: :class:`PersonaJudgeLLM`, a ``FunctionCallingLLM`` that decodes with
Persona-judge.

Plug it in wherever LlamaIndex takes an LLM (query engines, chat engines, ``FunctionAgent``
and other workflow agents, ``FunctionCallingProgram``, selectors, ``Settings.llm``). Tool
calls and structured outputs are constrained: every call names a given tool with valid
arguments, every object parses into its class.

Each object serves one user's personas; ``model_copy(update=...)`` makes another user's copy
that shares the loaded weights. The async methods run generation in a worker thread, so the
event loop stays free while tokens are decoded.

Example:
    >>> from pj_integrations.llama_index import PersonaJudgeLLM
    >>> llm = PersonaJudgeLLM(preferences=["humor", "concise"], max_tokens=32, seed=0)
    >>> print(llm.complete("Name a fruit.").text)  # doctest: +SKIP
    A banana, the comedian of fruits.
    >>> bob = llm.model_copy(update={"preferences": ["expert"]})  # same weights, other persona
"""

from pj_core.threads import iterate_in_thread
from pj_integrations.llama_index.llm import PersonaJudgeLLM

__all__ = ["PersonaJudgeLLM", "iterate_in_thread"]
