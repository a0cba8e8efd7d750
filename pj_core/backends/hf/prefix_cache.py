"""Prefix caching: the keys and values of recently prefilled prompts, reused by later prompts
that start with the same tokens.

A server sees the same beginnings again and again: every request of a user carries that
user's persona text in its system turn, every turn of a chat re-sends the history before it.
The keys and values of a token depend only on the tokens before it (causal attention), so
the slots of a common beginning can be copied from an earlier prompt instead of computed
again; only the rest of the prompt goes through the model. The copied slots were computed in
another batch, so they can differ from a fresh prefill in the last float bits (as any two
batch shapes do; see :mod:`pj_core.batch`).

:class:`PrefixCache` keeps whole prompts (one entry per prefilled row, least recently used
dropped first, at most ``max_tokens`` tokens in all) and answers the longest common beginning
of a new prompt with any of them.

Example:
    >>> import torch
    >>> cache = PrefixCache(max_tokens=100, min_tokens=2)
    >>> layer = (torch.zeros(1, 2, 5, 4), torch.ones(1, 2, 5, 4))  # [1, heads, slots, dim]
    >>> cache.store([1, 2, 3, 4, 5], [layer])
    >>> length, layers = cache.lookup([1, 2, 3, 9, 9, 9])
    >>> length, tuple(layers[0][0].shape)
    (3, (1, 2, 3, 4))
    >>> cache.lookup([1, 2, 3])[0]  # at least one token is left to feed
    2
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

# Per layer: (keys, values), each [1, heads, slots, head_dim].
LayerKV = tuple[torch.Tensor, torch.Tensor]


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` share at their start.

    Example:
        >>> common_length([1, 2, 3], [1, 2, 4, 5])
        2
    """
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


class PrefixCache:
    """Recently prefilled prompts' keys and values, for prompts that start the same way.

    Args:
        max_tokens: the most prompt tokens kept in all (each costs the model's key/value size
            per token: about 46 KB for SmolLM2-135M in float32); the least recently used
            prompts are dropped first.
        min_tokens: a common beginning shorter than this is not reused (copying a few slots
            saves less than it costs).
    """

    def __init__(self, max_tokens: int = 4096, min_tokens: int = 8) -> None:
        if max_tokens < 1 or min_tokens < 1:
            raise ValueError("max_tokens and min_tokens must be >= 1")
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.hits = 0  # lookups that reused a beginning
        self.reused_tokens = 0  # tokens those lookups did not compute again
        self._entries: OrderedDict[tuple[int, ...], list[LayerKV]] = OrderedDict()
        self._tokens = 0

    @property
    def tokens(self) -> int:
        """Prompt tokens held now."""
        return self._tokens

    def lookup(self, prompt: Sequence[int]) -> tuple[int, list[LayerKV] | None]:
        """The longest beginning of ``prompt`` held here, as ``(length, per-layer keys and
        values of its slots)``; ``(0, None)`` when none reaches ``min_tokens``. At most
        ``len(prompt) - 1`` tokens are reused: the prompt's last token still goes through the
        model (its forward writes the slot, and the rows of one prefill need a token each)."""
        best, best_key = 0, None
        for key in self._entries:
            length = common_length(key, prompt)
            if length > best:
                best, best_key = length, key
        best = min(best, len(prompt) - 1)
        if best_key is None or best < self.min_tokens:
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        layers = [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_key]]
        return best, layers

    def store(self, prompt: Sequence[int], layers: Sequence[LayerKV]) -> None:
        """Keep ``prompt`` with its slots' keys and values (``[1, heads, len(prompt),
        head_dim]`` per layer; kept as given, so pass tensors nothing else writes). A prompt
        that an entry already begins with adds nothing; an entry that is a beginning of
        ``prompt`` is replaced by it."""
        key = tuple(prompt)
        if len(key) < self.min_tokens or len(key) > self.max_tokens:
            return
        for held in list(self._entries):
            shared = common_length(held, key)
            if shared == len(key):  # already held (as itself or as a beginning of an entry)
                self._entries.move_to_end(held)
                return
            if shared == len(held):  # the held entry is a beginning of the new prompt
                self._drop(held)
        self._entries[key] = list(layers)
        self._tokens += len(key)
        while self._tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        """Forget every prompt (e.g. after the model failed mid-forward)."""
        self._entries.clear()
        self._tokens = 0

    def _drop(self, key: tuple[int, ...]) -> None:
        del self._entries[key]
        self._tokens -= len(key)
