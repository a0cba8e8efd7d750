"""Per-user calls through LangChain's run config: ``configurable["user_id"]``.

Example:
    >>> with_config_user({"configurable": {"user_id": "alice"}}, {})
    {'user_id': 'alice'}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config

from pj_core.errors import InvalidPersonaError

CONFIG_USER_ID_KEY = "user_id"
"""Key of ``RunnableConfig["configurable"]`` holding the id of the user a call is for."""

PERSONA_KWARGS = ("preferences", "persona", "profile_id", "user_id")
"""Per-call arguments that choose the personas; any of them wins over the config's user."""


def with_config_user(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Add the run config's user id as the call's ``user_id``, unless the call already
    chose its personas explicitly (explicit arguments win over the config)."""
    if any(kwargs.get(name) is not None for name in PERSONA_KWARGS):
        return kwargs
    user_id = ensure_config(config).get("configurable", {}).get(CONFIG_USER_ID_KEY)
    if user_id is None:
        return kwargs
    return {**kwargs, "user_id": user_id}


def call_user_id(kwargs: Mapping[str, Any]) -> str | None:
    profile_id, user_id = kwargs.get("profile_id"), kwargs.get("user_id")
    if profile_id is not None and user_id is not None and profile_id != user_id:
        raise InvalidPersonaError(
            f"profile_id={profile_id!r} and user_id={user_id!r} disagree; pass one of them"
        )
    chosen = profile_id if profile_id is not None else user_id
    if chosen is not None and not isinstance(chosen, str):
        raise InvalidPersonaError(
            f"a user id must be a string, got {type(chosen).__name__}: {chosen!r}"
        )
    return chosen
