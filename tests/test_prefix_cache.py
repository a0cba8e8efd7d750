"""Prefix caching (``pj_core.backends.hf.prefix_cache``): prompts that begin like earlier ones
reuse those beginnings' keys and values instead of computing them again, with the same logits
(up to float rounding) and, through the scheduler, each request's own tokens."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from pj_core.backends.hf.kv import BatchedContexts
from pj_core.backends.hf.models import LoadedModel
from pj_core.backends.hf.prefix_cache import PrefixCache
from pj_core.batch import generate_batch
from pj_core.engine import PersonaJudge
from pj_core.errors import InvalidGenerationConfigError
from pj_core.scheduler import ContinuousBatcher


def _layers(length: int, fill: float, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # [1, heads, slots, head_dim]; slot i holds fill + i so that slices can be told apart
    slots = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1) + fill
    return [(slots.expand(1, 2, length, 3).clone(), -slots.expand(1, 2, length, 3).clone())] * (
        layers
    )


def test_lookup_finds_the_longest_common_beginning() -> None:
    cache = PrefixCache(max_tokens=100, min_tokens=3)
    cache.store([1, 2, 3, 4, 5, 6], _layers(6, 0.0))
    cache.store([1, 2, 9, 9, 9], _layers(5, 100.0))
    length, layers = cache.lookup([1, 2, 3, 4, 7, 7])
    assert length == 4 and layers is not None
    assert layers[0][0][0, 0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0]  # the first entry's slots
    assert cache.lookup([1, 2, 7, 7]) == (0, None)  # 2 shared tokens < min_tokens
    assert cache.lookup([1, 2, 3, 4, 5, 6])[0] == 5  # the last token is always fed
    assert (cache.hits, cache.reused_tokens) == (2, 9)


def test_store_keeps_the_budget_and_drops_the_least_recently_used() -> None:
    cache = PrefixCache(max_tokens=10, min_tokens=2)
    cache.store([1, 2, 3, 4], _layers(4, 0.0))
    cache.store([5, 6, 7, 8], _layers(4, 0.0))
    cache.lookup([1, 2, 3, 9])  # [1, 2, 3, 4] is now the most recently used
    cache.store([7, 7, 7, 7], _layers(4, 0.0))  # 12 tokens > 10: [5, 6, 7, 8] goes
    assert cache.tokens == 8
    assert cache.lookup([5, 6, 7, 9]) == (0, None)
    assert cache.lookup([1, 2, 3, 9])[0] == 3
    cache.store([1, 2], _layers(2, 0.0))  # a beginning of an entry: adds nothing
    assert cache.tokens == 8
    cache.store([7, 7, 7, 7, 7, 7], _layers(6, 0.0))  # replaces its own beginning
    assert cache.tokens == 10
    cache.store(list(range(20, 40)), _layers(20, 0.0))  # longer than the budget: not kept
    assert cache.tokens == 10
    cache.clear()
    assert cache.tokens == 0 and cache.lookup([1, 2, 3, 9]) == (0, None)
    with pytest.raises(ValueError, match="max_tokens"):
        PrefixCache(max_tokens=0)


def _fed_widths(model: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the input width of each forward of ``model``."""
    widths: list[int] = []
    forward = model.forward

    @functools.wraps(forward)  # the engine reads the forward's signature
    def counting(*args: Any, **kwargs: Any) -> Any:
        widths.append(int(kwargs["input_ids"].shape[1]))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    return widths


