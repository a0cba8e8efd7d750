"""A tiny byte-level BPE tokenizer (trained in milliseconds) that the grammar engine can read.

The tiny WordPiece tokenizer of ``tests/_tiny.py`` has no ``{`` or ``"`` and llguidance
rejects it; this one covers every byte, so any JSON, regex or grammar text can be written.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    '{"name": "Bo", "age": 3}',
    '{"a": [1, 2, 3], "b": true, "c": null, "d": 0.5}',
    "yes no maybe red green blue 123-4567",
    "hello world the cat and the dog",
]


@functools.cache
def make_bpe_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens; id 0 is ``<eos>``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


def save_tiny_bpe_model(folder: Path, seed: int) -> str:
    """A tiny random Llama with :func:`make_bpe_tokenizer`, saved where an adapter can load
    it by path. Its window is long (the tiny Llama's rotary positions go beyond its nominal
    256): a tools' description is long in this small vocabulary."""
    from tests._tiny import make_tiny_model

    tokenizer = make_bpe_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=seed)
    model.config.max_position_embeddings = 4096
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


class Flag(BaseModel):
    """A flag and a digit."""

    # Bounded and closed, so a random tiny model finishes it well within its budget.
    model_config = ConfigDict(extra="forbid")

    ok: bool
    n: int = Field(ge=0, le=9)
