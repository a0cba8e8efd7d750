"""``pj serve``: an OpenAI-compatible chat-completions server that personalises each request.

A request's ``user`` names the saved profile (``pj profiles add``) whose preferences the
answer follows; any OpenAI client works unchanged::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    answer = client.chat.completions.create(
        model="smollm2-135m-instruct", user="alice",
        messages=[{"role": "user", "content": "Any ideas for a birthday?"}])

- :mod:`pj_core.server.schemas`: the request (OpenAI's fields, plus ``persona_judge``);
- :mod:`pj_core.server.responses`: answers, chunks and errors in OpenAI's shapes;
- :mod:`pj_core.server.app`: the FastAPI application (:func:`create_app`, :class:`ServerConfig`);
- :mod:`pj_core.server.auth`: API keys (hashed in a key file, or ``PJ_API_KEYS``), per user.

FastAPI, uvicorn, sse-starlette and openai come with the ``serve`` extra:
``pip install 'persona-judge[serve]'``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``pj keys`` (pj_core.server.auth) works without the serve extra.
    if name in __all__:
        return getattr(importlib.import_module("pj_core.server.app"), name)
    raise AttributeError(f"module 'pj_core.server' has no attribute {name!r}")
