"""Continuous batching: rows that join a running batch (``BatchedContexts.add_rows``), the
scheduler that admits requests between steps (``pj_core.scheduler.ContinuousBatcher``), and
each request's tokens equal to its own run with the same seed (on the tiny float32 model,
token for token, as tests/test_batch.py requires)."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from pj_core.backends.hf.kv import BatchedContexts
from pj_core.batch import generate_batch
from pj_core.engine import PersonaJudge
from pj_core.errors import (
    ContextOverflowError,
    InvalidGenerationConfigError,
    RequestTimeoutError,
    ServerBusyError,
)
from pj_core.scheduler import ContinuousBatcher
from tests._tiny import long_seed, slow_down


def _alone(model: LlamaForCausalLM, prefix: list[int], fed: list[int]) -> torch.Tensor:
    """The logits of ``prefix`` after feeding ``fed`` one token at a time, on its own."""
    contexts = BatchedContexts(model, [prefix])
    logits = torch.empty(0)
    with torch.inference_mode():
        for token in fed:
            logits = contexts.step([token])[0]
    return logits


def test_rows_added_to_a_running_batch_step_as_if_alone(tiny_model: LlamaForCausalLM) -> None:
    first, short, long = [5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16]
    empty: list[int] = []
    contexts = BatchedContexts(tiny_model, [first])
    fed: dict[int, list[int]] = {0: []}
    with torch.inference_mode():
        for token in (17, 18, 19):
            contexts.step([token])
            fed[0].append(token)
        contexts.add_rows([short, long])  # narrower and wider than the running rows
        fed[1], fed[2] = [], []
        for step in range(3):
            tokens = [12 + step, 4 + step, 9 + step]
            logits = contexts.step(tokens)
            for row, token in enumerate(tokens):
                fed[row].append(token)
        contexts.keep_rows([0, 2])  # the short one leaves
        contexts.add_rows([empty])
        tokens = [5, 6, 7]
        logits = contexts.step(tokens)
    prefixes = [first, long, empty]
    histories = [fed[0] + [5], fed[2] + [6], [7]]
    for row, (prefix, history) in enumerate(zip(prefixes, histories, strict=True)):
        assert torch.allclose(logits[row], _alone(tiny_model, prefix, history), atol=1e-5)


def test_rows_join_a_batch_that_emptied(tiny_model: LlamaForCausalLM) -> None:
    contexts = BatchedContexts(tiny_model, [[5, 6]])
    with torch.inference_mode():
        contexts.step([7])
        contexts.keep_rows([])
        assert contexts.rows == 0
        contexts.add_rows([[8, 9, 10]])
        logits = contexts.step([11])
    assert torch.allclose(logits[0], _alone(tiny_model, [8, 9, 10], [11]), atol=1e-5)


# ----------------------------------------------------------------------------- the scheduler


def _request(seed: int, tokens: int, **extra: object) -> dict[str, object]:
    return {
        "conversation": "hello world",
        "personas": ["be funny", "be brief"],
        "seed": seed,
        "max_new_tokens": tokens,
        "temperature": 1.0,
        **extra,
    }


def _alone_tokens(engine: PersonaJudge, request: dict[str, object]) -> list[int]:
    return generate_batch(engine, [request])[0].token_ids


@pytest.fixture()
def engine(tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast) -> PersonaJudge:
    return PersonaJudge(tiny_model, tiny_tokenizer, context_window=200)


def test_requests_join_a_running_batch_and_keep_their_own_tokens(engine: PersonaJudge) -> None:
    long = _request(long_seed(engine, 40), 40)
    joining = [
        _request(7, 12),
        _request(8, 20, personas=["the cat", "the dog", "be brief"]),
        _request(9, 15, strength=1.0),  # a guided request brings its neutral row
        _request(10, 10, decoder="pool"),
    ]
    with ContinuousBatcher(engine) as batcher:
        first = batcher.submit(long)
        head = [next(first) for _ in range(3)]  # it is decoding
        later = [batcher.submit(request) for request in joining]
        results = [next(e for e in events if e.done).result for events in later]
        tail = list(first)
        assert batcher.stats.joined_running == len(joining)
        assert batcher.stats.max_rows >= 2 + 2 + 3 + 3 + 2
        assert batcher.active_requests == 0
    long_tokens = [t for e in [*head, *tail] for t in e.token_ids]
    assert long_tokens == _alone_tokens(engine, long)
    assert tail[-1].result is not None and tail[-1].result.token_ids == long_tokens
    for request, result in zip(joining, results, strict=True):
        assert result is not None
        assert result.token_ids == _alone_tokens(engine, request)


def test_a_short_request_finishes_before_a_long_one(engine: PersonaJudge) -> None:
    long = _request(long_seed(engine, 60), 60)
    with ContinuousBatcher(engine) as batcher:
        first = batcher.submit(long)
        next(first)
        short = batcher.generate(_request(3, 2))
        assert len(short.token_ids) <= 2
        remaining = list(first)  # the long one was still decoding when the short one ended
        assert len(remaining) > 10


def test_a_dropped_stream_frees_its_rows_at_the_next_step(engine: PersonaJudge) -> None:
    long = _request(long_seed(engine, 60), 60)
    with ContinuousBatcher(engine) as batcher:
        events = batcher.submit(long)
        next(events)
        steps_before = batcher.stats.steps
        events.close()  # type: ignore[attr-defined]  # a client that went away
        deadline = time.monotonic() + 10
        while batcher.active_requests and time.monotonic() < deadline:
            time.sleep(0.001)
        assert batcher.active_requests == 0
        assert batcher.stats.steps - steps_before <= 2  # stopped within a step or so
        assert len(batcher.generate(_request(4, 5)).token_ids) <= 5  # and it goes on


def test_bad_requests_fail_at_submit_and_others_go_on(engine: PersonaJudge) -> None:
    with ContinuousBatcher(engine) as batcher:
        with pytest.raises(ContextOverflowError):
            batcher.submit(_request(1, 500))
        with pytest.raises(InvalidGenerationConfigError):
            batcher.submit(_request(1, 5, temperature=-1))
        assert len(batcher.generate(_request(1, 5)).token_ids) <= 5
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(_request(1, 5))


def test_a_full_queue_refuses_and_rows_are_bounded(
    engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    long = _request(long_seed(engine, 30), 30)
    waiting = _request(5, 6)
    slow_down(engine, monkeypatch, 0.03)  # the first decodes >= 0.9 s
    with ContinuousBatcher(engine, max_rows=3, max_queue=1) as batcher:  # 3: personas + neutral
        first = batcher.submit(long)
        next(first)
        second = batcher.submit(waiting)  # 3 more rows do not fit beside the first: it waits
        with pytest.raises(ServerBusyError, match="retry") as refused:
            batcher.submit(_request(6, 6))
        assert refused.value.retry_after > 0
        assert len(list(first)) > 0
        result = next(e for e in second if e.done).result
        assert batcher.stats.max_rows == 3 and batcher.stats.refused == 1
        with pytest.raises(InvalidGenerationConfigError, match="rows"):
            batcher.submit(_request(1, 4, personas=["be funny", "be brief", "the cat"]))
    monkeypatch.undo()
    assert result is not None and result.token_ids == _alone_tokens(engine, waiting)


def test_a_request_past_its_time_limit_is_stopped(
    engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    long = _request(long_seed(engine, 60), 60)
    slow_down(engine, monkeypatch, 0.02)
    with ContinuousBatcher(engine) as batcher:
        events = batcher.submit(long, timeout=0.3)
        with pytest.raises(RequestTimeoutError, match="time limit"):
            for _ in events:
                pass
        assert batcher.stats.timed_out == 1 and batcher.active_requests == 0
        assert batcher.stats.steps < 40
        with pytest.raises(InvalidGenerationConfigError):
            batcher.submit(long, timeout=0)
    with pytest.raises(InvalidGenerationConfigError):
        ContinuousBatcher(engine, max_rows=0)
