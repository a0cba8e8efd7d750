"""The backend protocol (:mod:`pj_core.backends.protocol`) and its transformers implementation.

Every operation's logits are checked against one forward of the row's whole token sequence
without any cache (the protocol's contract), on random sequences of operations from both
layouts, with a fixed seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from pj_core.backends.hf.backend import HFBackend, HFRows
from pj_core.backends.protocol import Backend, Rows, StepTimings
from tests._tiny import make_tiny_model, make_tiny_tokenizer
from tests._toy_backend import ToyBackend, ToyLM

VOCAB = 22
ATOL = 1e-4  # float32 on the tiny model: batched and single-row kernels agree far closer


@pytest.fixture(scope="module")
def model() -> PreTrainedModel:
    return make_tiny_model(vocab_size=VOCAB, seed=5)


def _reference(model: Any, tokens: list[int]) -> torch.Tensor:
    """``[len(tokens), vocab]``: the logits after each token, from one uncached forward."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([tokens]), use_cache=False)
    return out.logits[0].float()


Reference = Callable[[list[int]], torch.Tensor]
"""``[len(tokens), vocab]``: the logits after each token, from one forward without a cache."""


class _Checked:
    """Rows and the token sequence each row should hold, checked after every operation."""

    def __init__(
        self, reference: Reference, rows: Rows, texts: list[list[int]], atol: float
    ) -> None:
        self.reference, self.rows, self.texts, self.atol = reference, rows, texts, atol

    def expect(self, row: int, logits: torch.Tensor, keep: int) -> None:
        want = self.reference(self.texts[row])[-keep:]
        assert logits.shape == want.shape == (keep, want.shape[-1])
        torch.testing.assert_close(logits, want, atol=self.atol, rtol=0)

    def lengths_agree(self) -> None:
        assert self.rows.count == len(self.texts)
        assert [self.rows.length(r) for r in range(self.rows.count)] == [len(t) for t in self.texts]


def random_operations(
    backend: Backend,
    reference: Reference,
    seed: int,
    layout: str,
    *,
    vocab: int = VOCAB,
    atol: float = ATOL,
    operations: int = 14,
) -> int:
    """Run ``operations`` random protocol operations on rows of ``backend`` (token ids below
    ``vocab``), checking each result against ``reference``; returns how many applied."""
    rng = random.Random(seed)

    def _tokens(rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(n)]

    texts = [_tokens(rng, rng.randrange(0, 6)) for _ in range(rng.randrange(1, 4))]
    rows = backend.rows(texts, layout=layout)  # type: ignore[arg-type]
    checked = _Checked(reference, rows, [list(t) for t in texts], atol)
    done = 0
    for _ in range(operations):
        kind = rng.choice(
            ["extend", "extend", "together", "together", "truncate", "step", "add", "keep"]
        )
        n = rows.count
        if kind == "extend" and n:
            row, new = rng.randrange(n), _tokens(rng, rng.randrange(1, 5))
            keep = rng.randrange(1, len(new) + 1)
            checked.texts[row] += new
            checked.expect(row, rows.extend(row, new, keep=keep), keep)
        elif kind == "together" and n:
            chosen = rng.sample(range(n), rng.randrange(1, n + 1))
            feeds = [_tokens(rng, rng.randrange(1, 4)) for _ in chosen]
            logits = rows.extend_together(chosen, feeds)
            assert logits.shape == (len(chosen), backend.vocab_size)
            for i, (row, new) in enumerate(zip(chosen, feeds, strict=True)):
                checked.texts[row] += new
                checked.expect(row, logits[i : i + 1], 1)
        elif kind == "truncate" and n:
            row = rng.randrange(n)
            length = rng.randrange(0, len(checked.texts[row]) + 1)
            rows.truncate(row, length)
            checked.texts[row] = checked.texts[row][:length]
        elif kind == "step" and n:
            new = _tokens(rng, n)
            logits = rows.step(new)
            for row in range(n):
                checked.texts[row].append(new[row])
                checked.expect(row, logits[row : row + 1], 1)
        elif kind == "add":
            added = [_tokens(rng, rng.randrange(0, 5)) for _ in range(rng.randrange(1, 3))]
            rows.add(added)
            checked.texts += [list(t) for t in added]
        elif kind == "keep" and n:
            kept = rng.sample(range(n), rng.randrange(0, n + 1))  # maybe none
            rows.keep(kept)
            checked.texts = [checked.texts[row] for row in kept]
        else:
            continue
        done += 1
        checked.lengths_agree()
    return done


@pytest.mark.parametrize("layout", ["separate", "batched"])
@pytest.mark.parametrize("kind", ["transformers", "toy"])
def test_random_operations_give_the_logits_of_an_uncached_forward(
    model: PreTrainedModel, layout: str, kind: str
) -> None:
    """On both backends: the transformers one and the toy one of the tests."""
    if kind == "toy":
        lm: Any = ToyLM(VOCAB, seed=5)
        backend: Backend = ToyBackend(lm)
    else:
        lm, backend = model, HFBackend(model, eos_token_ids=(1,))
    done = sum(
        random_operations(backend, partial(_reference, lm), seed, layout) for seed in range(25)
    )
    assert done > 250  # the sequences really ran (most operations apply)


