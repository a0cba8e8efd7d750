"""A second backend for the tests: a pure-torch toy language model with no cache.

It proves that :mod:`pj_core.backends.protocol` is all the decoding needs: the public engine
(``PersonaJudge.from_backend``) runs on it, and the exactness and distribution tests pass on
it as they do on the transformers backend. Its rows keep only their token lists; every
operation computes its logits with one full forward of the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch

from pj_core.backends.protocol import RowLayout, StepTimings
from pj_core.backends.timing import measure_step_timings


class ToyLM(torch.nn.Module):
    """logits(next | t_0..t_n) = A[t_n] + mean_i B[t_i]: the last token and the whole history
    (so persona prompts that differ anywhere give different distributions).

    ``forward(input_ids=[batch, T])`` returns ``.logits`` ``[batch, T, vocab]``, like a
    transformers model called with ``use_cache=False`` (the test references call it so).
    """

    def __init__(self, vocab_size: int, seed: int = 0, history_scale: float = 3.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # [vocab (token), vocab (next)] each
        self.last: torch.Tensor = torch.randn(vocab_size, vocab_size, generator=generator)
        self.history: torch.Tensor = (
            torch.randn(vocab_size, vocab_size, generator=generator) * history_scale
        )

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        ids = input_ids.long()  # [batch, T]
        counts = torch.arange(1, ids.shape[1] + 1, dtype=torch.float32).view(1, -1, 1)
        mean_history = self.history[ids].cumsum(dim=1) / counts  # [batch, T, vocab]
        return SimpleNamespace(logits=self.last[ids] + mean_history)


class ToyRows:
    """:class:`pj_core.backends.protocol.Rows` over :class:`ToyLM`: token lists, no cache."""

    def __init__(self, lm: ToyLM, prefixes: Sequence[Sequence[int]]) -> None:
        self.lm = lm
        self.texts = [list(prefix) for prefix in prefixes]
        self.forward_passes = 1 if any(self.texts) else 0

    @property
    def count(self) -> int:
        return len(self.texts)

    def length(self, row: int) -> int:
        return len(self.texts[row])

    def _after(self, tokens: list[int]) -> torch.Tensor:
        """``[len(tokens), vocab]``: the logits after each token."""
        logits: torch.Tensor = self.lm(input_ids=torch.tensor([tokens])).logits[0]
        return logits

    def extend(self, row: int, tokens: Sequence[int], keep: int) -> torch.Tensor:
        self.texts[row] += list(tokens)
        self.forward_passes += 1
        return self._after(self.texts[row])[-keep:]

    def extend_together(self, rows: Sequence[int], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        for row, new in zip(rows, tokens, strict=True):
            self.texts[row] += list(new)
        self.forward_passes += 1
        return torch.stack([self._after(self.texts[row])[-1] for row in rows])

    def truncate(self, row: int, length: int) -> None:
        self.texts[row] = self.texts[row][:length]

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        for text, token in zip(self.texts, tokens, strict=True):
            text.append(token)
        self.forward_passes += 1
        return torch.stack([self._after(text)[-1] for text in self.texts])

    def add(self, prefixes: Sequence[Sequence[int]]) -> None:
        self.texts += [list(prefix) for prefix in prefixes]
        self.forward_passes += 1 if any(prefixes) else 0

    def keep(self, rows: Sequence[int]) -> None:
        self.texts = [self.texts[row] for row in rows]


class ToyBackend:
    """:class:`pj_core.backends.protocol.Backend` over :class:`ToyLM`."""

    def __init__(
        self, lm: ToyLM, *, eos_token_ids: Sequence[int] = (1,), context_window: int = 256
    ) -> None:
        self.lm = lm
        self._eos = tuple(eos_token_ids)
        self._window = context_window

    @property
    def vocab_size(self) -> int:
        return int(self.lm.last.shape[0])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def context_window(self) -> int:
        return self._window

    def rows(self, prefixes: Sequence[Sequence[int]], *, layout: RowLayout) -> ToyRows:
        return ToyRows(self.lm, prefixes)

    def step_timings(self, *, n_personas: int, lookahead: int) -> StepTimings:
        return measure_step_timings(self, n_personas=n_personas, lookahead=lookahead)

    def with_prefix_cache(self, tokens: int) -> ToyBackend:
        return self  # nothing is cached, so nothing is shared

    def clear_prefix_cache(self) -> None:
        return None