def test_rows_reusing_a_beginning_step_like_a_fresh_prefill(
    tiny_model: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = [5, 6, 7, 8, 9, 10, 11, 12]
    first = [[*system, 13, 14], [*system, 15]]
    cache = PrefixCache(min_tokens=4)
    with torch.inference_mode():
        BatchedContexts(tiny_model, first, cache)
        assert cache.tokens == 10 + 9
        # Rows that share the system part, one that shares nothing, one reused whole.
        later = [[*system, 16, 17, 18], [3, 4, 5, 6, 7], [*system, 13, 14], [*system[:6], 4]]
        widths = _fed_widths(tiny_model, monkeypatch)
        reused = BatchedContexts(tiny_model, later, cache)
        fresh = BatchedContexts(tiny_model, later)
        # One forward fed each row only what it did not reuse (the widest: all 5 tokens of
        # the row that shares nothing); the fresh prefill fed the longest row whole.
        assert widths == [5, 11]
        assert cache.hits == 3
        for step in ([19, 20, 21, 2], [3, 4, 5, 6]):
            expected = fresh.step(step)
            assert torch.allclose(reused.step(step), expected, atol=1e-5)


def test_rows_reusing_beginnings_join_a_running_batch(tiny_model: LlamaForCausalLM) -> None:
    system = [5, 6, 7, 8, 9, 10]
    cache = PrefixCache(min_tokens=4)
    with torch.inference_mode():
        running = BatchedContexts(tiny_model, [[*system, 11, 12]], cache)
        plain = BatchedContexts(tiny_model, [[*system, 11, 12]])
        for token in (13, 14):
            running.step([token])
            plain.step([token])
        running.add_rows([[*system, 15], [3, 3, 3]])
        plain.add_rows([[*system, 15], [3, 3, 3]])
        assert cache.hits == 1
        for step in ([16, 17, 18], [19, 20, 21]):
            assert torch.allclose(running.step(step), plain.step(step), atol=1e-5)


# ----------------------------------------------------------------------------- the scheduler


@pytest.fixture()
def engine(tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast) -> PersonaJudge:
    return PersonaJudge(tiny_model, tiny_tokenizer, context_window=200)


def _request(conversation: str, seed: int, **extra: object) -> dict[str, object]:
    return {
        "conversation": conversation,
        "personas": ["be funny and kind to the cat", "be brief about the dog"],
        "seed": seed,
        "max_new_tokens": 12,
        "temperature": 1.0,
        **extra,
    }


def test_the_scheduler_reuses_persona_beginnings_with_the_same_tokens(
    engine: PersonaJudge,
) -> None:
    requests = [
        _request("hello world", 1),
        _request("why the cat", 2),
        _request("the dog be funny", 3, strength=1.0),  # its neutral row too
        _request("hello world, why", 4),
    ]
    with ContinuousBatcher(engine) as batcher:
        results = [batcher.generate(request) for request in requests]  # one after another
        assert batcher.prefix_cache is not None
        assert batcher.prefix_cache.hits >= 2 * (len(requests) - 1)
    for request, result in zip(requests, results, strict=True):
        assert result.token_ids == generate_batch(engine, [request])[0].token_ids


def test_prefix_cache_tokens_zero_turns_reuse_off_and_bad_values_are_refused(
    engine: PersonaJudge,
) -> None:
    assert ContinuousBatcher(engine, prefix_cache_tokens=0).prefix_cache is None
    for bad in (-1, 2.5, True, "4096"):
        with pytest.raises(InvalidGenerationConfigError, match="prefix_cache_tokens"):
            ContinuousBatcher(engine, prefix_cache_tokens=bad)  # type: ignore[arg-type]


@pytest.mark.real_model
def test_reused_beginnings_give_the_same_answers_on_smollm2(smollm2: LoadedModel) -> None:
    engine = PersonaJudge(smollm2.model, smollm2.tokenizer)
    questions = ["What is a good name for a cat?", "Why is the sky blue?", "Name a tree."]
    requests = [
        {"conversation": q, "personas": ["humor", "concise"], "seed": i, "max_new_tokens": 24}
        for i, q in enumerate(questions)
    ]
    with ContinuousBatcher(engine) as batcher:
        reused = [batcher.generate(request).token_ids for request in requests]
        assert batcher.prefix_cache is not None and batcher.prefix_cache.hits >= 4
    with ContinuousBatcher(engine, prefix_cache_tokens=0) as batcher:
        fresh = [batcher.generate(request).token_ids for request in requests]
    assert reused == fresh