def test_the_transformers_backend_satisfies_the_protocol(model: PreTrainedModel) -> None:
    backend: Backend = HFBackend(model, eos_token_ids=(1, 2))
    assert isinstance(backend, Backend) and isinstance(ToyBackend(ToyLM(VOCAB)), Backend)
    rows: Rows = backend.rows([[3, 4]], layout="separate")
    assert isinstance(rows, Rows)
    assert (backend.vocab_size, backend.eos_token_ids, backend.context_window) == (
        VOCAB,
        (1, 2),
        256,
    )


def test_eos_ids_and_window_are_load_models(tmp_path: object) -> None:
    """With a tokenizer, the backend finds the same EOS ids and window as ``load_model``."""
    from pathlib import Path

    from pj_core.backends.hf.models import load_model

    folder = Path(str(tmp_path)) / "tiny"
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(len(tokenizer)).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder), device="cpu")
    backend = HFBackend(loaded.model, loaded.tokenizer)
    assert backend.eos_token_ids == loaded.eos_token_ids and backend.eos_token_ids
    assert backend.context_window == loaded.context_window


def test_forwards_are_counted_and_moving_layouts_runs_none(model: PreTrainedModel) -> None:
    rows = HFBackend(model, eos_token_ids=(1,)).rows([[3, 4, 5], [6], [7, 8]], layout="separate")
    assert rows.forward_passes == 1  # one prefill for all rows
    rows.extend_together([0, 2], [[9], [10]])
    rows.extend_together([0, 2], [[11], [12, 13]])  # stays merged: no copy, one forward
    rows.extend(1, [14, 15], keep=2)  # splits the pair back first
    rows.step([3, 3, 3])  # moves to the batched layout
    rows.truncate(0, 2)  # and back
    rows.add([[4, 5]])
    rows.keep([3, 0])
    assert rows.forward_passes == 1 + 2 + 1 + 1 + 1  # the prefill of the added row included
    assert [rows.length(0), rows.length(1)] == [2, 2]


def test_bad_arguments_are_errors_not_wrong_logits(model: PreTrainedModel) -> None:
    rows = HFBackend(model, eos_token_ids=(1,)).rows([[3, 4]], layout="batched")
    with pytest.raises(IndexError, match="row 3"):
        rows.extend(3, [5], keep=1)
    with pytest.raises(ValueError, match="keep"):
        rows.extend(0, [5], keep=2)
    with pytest.raises(ValueError, match="cannot keep 7"):
        rows.truncate(0, 7)
    with pytest.raises(ValueError, match="one token per row"):
        rows.step([5, 6])
    with pytest.raises(ValueError, match="distinct rows"):
        rows.extend_together([0, 0], [[5], [6]])
    assert isinstance(rows, HFRows) and rows.length(0) == 2  # nothing changed


def test_step_timings_time_the_three_kinds_of_forward(model: PreTrainedModel) -> None:
    timings = HFBackend(model, eos_token_ids=(1,)).step_timings(n_personas=3, lookahead=4)
    assert isinstance(timings, StepTimings)
    assert min(timings.single_step, timings.verify, timings.batch_step) > 0


def test_an_engine_built_by_hand_ends_answers_as_from_pretrained(tmp_path: object) -> None:
    """One source for EOS ids and the window: ``PersonaJudge(model, tokenizer)`` used to miss
    the chat template's turn-end token that ``from_pretrained`` counts."""
    from pathlib import Path

    from pj_core.engine import PersonaJudge

    folder = Path(str(tmp_path)) / "tiny"
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(len(tokenizer)).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    loaded = PersonaJudge.from_pretrained(str(folder), device="cpu")
    by_hand = PersonaJudge(loaded.model, loaded.tokenizer)
    assert by_hand.eos_token_ids == loaded.eos_token_ids
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in by_hand.eos_token_ids
    assert by_hand.context_window == loaded.context_window


def test_the_public_engine_runs_on_the_toy_backend() -> None:
    from pj_core.engine import PersonaJudge
    from pj_core.errors import ModelLoadError

    tokenizer = make_tiny_tokenizer()
    pj = PersonaJudge.from_backend(ToyBackend(ToyLM(len(tokenizer), seed=2)), tokenizer)
    personas = ["be funny", "be brief"]
    request: dict[str, Any] = {
        "conversation": "hello world",
        "personas": personas,
        "max_new_tokens": 8,
    }
    alone = [pj.generate(**request, seed=s, strategy="speculative") for s in range(3)]
    assert all(out.token_ids and out.stats.forward_passes > 0 for out in alone)
    # Lockstep, a stream and a batch on the toy rows: the same tokens, exactly.
    assert pj.generate(**request, seed=0, strategy="lockstep").token_ids == alone[0].token_ids
    streamed = [e.result for e in pj.stream(**request, seed=1) if e.done]
    assert streamed[0] is not None and streamed[0].token_ids == alone[1].token_ids
    batch = pj.generate_batch([{**request, "seed": s} for s in range(3)])
    assert [r.token_ids for r in batch] == [out.token_ids for out in alone]
    assert pj.choose_strategy(n_personas=2, lookahead=4) in ("speculative", "lockstep")
    with pytest.raises(ModelLoadError, match="ToyBackend"):
        _ = pj.model
