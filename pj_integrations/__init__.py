"""Framework adapters for persona-judge: thin translations between a framework's types and
:mod:`pj_core`, no algorithm code.

Importing this package imports neither LangChain nor LlamaIndex; each adapter lives in its
own module and needs its framework's extra:

- :mod:`pj_integrations.langchain`: ``ChatPersonaJudge`` (``pip install
  "persona-judge[langchain]"``);
- :mod:`pj_integrations.llama_index`: ``PersonaJudgeLLM`` (``pip install
  "persona-judge[llamaindex]"``).

Example:
    >>> import sys, pj_integrations
    >>> "langchain_core" in sys.modules or "llama_index.core" in sys.modules  # doctest: +SKIP
    False
    >>> from pj_integrations.langchain import ChatPersonaJudge  # doctest: +SKIP
"""
