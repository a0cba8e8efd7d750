"""Per-user calls through LangChain's run config: ``configurable["user_id"]``.

Example:
    >>> with_config_user({"configurable": {"user_id": "alice"}}, {})
    {'user_id': 'alice'}
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ensure_config

if TYPE_CHECKING:
    from pj_core.calls import AdapterSettings

CONFIG_USER_ID_KEY = "user_id"
"""Key of ``RunnableConfig["configurable"]`` holding the id of the user a call is for."""

PERSONA_KWARGS = ("preferences", "persona", "profile_id", "user_id")
"""Per-call arguments that choose the personas; any of them wins over the config's user."""

_Method = TypeVar("_Method", bound=Callable[..., Any])


def with_config_user(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Add the run config's user id as the call's ``user_id``, unless the call already
    chose its personas explicitly (explicit arguments win over the config)."""
    if any(kwargs.get(name) is not None for name in PERSONA_KWARGS):
        return kwargs
    user_id = ensure_config(config).get("configurable", {}).get(CONFIG_USER_ID_KEY)
    if user_id is None:
        return kwargs
    return {**kwargs, "user_id": user_id}


def reads_config_user(method: _Method) -> _Method:
    """``method`` (a public ``Runnable`` entry point such as ``BaseChatModel.invoke``) with
    the run config's user id passed on as the call's ``user_id`` (:func:`with_config_user`).

    LangChain hands a chat model's ``_generate``/``_stream`` the call's keyword arguments but
    not its ``RunnableConfig`` (it only reaches them through a context variable when the
    model runs inside a chain), so the id is read where the config is given: at the public
    entry points, each declared once with this function. The wrapped method is the
    inherited public one, unchanged otherwise (same return value: a message, a generator, a
    coroutine or an event stream).

    Example:
        >>> from langchain_core.language_models import BaseChatModel
        >>> class Chat(BaseChatModel):  # doctest: +SKIP
        ...     invoke = reads_config_user(BaseChatModel.invoke)
    """

    @functools.wraps(method)
    def with_user(
        self: Any, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Any:
        kwargs = with_config_user(config, kwargs)
        return method(self, input, config, **with_profile_revision(kwargs, self.profile_store))

    return cast(_Method, with_user)


# LangChain's standard chat model parameters that only a remote model uses: accepted (code
# such as init_chat_model passes them to any chat model) and ignored, since a local model
# has no connection to time out or retry and no key.
NETWORK_PARAMS = frozenset({"timeout", "max_retries", "api_key"})


REVISION_KWARG = "profile_revision"
"""A call's keyword argument carrying the saved revision of the profile it reads: LangChain
builds its LLM cache key from the call's keyword arguments, so an edited profile is a new key
(the adapter drops it before building the request)."""


def with_profile_revision(kwargs: dict[str, Any], store: Any) -> dict[str, Any]:
    """``kwargs`` with the revision of the profile its ``user_id``/``profile_id`` names (none
    when the call names no user, or the user has no saved profile: the call then says so)."""
    from pj_core.calls import profile_revision

    user = kwargs.get("user_id") or kwargs.get("profile_id")
    revision = profile_revision(user, store) if isinstance(user, str) else None
    return kwargs if revision is None else {**kwargs, REVISION_KWARG: revision}


def identifying_params(settings: AdapterSettings) -> dict[str, Any]:
    """A chat model's ``_identifying_params`` (LangChain's LLM cache key): the model, the
    generation settings and persona options that are set, and the saved revision of the
    instance's profile, so an edited profile makes a new key."""
    from pj_core.calls import profile_revision

    params: dict[str, Any] = {"model": settings.model}
    if settings.backend is not None:
        params["backend"] = settings.backend
    params.update({k: v for k, v in settings.generation.items() if v is not None})
    for name in ("preferences", "persona", "profile_id"):
        if getattr(settings.personas, name) is not None:
            params[name] = getattr(settings.personas, name)
    if settings.personas.profile_id is not None:
        params[REVISION_KWARG] = profile_revision(
            settings.personas.profile_id, settings.profile_store
        )
    return params
