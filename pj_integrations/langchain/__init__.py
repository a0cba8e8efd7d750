"""LangChain chat model for Persona-judge decoding: :class:`ChatPersonaJudge`.

One local model serves every user; each call decodes with the personas of the user it is
for (their preferences, a saved profile, or a ``user_id`` in the run config). The model
loads on the first call and is shared by every instance on the same model spec.

Also here: :func:`to_conversation` (LangChain messages to ``{"role", "content"}`` dicts) and
:class:`MiniLMEmbeddings`, LangChain embeddings over the packaged all-MiniLM-L6-v2 model for
offline RAG.

Install: ``pip install "persona-judge[langchain]"``.
"""

from pj_integrations.langchain.chat_model import ChatPersonaJudge
from pj_integrations.langchain.config import CONFIG_USER_ID_KEY
from pj_integrations.langchain.embeddings import MiniLMEmbeddings
from pj_integrations.langchain.messages import to_conversation

__all__ = ["CONFIG_USER_ID_KEY", "ChatPersonaJudge", "MiniLMEmbeddings", "to_conversation"]
