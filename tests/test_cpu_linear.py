"""Linear layers packed for oneDNN (pj_core.backends.hf.cpu_linear): same results, one
copy, reversible."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from pj_core.backends.hf import cpu_linear
from pj_core.backends.hf.cpu_linear import (
    PackedLinear,
    PackedLinearGradientError,
    pack_linear_layers,
    packing_available,
    unpack_linear_layers,
)
from pj_core.backends.hf.models import LoadedModel, load_model
from pj_core.engine import PersonaJudge
from tests._tiny import make_tiny_model, make_tiny_tokenizer

needs_packing = pytest.mark.skipif(
    not packing_available(), reason="this PyTorch build has no oneDNN packed linear kernels"
)


def _frozen_tiny(vocab_size: int, *, tied: bool = False) -> LlamaForCausalLM:
    model = make_tiny_model(vocab_size)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.requires_grad_(False)


def _linear_types(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if isinstance(m, nn.Linear | PackedLinear)]


def test_packing_is_detected_on_the_ci_cpu_build() -> None:
    # CI installs the CPU wheel of torch 2.13, which ships oneDNN: packing must be on there,
    # or the speed figures in docs/benchmarks.md would not describe what users get.
    assert packing_available()


@needs_packing
@pytest.mark.parametrize("rows", [1, 2, 5, 7])
def test_packed_layer_matches_the_dense_one(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    linear = nn.Linear(48, 40).requires_grad_(False)
    x = torch.randn(3, rows, 48, generator=generator)
    expected = linear(x)
    packed = PackedLinear(linear)
    assert torch.allclose(packed(x), expected, atol=1e-5, rtol=1e-5)
    # A non-contiguous input (a transposed view) computes the same.
    xt = torch.randn(48, rows, generator=generator).t()
    assert torch.allclose(packed(xt), linear(xt), atol=1e-5, rtol=1e-5)


@needs_packing
def test_model_logits_are_unchanged_and_only_one_copy_is_kept() -> None:
    tokenizer = make_tiny_tokenizer()
    model = _frozen_tiny(len(tokenizer))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    before = model(input_ids=ids).logits
    dense_weights = {name for name, _ in model.named_parameters() if name.endswith("proj.weight")}
    report = pack_linear_layers(model)
    assert report.available and report.layers == 2 * 7 + 1  # 7 per layer, and the lm_head
    assert set(_linear_types(model)) == {"PackedLinear"}
    assert not any(name in dense_weights for name, _ in model.named_parameters())
    after = model(input_ids=ids).logits
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)


@needs_packing
def test_unpack_restores_bit_identical_linear_layers() -> None:
    tokenizer = make_tiny_tokenizer()
    model = _frozen_tiny(len(tokenizer))
    original = {name: value.clone() for name, value in model.state_dict().items()}
    pack_linear_layers(model)
    assert unpack_linear_layers(model) == 15
    assert set(_linear_types(model)) == {"Linear"}
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[name], original[name]) for name in original)


@needs_packing
def test_tied_output_projection_stays_shared_with_the_embedding() -> None:
    tokenizer = make_tiny_tokenizer()
    model = _frozen_tiny(len(tokenizer), tied=True)
    embedding = model.model.embed_tokens.weight
    pack_linear_layers(model)
    # The tiny model's embedding is a small share of its bytes: the head is packed, and its
    # dense weight is still the embedding's (one dense copy, used by the lookup).
    assert isinstance(model.lm_head, PackedLinear)
    assert model.lm_head.weight is embedding
    unpack_linear_layers(model)
    assert model.lm_head.weight is embedding


@needs_packing
def test_a_large_tied_projection_is_left_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = make_tiny_tokenizer()
    model = _frozen_tiny(len(tokenizer), tied=True)
    monkeypatch.setattr(cpu_linear, "MAX_TIED_COPY_FRACTION", 0.0)
    report = pack_linear_layers(model)
    assert report.skipped_tied == ("lm_head",)
    assert type(model.lm_head) is nn.Linear
    assert report.layers == 14


@needs_packing
def test_trainable_and_non_float32_layers_are_left_alone() -> None:
    trainable = nn.Sequential(nn.Linear(4, 4))
    assert pack_linear_layers(trainable).layers == 0
    half = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16).requires_grad_(False)
    assert pack_linear_layers(half).layers == 0
    assert type(half[0]) is nn.Linear


@needs_packing
def test_packed_layer_refuses_to_train() -> None:
    layer = PackedLinear(nn.Linear(4, 3).requires_grad_(False))
    with pytest.raises(PackedLinearGradientError, match="unpack_linear_layers"):
        layer(torch.randn(2, 4, requires_grad=True))


@needs_packing
def test_deepcopy_gives_an_independent_packed_model() -> None:
    tokenizer = make_tiny_tokenizer()
    model = _frozen_tiny(len(tokenizer))
    pack_linear_layers(model)
    twin = copy.deepcopy(model)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)
    assert twin.lm_head.packed_weight is not model.lm_head.packed_weight


@needs_packing
def test_engine_on_a_packed_model_decodes_like_the_dense_one() -> None:
    # Packed kernels add in another order, so a token can only differ where two candidates'
    # cumulative probabilities sit within float rounding of a draw: over 20 seeded runs of
    # 12 tokens we expect no difference at all, and allow one run to differ.
    tokenizer = make_tiny_tokenizer()
    dense = PersonaJudge(_frozen_tiny(len(tokenizer)), tokenizer)
    packed_model = _frozen_tiny(len(tokenizer))
    pack_linear_layers(packed_model)
    packed = PersonaJudge(packed_model, tokenizer)
    differing = 0
    for seed in range(20):
        kwargs: dict[str, Any] = {
            "max_new_tokens": 12,
            "seed": seed,
            "temperature": 1.0,
            "top_k": 0,
        }
        a = dense.generate("hello why", ["be funny", "be brief"], **kwargs)
        b = packed.generate("hello why", ["be funny", "be brief"], **kwargs)
        differing += a.token_ids != b.token_ids
    assert differing <= 1


@needs_packing
def test_load_model_packs_on_cpu_unless_told_not_to(tmp_path: Path) -> None:
    tokenizer = make_tiny_tokenizer()
    folder = tmp_path / "tiny"
    make_tiny_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    packed = load_model(folder, device="cpu")
    dense = load_model(folder, device="cpu", pack_cpu_weights=False)
    assert packed is not dense
    assert packed.packed_linear_layers == 15 and dense.packed_linear_layers == 0
    assert not any(p.requires_grad for p in packed.model.parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(
        packed.model(input_ids=ids).logits, dense.model(input_ids=ids).logits, atol=1e-4
    )
    bf16 = load_model(folder, device="cpu", dtype="bf16")
    assert bf16.packed_linear_layers == 0  # the packed kernels are used for float32 only


@needs_packing
@pytest.mark.real_model
def test_smollm2_is_packed_and_its_next_token_distribution_unchanged(
    smollm2: LoadedModel,
) -> None:
    assert smollm2.packed_linear_layers == 30 * 7 + 1  # every projection and the tied head
    ids = torch.tensor([smollm2.tokenizer.encode("The capital of France is")])
    packed_logits = smollm2.model(input_ids=ids).logits[0, -1]
    restored = copy.deepcopy(smollm2.model)
    unpack_linear_layers(restored)
    dense_logits = restored(input_ids=ids).logits[0, -1]
    probs = torch.softmax(packed_logits, -1), torch.softmax(dense_logits, -1)
    assert float((probs[0] - probs[1]).abs().sum()) < 1e-3  # total variation * 2


@needs_packing
def test_pj_info_counts_packed_weights_and_names_the_kernels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pj_core.cli import main

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    dense_count = sum(p.numel() for p in model.parameters())
    assert main(["info", str(tmp_path / "tiny"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"parameters      {dense_count / 1e6:.1f} M" in printed
    assert "oneDNN, 15 layers with pre-packed weights" in printed
    packed = make_tiny_model(len(tokenizer)).requires_grad_(False)
    pack_linear_layers(packed)
    assert cpu_linear.weight_count(packed) == dense_count
