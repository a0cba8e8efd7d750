"""The backend protocol: what Persona-judge's decoding needs of a model.

The decoding (:mod:`pj_core.decoding`) drives a model only through these two protocols, so
the same algorithm runs on transformers (:class:`pj_core.backends.hf.backend.HFBackend`) and
on llama.cpp (:class:`pj_core.backends.llamacpp.backend.LlamaCppBackend`).

Terms:

* a **row** is one token context over the model: a persona prefix, the neutral prompt of a
  guided call, or any of those of many requests sharing one batch. Rows are numbered
  ``0..count-1`` in the order they were created or added; :meth:`Rows.keep` renumbers them.
* a row's **length** is how many of its tokens the model has seen (they sit in its key/value
  cache); new tokens are appended after them.
* **logits** are float32 tensors over the whole vocabulary, ``[..., vocab]``: the
  distribution of the token that follows a position, before any transform.

The operations and where the decoding uses them:

=========================  =================================================================
``backend.rows``           prefill the prompts of one call (one row per persona) or of many
``Rows.extend``            speculative: a draft step (1 token, the last logits) and a judge
                           pass (pending + λ drafted tokens, the last λ + 1 logits)
``Rows.extend_together``   speculative with a neutral row: the draft and the neutral row
                           advance in one forward
``Rows.truncate``          speculative: crop the rejected tokens off a row
``Rows.step``              lockstep, pool, batches: one token per row, all rows, one forward
``Rows.add``               continuous batching: requests join a running batch
``Rows.keep``              continuous batching: finished requests leave
``backend.step_timings``   ``strategy="auto"``: what a draft step, a judge pass and a batch
                           step cost on this model and device
``with_prefix_cache``      a server: prompts that begin alike share their prefill
=========================  =================================================================

Every result must equal (up to floating-point differences between batched and single-row
kernels) what one forward of the row's whole token sequence, without any cache, gives at the
same positions; ``tests/test_backend_protocol.py`` checks it for every backend on random
sequences of these operations (``tests/test_llamacpp_backend.py`` for llama.cpp, where the
8-bit quantisation of activations turns such last-bit differences into small steps: it states
the tolerance and shows that one wrong token exceeds it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

RowLayout = Literal["separate", "batched"]
"""How a backend should keep new rows, as a hint for speed only: ``"separate"`` when rows
will mostly be extended one at a time and truncated (speculative), ``"batched"`` when they
will be stepped together (lockstep, pool, batches). Every operation works in either layout."""


@dataclass(frozen=True)
class StepTimings:
    """Seconds per forward of the three kinds the strategies run (``strategy="auto"``)."""

    single_step: float  # one row, one new token (a draft step)
    verify: float  # one row, λ + 1 new tokens (a judge pass)
    batch_step: float  # k rows, one new token each (a lockstep step)


@runtime_checkable
class Rows(Protocol):
    """Token rows over one model, each with its own key/value cache.

    Example (the transformers backend on a tiny random model):
        >>> from pj_core.backends.hf.backend import HFBackend
        >>> from tests._tiny import make_tiny_model
        >>> backend = HFBackend(make_tiny_model(vocab_size=22), eos_token_ids=(1,))
        >>> rows = backend.rows([[5, 6, 7], [8]], layout="separate")
        >>> rows.extend(0, [9, 10], keep=2).shape  # after 9 and after 10
        torch.Size([2, 22])
        >>> rows.truncate(0, 4); rows.length(0)
        4
        >>> rows.step([11, 12]).shape  # one token per row, all rows together
        torch.Size([2, 22])
    """

    @property
    def forward_passes(self) -> int:
        """Forwards of the model run for these rows so far (prefills included)."""
        ...

    @property
    def count(self) -> int:
        """How many rows there are."""
        ...

    def length(self, row: int) -> int:
        """How many tokens of ``row`` the model has seen."""
        ...

    def extend(self, row: int, tokens: Sequence[int], keep: int) -> torch.Tensor:
        """Append ``tokens`` (one or more) to ``row`` in one forward.

        Returns:
            ``[keep, vocab]``: the logits after each of the last ``keep`` new tokens
            (``1 <= keep <= len(tokens)``), oldest first.
        """
        ...

    def extend_together(self, rows: Sequence[int], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append ``tokens[i]`` (one or more; counts may differ) to ``rows[i]``, all in one
        forward.

        Returns:
            ``[len(rows), vocab]``: each row's logits after its last new token.
        """
        ...

    def truncate(self, row: int, length: int) -> None:
        """Forget every token of ``row`` after its first ``length`` (``length`` at most
        :meth:`length`)."""
        ...

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append ``tokens[row]`` to every row, in one forward.

        Returns:
            ``[count, vocab]``: each row's logits after its new token.
        """
        ...

    def add(self, prefixes: Sequence[Sequence[int]]) -> None:
        """Add one row per prefix (prefilled; the rows already there are not changed)."""
        ...

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows``, in that order (they become rows ``0..len(rows)-1``)."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A model the decoding can run on.

    Example:
        >>> from pj_core.backends.hf.backend import HFBackend
        >>> from tests._tiny import make_tiny_model
        >>> backend = HFBackend(make_tiny_model(vocab_size=22), eos_token_ids=(1,))
        >>> backend.vocab_size, backend.eos_token_ids, backend.context_window
        (22, (1,), 256)
    """

    @property
    def vocab_size(self) -> int:
        """Width of every logits row (may exceed the tokenizer's vocabulary)."""
        ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token id that ends an answer."""
        ...

    @property
    def context_window(self) -> int:
        """The most positions a row may hold (prompt and answer)."""
        ...

    def rows(self, prefixes: Sequence[Sequence[int]], *, layout: RowLayout) -> Rows:
        """New rows holding ``prefixes`` (one row each; a prefix may be empty), prefilled
        in as few forwards as the backend can."""
        ...

    def step_timings(self, *, n_personas: int, lookahead: int) -> StepTimings:
        """Time a draft step, a judge pass of ``lookahead + 1`` tokens and a step of
        ``n_personas`` rows on this backend's model and device (median of a few)."""
        ...

    def with_prefix_cache(self, tokens: int) -> Backend:
        """A backend over the same model (no second copy of the weights) whose batched rows
        reuse the keys and values of prompt beginnings it prefilled before, keeping at most
        ``tokens`` tokens of them (least recently used dropped first). A server sees the same
        beginnings again and again: a user's persona text, a chat's earlier turns."""
        ...

    def clear_prefix_cache(self) -> None:
        """Forget every kept prompt beginning (e.g. after a failed forward)."""
        ...
