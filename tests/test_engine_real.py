"""The engine on the real packaged models: SmolLM2 (chat template) and Gemma 3 270M (base)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from pj_core.backends.hf.kv import forward_logits, prefill_split
from pj_core.backends.hf.models import LoadedModel
from pj_core.engine import PersonaJudge
from pj_core.personas import Persona
from pj_core.settings import DEFAULTS, PAPER, Settings

pytestmark = [pytest.mark.real_model]

QUESTION = "What is the capital of France? Answer in one short sentence."
PERSONAS = [
    Persona(text="Answer in one short, friendly sentence."),
    Persona(text="Answer precisely and formally."),
]


def _engine(loaded: LoadedModel, defaults: Settings = PAPER) -> PersonaJudge:
    """The engine on ``loaded``; by default with the paper's decoding, which most tests here
    are about (the shipped defaults have their own test)."""
    return PersonaJudge(
        loaded.model,
        loaded.tokenizer,
        name=loaded.name,
        context_window=loaded.context_window,
        eos_token_ids=loaded.eos_token_ids,
        defaults=defaults,
    )


def _looks_fluent(text: str) -> bool:
    """English-looking prose: mostly letters and spaces, real words, no token soup."""
    words = text.split()
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return (
        len(words) >= 3 and letters / max(len(text), 1) > 0.8 and len(set(words)) > len(words) / 2
    )


def test_smollm2_two_personas_answer_fluently_and_stop_at_eos(smollm2: LoadedModel) -> None:
    pj = _engine(smollm2)
    out = pj.generate(QUESTION, PERSONAS, max_new_tokens=48, seed=0)
    assert out.finish_reason == "eos", out.text
    assert out.token_ids[-1] in smollm2.eos_token_ids
    assert "Paris" in out.text and _looks_fluent(out.text), out.text
    assert "<|im_end|>" not in out.text
    assert out.stats.drafted > 0 and out.stats.rounds >= 2
    assert {t.draft_persona for t in out.trace} == {0, 1}  # roles alternated


def test_smollm2_shipped_defaults_answer_fluently(smollm2: LoadedModel) -> None:
    """What a user writes, with the shipped defaults (the pool, strength > 0): a fluent
    answer from every persona at once, stopping at EOS."""
    pj = _engine(smollm2, DEFAULTS)
    out = pj.generate(QUESTION, ["concise", "friendly"], max_new_tokens=48, seed=0)
    assert {t.outcome for t in out.trace} == {"pooled"}
    assert out.finish_reason == "eos", out.text
    assert "Paris" in out.text and _looks_fluent(out.text), out.text


def test_smollm2_lockstep_emits_the_speculative_tokens(smollm2: LoadedModel) -> None:
    pj = _engine(smollm2)
    runs = [
        pj.generate(QUESTION, PERSONAS, max_new_tokens=16, seed=1, strategy=strategy)
        for strategy in ("speculative", "lockstep")
    ]
    # Same draws, same model: only float rounding between batched and single-row forwards
    # could separate them, which would need a draw within ~1e-6 of a decision boundary.
    assert runs[0].token_ids == runs[1].token_ids


def test_smollm2_honours_stop_strings_while_streaming(smollm2: LoadedModel) -> None:
    pj = _engine(smollm2)
    free = pj.generate(QUESTION, PERSONAS, max_new_tokens=48, seed=0)
    assert "Paris" in free.text
    shown = ""
    result = None
    for event in pj.stream(QUESTION, PERSONAS, max_new_tokens=48, seed=0, stop=["Paris"]):
        shown += event.text
        assert "Pari" not in shown  # never streams any part of the stop string
        result = event.result or result
    assert result is not None and result.finish_reason == "stop"
    assert result.text == free.text[: free.text.index("Paris")]
    assert shown == result.text


def test_gemma_base_model_runs_without_a_chat_template(gemma: LoadedModel) -> None:
    pj = _engine(gemma)
    out = pj.generate(
        "The three primary colours are",
        ["Write like a physics textbook.", "Write like a children's book."],
        max_new_tokens=16,
        seed=0,
    )
    assert 1 <= len(out.token_ids) <= 16
    assert out.text.strip()
    assert out.stats.tokens == len(out.trace)


@pytest.mark.slow
def test_gemma_split_caches_are_exact_beyond_the_sliding_window(gemma: LoadedModel) -> None:
    """Gemma 3 has 512-token sliding-window layers; the engine's per-persona caches keep
    full layers (croppable) and rely on the model's sliding mask. Check them against the
    model's own forward on a context longer than the window, before and after a crop."""
    model = gemma.model
    window = model.config.sliding_window
    ids = torch.randint(100, 20_000, (window + 30,), generator=torch.Generator().manual_seed(0))
    tokens = ids.tolist()
    with torch.inference_mode():
        full = model(input_ids=ids.unsqueeze(0)).logits[0, -3:].float()
        caches, _ = prefill_split(model, [tokens[:-3], tokens[:50]])
        cache: DynamicCache = caches[0]
        tail = forward_logits(model, torch.tensor([tokens[-3:]]), cache, keep=3)[0]
        assert torch.allclose(tail, full, atol=1e-3)
        cache.crop(-2)
        again = forward_logits(model, torch.tensor([tokens[-2:]]), cache, keep=2)[0]
        assert torch.allclose(again, full[-2:], atol=1e-3)


@pytest.mark.parametrize("model_name", ["smollm2", "gemma"])
def test_guided_strategies_emit_the_same_tokens(
    model_name: str, request: pytest.FixtureRequest
) -> None:
    """strength > 0 on both families (Gemma: sliding-window layers in the merged draft and
    neutral forward): speculative and lockstep agree, and the answer is fluent text."""
    loaded: LoadedModel = request.getfixturevalue(model_name)
    pj = _engine(loaded)
    runs = [
        pj.generate(QUESTION, PERSONAS, max_new_tokens=24, seed=2, strategy=strategy, strength=1.0)
        for strategy in ("speculative", "lockstep")
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].text.strip()
    if model_name == "smollm2":
        assert _looks_fluent(runs[0].text), runs[0].text
