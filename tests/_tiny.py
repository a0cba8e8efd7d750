"""Tiny random-init models and tokenizers built in code, for fast tests.

The vocabulary is small on purpose: statistical tests enumerate every short sequence.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

if TYPE_CHECKING:
    import pytest

    from pj_core.engine import PersonaJudge

SPECIAL_TOKENS = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>"]
WORDS = [
    "system",
    "user",
    "assistant",
    "hello",
    "world",
    "be",
    "funny",
    "brief",
    "a",
    "the",
    "cat",
    "dog",
    "yes",
    "no",
    "why",
    "because",
    "\n",
]
# A ChatML-like template, as SmolLM2 uses, so prompt rendering can be exercised on it.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}"
    "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def make_tiny_tokenizer(
    extra_words: int = 0, chat_template: bool = True
) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer; ``extra_words`` adds filler words w0, w1, ..."""
    vocab_list = SPECIAL_TOKENS + WORDS + [f"w{i}" for i in range(extra_words)] + ["<unk>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 32
) -> LlamaForCausalLM:
    """A random 2-layer Llama; ``seed`` fixes the weights. Logits are scaled up so that
    the next-token distributions are far from uniform (a sharper, more realistic test)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def make_tiny_engine(name: str = "tiny-chat", context_window: int = 64) -> PersonaJudge:
    """A ``PersonaJudge`` on the tiny model and tokenizer (chat template included)."""
    from pj_core.engine import PersonaJudge

    tokenizer = make_tiny_tokenizer()
    return PersonaJudge(
        make_tiny_model(len(tokenizer)), tokenizer, name=name, context_window=context_window
    )


def long_seed(
    engine: PersonaJudge,
    tokens: int,
    conversation: str = "hello world",
    personas: Sequence[str] = ("be funny", "be brief"),
) -> int:
    """A seed whose answer (temperature 1) runs to its whole budget, with no early EOS (the
    tiny vocabulary has two EOS ids in 22: a long answer takes a search)."""
    for seed in range(500):
        answer = engine.generate(
            conversation, list(personas), seed=seed, max_new_tokens=tokens, temperature=1.0
        )
        if len(answer.token_ids) == tokens:
            return seed
    raise AssertionError("no seed runs to the budget")


def slow_down(engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make every forward of ``engine``'s model take ``seconds`` longer (undone with the
    monkeypatch), so that a test can act while a request is still decoding."""
    forward = engine.model.forward

    def slow_forward(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", slow_forward)
