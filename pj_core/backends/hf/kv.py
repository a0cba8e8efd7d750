"""Key/value caches of the persona contexts over one model.

Two layouts are used:

* :func:`prefill_split` (speculative strategy): all persona prompts are prefilled in ONE
  left-padded batched forward, then the batch cache is split into one ``DynamicCache`` per
  persona with the padding positions removed. The keys already carry their rotary positions
  (explicit ``position_ids`` start at 0 after the padding in every row), so dropping the padded
  slots leaves exactly the cache a separate prefill would have produced.
* :class:`BatchedContexts` (lockstep strategy): the persona contexts stay in one left-padded
  batch cache; every step appends one token to every row, with a growing attention mask and
  per-row position ids. It is never cropped.

Per-persona caches are plain full-attention ``DynamicCache`` layers even for models with
sliding-window layers (Gemma 3): the model still applies its sliding-window *mask*, so the
result is exact; the window only bounds memory, and a sliding layer could not be cropped
after a rejection once the window is full. The cost is memory for contexts longer than the
window, which the engine's budgets (hundreds of tokens) do not reach.

Example:
    >>> from tests._tiny import make_tiny_model
    >>> model = make_tiny_model(vocab_size=22)
    >>> caches, counted = prefill_split(model, [[5, 6, 7], [8, 9]])
    >>> [c.get_seq_length() for c in caches], counted
    ([3, 2], 1)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from pj_core.backends.hf.prefix_cache import PrefixCache
from pj_core.errors import ModelLoadError

# Any id of the vocabulary does for padding: padded positions are masked out everywhere.
PAD_ID = 0


def _cache_kwarg(model: PreTrainedModel) -> str:
    """The name under which this model's forward takes the cache (transformers 5: ``cache``)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _takes_logits_to_keep(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def forward_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: DynamicCache,
    *,
    keep: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one forward that extends ``cache`` and return the last ``keep`` positions' logits.

    Returns float32 logits of shape ``[batch, keep, vocab]``.
    """
    kwargs: dict[str, object] = {
        _cache_kwarg(model): cache,
        "use_cache": True,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }
    if _takes_logits_to_keep(model):
        # Only the positions we sample from go through the (large) vocabulary projection.
        kwargs["logits_to_keep"] = keep
    output = model(input_ids=input_ids, **kwargs)
    return output.logits[:, -keep:, :].float()


def _left_padded(
    sequences: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad to one batch: (input_ids, attention_mask, position_ids)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence) :] = torch.tensor(list(sequence), dtype=torch.long)
            mask[row, width - len(sequence) :] = 1
    # Positions count real tokens only; padded slots get 0 (they are masked anyway).
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def model_device(model: PreTrainedModel) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def prefill_split(
    model: PreTrainedModel, prefixes: Sequence[Sequence[int]]
) -> tuple[list[DynamicCache], int]:
    """Prefill every prefix in one batched forward; return one cache per prefix.

    Empty prefixes get an empty cache. Returns the caches and the number of forwards run.
    """
    caches = [DynamicCache() for _ in prefixes]
    rows = [i for i, prefix in enumerate(prefixes) if prefix]
    if not rows:
        return caches, 0
    ids, mask, positions = _left_padded([prefixes[i] for i in rows], model_device(model))
    batch_cache = DynamicCache()
    kwargs: dict[str, object] = {
        _cache_kwarg(model): batch_cache,
        "use_cache": True,
        "attention_mask": mask,
        "position_ids": positions,
    }
    if _takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1  # prefill needs no logits; keep the projection tiny
    model(input_ids=ids, **kwargs)
    width = ids.shape[1]
    for batch_row, persona in enumerate(rows):
        start = width - len(prefixes[persona])
        per_layer = [
            (
                keys[batch_row : batch_row + 1, :, start:, :].clone(),
                values[batch_row : batch_row + 1, :, start:, :].clone(),
            )
            for keys, values in map(_layer_tensors, batch_cache.layers)
        ]
        caches[persona] = DynamicCache(ddp_cache_data=per_layer)
    return caches, 1


def _layer_tensors(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise ModelLoadError(
            f"the model's cache layer {type(layer).__name__} holds no attention keys/values; "
            "Persona-judge needs a transformer whose layers all use a key/value cache"
        )
    return keys, values


class BatchedContexts:
    """All persona contexts in one left-padded batch cache (the lockstep layout).

    Example:
        >>> from tests._tiny import make_tiny_model
        >>> contexts = BatchedContexts(make_tiny_model(vocab_size=22), [[5, 6], [7]])
        >>> contexts.step([8, 9]).shape
        torch.Size([2, 22])
    """

    def __init__(
        self,
        model: PreTrainedModel,
        prefixes: Sequence[Sequence[int]],
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.forward_passes = 0
        self.prefix_cache = prefix_cache
        self._device = model_device(model)
        self._cache = DynamicCache()
        lengths = [len(prefix) for prefix in prefixes]
        if max(lengths) == 0:
            self._mask = torch.zeros((len(prefixes), 0), dtype=torch.long, device=self._device)
        elif not self._prefill_reusing(prefixes):
            ids, self._mask, positions = _left_padded(prefixes, self._device)
            forward_logits(
                model, ids, self._cache, keep=1, attention_mask=self._mask, position_ids=positions
            )
            self.forward_passes += 1
        self._next_position = torch.tensor(lengths, dtype=torch.long, device=self._device)
        if prefix_cache is not None and max(lengths) > 0:
            for row, prefix in enumerate(prefixes):
                if len(prefix) >= prefix_cache.min_tokens:
                    prefix_cache.store(prefix, self._row_slots(row))

    @classmethod
    def from_merged(
        cls, model: PreTrainedModel, merged: MergedRows, prefix_cache: PrefixCache | None = None
    ) -> BatchedContexts:
        """The rows of ``merged`` as a batch to step (no forward; they share its cache)."""
        contexts = cls.__new__(cls)
        contexts.model = model
        contexts.forward_passes = 0
        contexts.prefix_cache = prefix_cache
        contexts._device = model_device(model)
        contexts._cache, contexts._mask = merged.cache, merged.mask
        contexts._next_position = merged.next_position
        return contexts

    def row_caches(self) -> list[DynamicCache]:
        """One plain cache per row, holding only that row's slots (padding removed)."""
        if self._mask.shape[1] == 0:  # nothing cached yet: no cache layers either
            return [DynamicCache() for _ in range(self.rows)]
        return [DynamicCache(ddp_cache_data=self._row_slots(row)) for row in range(self.rows)]

    def _prefill_reusing(self, prefixes: Sequence[Sequence[int]]) -> bool:
        """Prefill with the prefix cache's slots for the beginnings it holds: ONE forward
        feeds every row the rest of its prefix (:class:`MergedRows` lays the reused slots out
        left-padded, the new tokens after them). False (nothing done) when no row reuses
        anything, or a row is empty."""
        if self.prefix_cache is None or min(len(prefix) for prefix in prefixes) == 0:
            return False
        found = [self.prefix_cache.lookup(prefix) for prefix in prefixes]
        template = next((layers for _, layers in found if layers is not None), None)
        if template is None:
            return False
        caches = [
            DynamicCache(
                ddp_cache_data=layers
                if layers is not None
                else [(k[:, :, :0], v[:, :, :0]) for k, v in template]
            )
            for _, layers in found
        ]
        merged = MergedRows(self.model, caches)
        merged.feed([prefix[length:] for prefix, (length, _) in zip(prefixes, found, strict=True)])
        self._cache, self._mask = merged.cache, merged.mask
        self.forward_passes += 1
        return True

    def _row_slots(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row ``row``'s keys and values without its padding, ``[1, heads, tokens, head_dim]``
        per layer."""
        slots = self._mask[row].nonzero().flatten()
        return [
            (k[row : row + 1].index_select(2, slots), v[row : row + 1].index_select(2, slots))
            for k, v in map(_layer_tensors, self._cache.layers)
        ]

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append one token to every row; return each row's next-token logits ``[rows, vocab]``."""
        ones = torch.ones((len(tokens), 1), dtype=torch.long, device=self._device)
        self._mask = torch.cat([self._mask, ones], dim=-1)
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self._device).unsqueeze(-1)
        logits = forward_logits(
            self.model,
            ids,
            self._cache,
            keep=1,
            attention_mask=self._mask,
            position_ids=self._next_position.unsqueeze(-1),
        )
        self._next_position = self._next_position + 1
        self.forward_passes += 1
        return logits[:, -1, :]

    @property
    def rows(self) -> int:
        """How many rows (contexts) the batch holds."""
        return int(self._mask.shape[0])

    def add_rows(self, prefixes: Sequence[Sequence[int]]) -> None:
        """Append one row per prefix: the prefixes are prefilled in a forward of their own
        (the running rows are not touched), then join the batch, old and new rows left-padded
        to a common width with the padding masked; the next :meth:`step` advances them all.

        Example:
            >>> from tests._tiny import make_tiny_model
            >>> contexts = BatchedContexts(make_tiny_model(vocab_size=22), [[5, 6]])
            >>> contexts.step([7]).shape
            torch.Size([1, 22])
            >>> contexts.add_rows([[8, 9, 10, 11], [12]]); contexts.rows
            3
            >>> contexts.step([13, 14, 15]).shape
            torch.Size([3, 22])
        """
        if not prefixes:
            return
        joining = BatchedContexts(self.model, prefixes, self.prefix_cache)  # own forward
        self.forward_passes += joining.forward_passes
        if self.rows == 0:
            self._cache, self._mask = joining._cache, joining._mask
            self._next_position = joining._next_position
            return
        old_rows, new_rows = self.rows, joining.rows
        old_width, new_width = self._mask.shape[1], joining._mask.shape[1]
        width = max(old_width, new_width)
        # mask: [old rows + new rows, width], each part left-padded with zeros
        self._mask = torch.cat(
            [
                torch.nn.functional.pad(self._mask, (width - old_width, 0)),
                torch.nn.functional.pad(joining._mask, (width - new_width, 0)),
            ]
        )
        self._next_position = torch.cat([self._next_position, joining._next_position])
        # A side with no cached token yet (every prefix empty) has no cache layers at all.
        old_layers = list(self._cache.layers) if old_width else []
        new_layers = list(joining._cache.layers) if new_width else []
        if not old_layers and not new_layers:
            return
        target = self._cache if old_layers else joining._cache
        template = old_layers or new_layers
        for index, layer in enumerate(target.layers):
            ref_keys, ref_values = _layer_tensors(template[index])

            def part(layers: Sequence[object], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
                if layers:
                    return _layer_tensors(layers[index])  # noqa: B023 - used at once
                return (  # [rows, heads, 0, head_dim]
                    ref_keys.new_zeros((rows, ref_keys.shape[1], 0, ref_keys.shape[3])),  # noqa: B023
                    ref_values.new_zeros((rows, ref_values.shape[1], 0, ref_values.shape[3])),  # noqa: B023
                )

            old_keys, old_values = part(old_layers, old_rows)
            new_keys, new_values = part(new_layers, new_rows)
            # [old rows + new rows, heads, width, head_dim]
            joined_keys = torch.cat(
                [
                    torch.nn.functional.pad(old_keys, (0, 0, width - old_width, 0)),
                    torch.nn.functional.pad(new_keys, (0, 0, width - new_width, 0)),
                ]
            )
            joined_values = torch.cat(
                [
                    torch.nn.functional.pad(old_values, (0, 0, width - old_width, 0)),
                    torch.nn.functional.pad(new_values, (0, 0, width - new_width, 0)),
                ]
            )
            setattr(layer, "keys", joined_keys)  # noqa: B010 - the layer types vary
            setattr(layer, "values", joined_values)  # noqa: B010
        self._cache = target

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order) and drop the others, e.g. finished requests.

        Left padding columns that no remaining row needs are cut as well, so later steps do
        not pay for contexts that left the batch.

        Example:
            >>> from tests._tiny import make_tiny_model
            >>> contexts = BatchedContexts(make_tiny_model(vocab_size=22), [[5, 6, 7], [8]])
            >>> contexts.keep_rows([1]); contexts.rows, contexts.step([9]).shape
            (1, torch.Size([1, 22]))
        """
        index = torch.tensor(list(rows), dtype=torch.long, device=self._device)
        self._mask = self._mask.index_select(0, index)
        self._next_position = self._next_position.index_select(0, index)
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self._mask.shape[1]
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            for name in ("keys", "values"):
                states = getattr(layer, name, None)
                if isinstance(states, torch.Tensor) and states.dim() == 4:
                    setattr(layer, name, states.index_select(0, index)[:, :, start:, :])


class MergedRows:
    """Several single-row caches stepped together as one left-padded batch, then split back.

    The speculative strategy keeps one cache per context and crops them independently; when
    two of them must advance together (the draft and the neutral row of a guided call),
    ``MergedRows`` lays them side by side (each row left-padded to the longest, padding
    masked), runs every :meth:`feed` as ONE forward over all rows, and :meth:`split` returns
    one plain cache per row again, with exactly the slots that row's own forwards would have
    written (padding removed). Rows may be fed different numbers of tokens per forward (the
    shorter feeds are left-padded inside the new columns, masked like the rest).

    Example:
        >>> from tests._tiny import make_tiny_model
        >>> model = make_tiny_model(vocab_size=22)
        >>> caches, _ = prefill_split(model, [[5, 6, 7], [8]])
        >>> merged = MergedRows(model, caches)
        >>> merged.feed([[9], [10, 11]]).shape
        torch.Size([2, 22])
        >>> [c.get_seq_length() for c in merged.split()]
        [4, 3]
    """

    def __init__(self, model: PreTrainedModel, caches: Sequence[DynamicCache]) -> None:
        self.model = model
        self.forward_passes = 0
        self._device = model_device(model)
        lengths = [cache.get_seq_length() for cache in caches]
        width = max(lengths)
        # mask[row, slot]: 1 where the slot holds one of the row's tokens; [rows, width]
        self._mask = torch.zeros((len(caches), width), dtype=torch.long, device=self._device)
        for row, length in enumerate(lengths):
            self._mask[row, width - length :] = 1
        self._next_position = torch.tensor(lengths, dtype=torch.long, device=self._device)
        if width == 0:
            raise ValueError("cannot merge caches that are all empty")
        # A row with no token yet may have no cache layers at all: it merges as zero slots
        # shaped like a row that has some.
        template = next(cache for cache, length in zip(caches, lengths, strict=True) if length)
        per_layer = []
        for index, (ref_keys, ref_values) in enumerate(map(_layer_tensors, template.layers)):
            keys, values = [], []
            for cache, length in zip(caches, lengths, strict=True):
                k, v = (
                    _layer_tensors(cache.layers[index])
                    if length
                    else (ref_keys[:, :, :0], ref_values[:, :, :0])
                )
                pad = width - length
                keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            per_layer.append((torch.cat(keys), torch.cat(values)))
        self._cache = DynamicCache(ddp_cache_data=per_layer)

    def feed(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append ``tokens[row]`` (one or more) to every row in one forward; return each
        row's next-token logits after its last token, ``[rows, vocab]``."""
        width = max(len(row) for row in tokens)
        ids = torch.full((len(tokens), width), PAD_ID, dtype=torch.long)
        new_mask = torch.zeros((len(tokens), width), dtype=torch.long)
        for row, row_tokens in enumerate(tokens):
            if not row_tokens:
                raise ValueError("every row needs at least one new token")
            ids[row, width - len(row_tokens) :] = torch.tensor(list(row_tokens))
            new_mask[row, width - len(row_tokens) :] = 1
        new_mask = new_mask.to(self._device)
        # Positions continue each row's own count; padded slots get any position (masked).
        positions = self._next_position.unsqueeze(-1) + (new_mask.cumsum(dim=-1) - 1).clamp(min=0)
        self._mask = torch.cat([self._mask, new_mask], dim=-1)
        logits = forward_logits(
            self.model,
            ids.to(self._device),
            self._cache,
            keep=1,
            attention_mask=self._mask,
            position_ids=positions,
        )
        self._next_position = self._next_position + new_mask.sum(dim=-1)
        self.forward_passes += 1
        return logits[:, -1, :]

    @property
    def cache(self) -> DynamicCache:
        """The merged batch cache: ``[rows, heads, slots, head_dim]`` per layer."""
        return self._cache

    @property
    def mask(self) -> torch.Tensor:
        """``[rows, slots]``: 1 where a slot holds one of the row's tokens."""
        return self._mask

    @property
    def next_position(self) -> torch.Tensor:
        """``[rows]``: the position each row's next token takes (its token count)."""
        return self._next_position

    def split(self) -> list[DynamicCache]:
        """One plain cache per row, holding only that row's slots (padding removed)."""
        caches = []
        for row in range(self._mask.shape[0]):
            slots = self._mask[row].nonzero().flatten()
            per_layer = [
                (
                    keys[row : row + 1].index_select(2, slots),
                    values[row : row + 1].index_select(2, slots),
                )
                for keys, values in map(_layer_tensors, self._cache.layers)
            ]
            caches.append(DynamicCache(ddp_cache_data=per_layer))
        return caches
