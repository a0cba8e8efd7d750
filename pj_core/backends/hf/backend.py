"""The transformers backend behind :mod:`pj_core.backends.protocol`: :class:`HFBackend`.

Rows live in one of two layouts of key/value caches (:mod:`pj_core.backends.hf.kv`) and move
between them only when an operation needs the other:

* *separate*: one ``DynamicCache`` per row (prefilled together by :func:`prefill_split`);
  :meth:`HFRows.extend` runs a single-row forward and :meth:`HFRows.truncate` crops one cache.
* *batched*: one left-padded batch cache (:class:`BatchedContexts`); :meth:`HFRows.step`,
  :meth:`HFRows.add` and :meth:`HFRows.keep` work on it in place.

:meth:`HFRows.extend_together` merges the rows it is given into one batch
(:class:`MergedRows`) and keeps them merged while they are extended together again (the
speculative draft and the neutral row over a round); any other operation on the rows splits
them back first. A strategy that sticks to one kind of operation never pays for a move.

Example:
    >>> from tests._tiny import make_tiny_model
    >>> backend = HFBackend(make_tiny_model(vocab_size=22), eos_token_ids=(1,))
    >>> rows = backend.rows([[5, 6], [7]], layout="batched")
    >>> rows.step([8, 9]).shape, [rows.length(0), rows.length(1)]
    (torch.Size([2, 22]), [3, 2])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from pj_core.backends.hf.kv import (
    BatchedContexts,
    MergedRows,
    forward_logits,
    model_device,
    prefill_split,
)
from pj_core.backends.hf.models import context_window_of, eos_token_ids_of
from pj_core.backends.hf.prefix_cache import PrefixCache
from pj_core.backends.protocol import RowLayout, StepTimings
from pj_core.backends.timing import measure_step_timings


class HFBackend:
    """A transformers causal LM as a :class:`pj_core.backends.protocol.Backend`.

    Args:
        model: the model (eval mode; any that runs with a ``DynamicCache``).
        tokenizer: its tokenizer; adds its EOS and turn-end tokens to the EOS ids, and its
            ``model_max_length`` when the config states no context length.
        eos_token_ids: the ids that end an answer (default: from the model's configs and
            the tokenizer, as :func:`pj_core.backends.hf.models.load_model` finds them).
        context_window: the most positions a row may hold (default: from the config).
        prefix_cache: lends recently prefilled beginnings to new rows in the batched layout.

    Raises:
        ModelLoadError: the config states no context length and none was given.

    Example:
        >>> from tests._tiny import make_tiny_model
        >>> HFBackend(make_tiny_model(vocab_size=22), eos_token_ids=(1,)).context_window
        256
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        eos_token_ids: Sequence[int] | None = None,
        context_window: int | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.prefix_cache = prefix_cache
        self._eos = tuple(
            int(i)
            for i in (
                eos_token_ids_of(model, tokenizer) if eos_token_ids is None else eos_token_ids
            )
        )
        self._window = context_window or context_window_of(model, tokenizer)
        self._vocab = int(model.get_output_embeddings().weight.shape[0])

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def context_window(self) -> int:
        return self._window

    def rows(self, prefixes: Sequence[Sequence[int]], *, layout: RowLayout) -> HFRows:
        return HFRows(self.model, prefixes, layout=layout, prefix_cache=self.prefix_cache)

    def with_prefix_cache(self, tokens: int) -> HFBackend:
        """This model with a :class:`PrefixCache` of ``tokens`` tokens (see the protocol).

        Example:
            >>> from tests._tiny import make_tiny_model
            >>> backend = HFBackend(make_tiny_model(vocab_size=22), eos_token_ids=(1,))
            >>> backend.with_prefix_cache(4096).prefix_cache.max_tokens
            4096
        """
        return HFBackend(
            self.model,
            eos_token_ids=self._eos,
            context_window=self._window,
            prefix_cache=PrefixCache(tokens),
        )

    def clear_prefix_cache(self) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def step_timings(self, *, n_personas: int, lookahead: int) -> StepTimings:
        """:func:`pj_core.backends.timing.measure_step_timings` on this model's device."""
        device = model_device(self.model)

        def synchronize() -> None:
            # GPU kernels run asynchronously: wait for them, or only the launch is timed.
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        with torch.inference_mode():
            return measure_step_timings(
                self, n_personas=n_personas, lookahead=lookahead, synchronize=synchronize
            )


