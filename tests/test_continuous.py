"""Continuous batching: rows that join a running batch (``BatchedContexts.add_rows``), the
scheduler that admits requests between steps (``pj_core.scheduler.ContinuousBatcher``), and
each request's tokens equal to its own run with the same seed (on the tiny float32 model,
token for token, as tests/test_batch.py requires)."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from pj_core.backends.hf.kv import BatchedContexts


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
