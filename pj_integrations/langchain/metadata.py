"""What ChatPersonaJudge tells LangChain about itself: LangSmith tracing parameters and the
model profile (capabilities, context window)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile

from pj_core.calls import is_loaded, shared_engine


def langsmith_params(
    model: str,
    temperature: float | None,
    max_tokens: int | None,
    default_stop: Sequence[str] | None,
    stop: Sequence[str] | None,
    call: Mapping[str, Any],
) -> LangSmithParams:
    """The ``ls_*`` tracing parameters of one call (its options over the instance's).

    Example:
        >>> langsmith_params("smollm2-135m-instruct", 0.7, None, None, ["\\n"], {})["ls_stop"]
        ['\\n']
    """
    chosen = call.get("model")
    params = LangSmithParams(
        ls_provider="persona_judge",
        ls_model_name=chosen if isinstance(chosen, str) else model,
        ls_model_type="chat",
    )
    temperature = call.get("temperature", temperature)
    if temperature is not None:
        params["ls_temperature"] = temperature
    max_tokens = call.get("max_tokens", max_tokens)
    if max_tokens is not None:
        params["ls_max_tokens"] = max_tokens
    stops = stop if stop is not None else default_stop
    if stops:
        params["ls_stop"] = list(stops)
    return params


def model_profile(model: str, backend: str | None = None) -> ModelProfile:
    """What the model can do. The context window is known once the model is loaded; loading
    it here would make constructing an instance cost seconds, so a cold instance learns it on
    first use."""
    profile = ModelProfile(
        name=model,
        open_weights=True,
        text_inputs=True,
        image_inputs=False,
        image_url_inputs=False,
        pdf_inputs=False,
        audio_inputs=False,
        video_inputs=False,
        text_outputs=True,
        image_outputs=False,
        audio_outputs=False,
        video_outputs=False,
        tool_calling=True,
        tool_choice=True,
        structured_output=True,
        reasoning_output=False,
        temperature=True,
    )
    if is_loaded(model, backend):
        profile["max_input_tokens"] = shared_engine(model, backend).engine.context_window
    return profile