class HFRows:
    """Rows of :class:`HFBackend` (a :class:`pj_core.backends.protocol.Rows`).

    Exactly one of ``_caches`` (separate layout) and ``_batch`` (batched) holds the rows;
    ``_pair`` holds rows that :meth:`extend_together` merged (their ``_caches`` entries are
    stale until :meth:`_split_pair`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        prefixes: Sequence[Sequence[int]],
        *,
        layout: RowLayout,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self._device = model_device(model)
        self._prefix_cache = prefix_cache
        self._layout = layout
        self._lengths = [len(prefix) for prefix in prefixes]
        self._passes = 0  # forwards of layouts already let go
        self._caches: list[DynamicCache] | None = None
        self._batch: BatchedContexts | None = None
        self._pair: tuple[tuple[int, ...], MergedRows] | None = None
        if layout == "batched" and prefixes:
            self._batch = BatchedContexts(model, prefixes, prefix_cache)
        else:
            self._caches, self._passes = prefill_split(model, prefixes)

    # ------------------------------------------------------------------ the protocol

    @property
    def forward_passes(self) -> int:
        live = self._batch.forward_passes if self._batch is not None else 0
        paired = self._pair[1].forward_passes if self._pair is not None else 0
        return self._passes + live + paired

    @property
    def count(self) -> int:
        return len(self._lengths)

    def length(self, row: int) -> int:
        return self._lengths[self._row(row)]

    def extend(self, row: int, tokens: Sequence[int], keep: int) -> torch.Tensor:
        row = self._row(row)
        if not tokens or not 1 <= keep <= len(tokens):
            raise ValueError(f"extend needs 1 <= keep <= {len(tokens)} new tokens, got {keep}")
        cache = self._separate()[row]
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self._device)
        logits = forward_logits(self.model, ids, cache, keep=keep)  # [1, keep, vocab]
        self._passes += 1
        self._lengths[row] += len(tokens)
        return logits[0]

    def extend_together(self, rows: Sequence[int], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        key = tuple(self._row(row) for row in rows)
        if len(set(key)) != len(key) or len(key) != len(tokens):
            raise ValueError("extend_together needs distinct rows and one token list per row")
        if any(not row_tokens for row_tokens in tokens):
            raise ValueError("every row needs at least one new token")
        if all(self._lengths[row] == 0 for row in key):  # nothing cached to merge yet
            return torch.stack(
                [
                    self.extend(row, row_tokens, keep=1)[-1]
                    for row, row_tokens in zip(key, tokens, strict=True)
                ]
            )
        if self._pair is None or self._pair[0] != key:
            caches = self._separate()
            self._pair = (key, MergedRows(self.model, [caches[row] for row in key]))
        logits = self._pair[1].feed(tokens)  # [rows, vocab]
        for row, row_tokens in zip(key, tokens, strict=True):
            self._lengths[row] += len(row_tokens)
        return logits

    def truncate(self, row: int, length: int) -> None:
        row = self._row(row)
        if not 0 <= length <= self._lengths[row]:
            raise ValueError(f"row {row} holds {self._lengths[row]} tokens; cannot keep {length}")
        if length == self._lengths[row]:
            return
        self._separate()[row].crop(length - self._lengths[row])  # a negative count drops
        self._lengths[row] = length

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        if len(tokens) != self.count or not tokens:
            raise ValueError(f"step needs one token per row ({self.count}), got {len(tokens)}")
        logits = self._batched().step(tokens)  # [rows, vocab]
        self._lengths = [length + 1 for length in self._lengths]
        return logits

    def add(self, prefixes: Sequence[Sequence[int]]) -> None:
        if not prefixes:
            return
        self._split_pair()
        if self._batch is not None:
            self._batch.add_rows(prefixes)
        elif not self._lengths and self._layout == "batched":  # rows for a batch, at last
            self._batch = BatchedContexts(self.model, prefixes, self._prefix_cache)
            self._caches = None
        else:
            added, passes = prefill_split(self.model, prefixes)
            assert self._caches is not None  # one layout always holds the rows
            self._caches += added
            self._passes += passes
        self._lengths += [len(prefix) for prefix in prefixes]

    def keep(self, rows: Sequence[int]) -> None:
        kept = [self._row(row) for row in rows]
        self._split_pair()
        if self._batch is not None:
            self._batch.keep_rows(kept)  # none at all: an empty batch that rows can join
        else:
            assert self._caches is not None
            self._caches = [self._caches[row] for row in kept]
        self._lengths = [self._lengths[row] for row in kept]

    # ------------------------------------------------------------------ layouts

    def _row(self, row: int) -> int:
        if not 0 <= row < self.count:
            raise IndexError(f"row {row} does not exist; there are {self.count} rows")
        return row

    def _split_pair(self) -> None:
        """Give the rows merged by :meth:`extend_together` their own caches back."""
        if self._pair is None:
            return
        key, merged = self._pair
        assert self._caches is not None  # rows are merged from the separate layout only
        for row, cache in zip(key, merged.split(), strict=True):
            self._caches[row] = cache
        self._passes += merged.forward_passes
        self._pair = None

    def _separate(self) -> list[DynamicCache]:
        """The rows as one cache each (splitting a batch if they were batched)."""
        self._split_pair()
        if self._caches is None:
            assert self._batch is not None
            self._caches = self._batch.row_caches()
            self._passes += self._batch.forward_passes
            self._batch = None
        return self._caches

    def _batched(self) -> BatchedContexts:
        """The rows as one left-padded batch (merging the separate caches if needed)."""
        self._split_pair()
        if self._batch is None:
            assert self._caches is not None
            if any(self._lengths):
                merged = MergedRows(self.model, self._caches)
                self._batch = BatchedContexts.from_merged(self.model, merged, self._prefix_cache)
            else:  # nothing cached yet: an empty batch of the right height
                self._batch = BatchedContexts(self.model, [[] for _ in self._lengths])
            self._caches = None
        return self._batch
