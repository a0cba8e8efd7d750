"""llama.cpp behind :mod:`pj_core.backends.protocol`: :class:`LlamaCppBackend`.

A GGUF file runs as llama.cpp runs it (quantised weights, its own CPU kernels), through
llama-cpp-python's low-level API:

* one ``llama_context`` per backend, with a unified key/value cache of ``n_ctx`` cells that
  every row shares, and ``n_seq_max`` sequence ids;
* a row is a sequence id ``s`` and a length ``n``: its tokens sit in the cache at positions
  ``0..n-1`` of sequence ``s``;
* every operation is one ``llama_batch`` (split in chunks of ``n_batch`` tokens when longer):
  each token carries its position and sequence id, and a logits flag where the decoding needs
  the distribution that follows it; the flagged rows are read back with
  ``llama_get_logits_ith`` and copied into a float32 tensor ``[flagged, vocab]``;
* :meth:`LlamaCppRows.truncate` is ``llama_memory_seq_rm(s, length, -1)``; rows that leave
  (:meth:`LlamaCppRows.keep`, or rows no one holds any more) have their sequence removed and
  their id returned to the pool;
* a prefix cache (:meth:`LlamaCppBackend.with_prefix_cache`) keeps recently prefilled prompts
  as sequences of their own; a new row that begins the same way gets those cells by
  ``llama_memory_seq_cp`` (cells are shared, not copied) and computes only the rest.

Several engine calls (a server's threads) share one context: a lock guards each batch, and
llama.cpp runs without the GIL, so the other threads go on meanwhile.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from pj_core.backends.hf.prefix_cache import common_length
from pj_core.backends.protocol import RowLayout, StepTimings
from pj_core.backends.timing import measure_step_timings
from pj_core.errors import (
    BackendCapacityError,
    BackendNotInstalledError,
    ModelLoadError,
    ModelNotFoundError,
    ModelOutputError,
)

INSTALL_COMMAND = 'pip install "llama-cpp-python==0.3.36"'
"""What installs the llama.cpp backend's one dependency, as the ``llamacpp`` extra pins it
(``pip install "persona-judge[llamacpp]"``; a source build: ~5-20 minutes)."""

DEFAULT_N_CTX = 8192
"""Key/value cells of a context, shared by all its rows (SmolLM2-135M: ~23 KB each)."""

DEFAULT_N_SEQ_MAX = 64
"""Rows (sequence ids) one context can hold at once, prefix-cache entries included."""

DEFAULT_N_BATCH = 512
"""Most tokens in one ``llama_decode``; longer batches are split."""

MIN_OUTPUTS = 64
"""Flagged tokens one ``llama_decode`` may hold at least (more rows raise it to n_seq_max)."""


def llama_cpp_module() -> ModuleType:
    """``llama_cpp.llama_cpp`` (the low-level API), quiet below errors.

    Raises:
        BackendNotInstalledError: llama-cpp-python is not installed (the message has the pip
            command).
    """
    try:
        import llama_cpp.llama_cpp as llama
    except ImportError as error:  # not installed, or its native library would not load
        raise BackendNotInstalledError(
            f"the llama.cpp backend needs llama-cpp-python ({error}); install it with "
            f"{INSTALL_COMMAND}, or use backend='transformers'",
            install_command=INSTALL_COMMAND,
        ) from error
    # llama-cpp-python prints llama.cpp's log to stderr at the level of this logger, which is
    # unset (everything) until someone sets it: only errors, unless the user chose a level.
    llama_logger = logging.getLogger("llama-cpp-python")
    if llama_logger.level == logging.NOTSET:
        llama_logger.setLevel(logging.ERROR)
    return llama


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Model:
    """A loaded ``llama_model`` (weights memory-mapped from the GGUF), freed with the object."""

    def __init__(self, path: Path) -> None:
        llama = llama_cpp_module()
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is not a file; pass the path of a .gguf file")
        params = llama.llama_model_default_params()
        params.n_gpu_layers = 0
        pointer = llama.llama_model_load_from_file(os.fsencode(path), params)
        if not pointer:
            raise ModelLoadError(
                f"llama.cpp could not load {path} ({_describe_gguf(path)}): the file is not a "
                "complete GGUF model, or this llama.cpp does not know its architecture; check "
                "the file, update llama-cpp-python, or use backend='transformers'"
            )
        self.path = path
        self.pointer = pointer
        self.vocab = llama.llama_model_get_vocab(pointer)
        self.vocab_size = int(llama.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama.llama_model_n_ctx_train(pointer))
        text = ctypes.create_string_buffer(256)
        llama.llama_model_desc(pointer, text, len(text))
        self.description = text.value.decode("utf-8", "replace")  # e.g. "llama ?B Q4_1"
        self.parameters = int(llama.llama_model_n_params(pointer))
        self.file_bytes = int(llama.llama_model_size(pointer))
        self.eos_token_ids = tuple(
            token for token in range(self.vocab_size) if llama.llama_vocab_is_eog(self.vocab, token)
        )
        self._free = weakref.finalize(self, llama.llama_model_free, pointer)


def _describe_gguf(path: Path) -> str:
    """The architecture a GGUF file names, for an error message (best effort)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).fields.get("general.architecture")
        if field is None:
            return "no architecture named"
        return f"architecture {bytes(field.parts[field.data[0]]).decode()!r}"
    except Exception as error:  # any failure here only shortens the message
        return f"unreadable as GGUF: {type(error).__name__}"


@dataclass(frozen=True)
class _Item:
    """One token of a batch: ``token`` at ``pos`` of sequence ``seq``; ``output``: read the
    logits that follow it."""

    seq: int
    pos: int
    token: int
    output: bool


class _Context:
    """A ``llama_context`` over a :class:`_Model`, shared by every row of a backend: its
    sequence ids, its lock and its one ``llama_batch``."""

    def __init__(
        self,
        model: _Model,
        *,
        n_ctx: int,
        n_seq_max: int,
        n_threads: int,
        flash_attention: bool | None,
    ) -> None:
        llama = self.llama = llama_cpp_module()
        limit = int(llama.llama_max_parallel_sequences())
        if not 1 <= n_seq_max <= limit:
            raise BackendCapacityError(f"n_seq_max must be 1..{limit}, got {n_seq_max}")
        if n_ctx < 1 or n_threads < 1:
            raise BackendCapacityError(
                f"n_ctx and n_threads must be >= 1, got n_ctx={n_ctx}, n_threads={n_threads}"
            )
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = DEFAULT_N_BATCH
        # The compute buffer holds the logits of the most flagged tokens one batch may have:
        # n_batch of them by default (SmolLM2: 100 MB, Gemma 3: 540 MB). The decoding reads
        # at most a judge pass (λ + 1) or one per row; decode() splits anything larger.
        self.n_outputs = max(n_seq_max, MIN_OUTPUTS)
        params.n_outputs_max = self.n_outputs
        params.n_seq_max = n_seq_max
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = True  # one pool of cells for rows of any length
        params.swa_full = True  # sliding-window layers keep every cell: rows can be cropped
        params.no_perf = True
        params.flash_attn_type = {
            None: llama.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: llama.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: llama.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attention]
        pointer = llama.llama_init_from_model(model.pointer, params)
        if not pointer:
            raise BackendCapacityError(
                f"llama.cpp could not create a context of n_ctx={n_ctx} cells and "
                f"n_seq_max={n_seq_max} (out of memory?); lower n_ctx"
            )
        self.model = model  # the context needs the model alive
        self.pointer = pointer
        self.memory = llama.llama_get_memory(pointer)
        self.n_ctx = int(llama.llama_n_ctx(pointer))
        self.n_batch = int(llama.llama_n_batch(pointer))
        self.n_seq_max = n_seq_max
        self.n_threads = n_threads
        self.vocab_size = model.vocab_size
        self.batch = llama.llama_batch_init(self.n_batch, 0, 1)
        self.lock = threading.Lock()
        self._free_seqs = list(range(n_seq_max - 1, -1, -1))  # pop() takes the lowest
        self._released: collections.deque[int] = collections.deque()  # freed by finalizers
        self._close = weakref.finalize(self, _free_context, llama, pointer, self.batch)

    # Sequence ids -------------------------------------------------------------------------

    def take_seqs(self, count: int) -> list[int]:
        """``count`` free sequence ids (empty in the cache)."""
        with self.lock:
            self._reclaim()
            if count > len(self._free_seqs):
                raise BackendCapacityError(
                    f"the llama.cpp context holds {self.n_seq_max} rows and "
                    f"{self.n_seq_max - len(self._free_seqs)} are in use; {count} more do not "
                    "fit: pass a larger n_seq_max, or run fewer calls at once"
                )
            return [self._free_seqs.pop() for _ in range(count)]

    def release_later(self, seqs: Sequence[int]) -> None:
        """Give ``seqs`` back from anywhere (a finalizer, maybe inside a locked call): they
        are removed from the cache by the next call that takes the lock."""
        self._released.extend(seqs)

    def _reclaim(self) -> None:
        """Remove released sequences from the cache (the lock is held)."""
        while self._released:
            seq = self._released.popleft()
            self.llama.llama_memory_seq_rm(self.memory, seq, -1, -1)
            self._free_seqs.append(seq)

    # The cache ----------------------------------------------------------------------------

    def crop(self, seq: int, length: int) -> None:
        """Forget the tokens of ``seq`` from position ``length`` on."""
        with self.lock:
            if not self.llama.llama_memory_seq_rm(self.memory, seq, length, -1):
                raise ModelLoadError(f"llama.cpp could not crop sequence {seq} to {length}")

    def share(self, source: int, target: int, length: int) -> None:
        """Let ``target`` (empty) hold the cells of ``source``'s first ``length`` tokens."""
        with self.lock:
            self.llama.llama_memory_seq_cp(self.memory, source, target, 0, length)

    def decode(self, items: Sequence[_Item]) -> tuple[torch.Tensor, int]:
        """Run ``items`` through the model and return ``([flagged, vocab], forwards)``: the
        logits after each item with ``output`` set, in their order, and how many
        ``llama_decode`` calls it took (a chunk holds at most ``n_batch`` tokens and
        ``n_outputs`` flagged ones).

        A failed batch leaves no token of ``items`` in the cache.

        Raises:
            BackendCapacityError: the cache has no free cells for the batch.
            ModelOutputError: llama.cpp failed the batch.
        """
        llama, batch, vocab = self.llama, self.batch, self.vocab_size
        for item in items:
            if not 0 <= item.token < vocab:
                raise ValueError(f"token id {item.token} is outside the vocabulary 0..{vocab - 1}")
        logits = torch.empty(sum(item.output for item in items), vocab, dtype=torch.float32)
        out = 0
        chunks = list(self._chunks(items))
        with self.lock:
            self._reclaim()
            try:
                for chunk in chunks:
                    for i, item in enumerate(chunk):
                        batch.token[i] = item.token
                        batch.pos[i] = item.pos
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = item.seq
                        batch.logits[i] = item.output
                    batch.n_tokens = len(chunk)
                    status = int(llama.llama_decode(self.pointer, batch))
                    if status != 0:
                        raise self._decode_error(status, len(chunk))
                    for i, item in enumerate(chunk):
                        if item.output:
                            pointer = llama.llama_get_logits_ith(self.pointer, i)
                            ctypes.memmove(logits[out].data_ptr(), pointer, vocab * 4)
                            out += 1
            except BaseException:
                for seq, first in _first_positions(items).items():
                    llama.llama_memory_seq_rm(self.memory, seq, first, -1)
                raise
        return logits, len(chunks)

    def _chunks(self, items: Sequence[_Item]) -> Iterator[Sequence[_Item]]:
        """``items`` cut into batches of at most ``n_batch`` tokens and ``n_outputs`` flags."""
        start, flagged = 0, 0
        for i, item in enumerate(items):
            if i - start == self.n_batch or (item.output and flagged == self.n_outputs):
                yield items[start:i]
                start, flagged = i, 0
            flagged += item.output
        if start < len(items):
            yield items[start:]

    def _decode_error(self, status: int, tokens: int) -> Exception:
        if status == 1:
            return BackendCapacityError(
                f"the llama.cpp context's key/value cache (n_ctx={self.n_ctx} cells, shared by "
                f"all rows) has no room for {tokens} more tokens: pass a larger n_ctx, or run "
                "fewer or shorter calls at once"
            )
        return ModelOutputError(f"llama_decode failed with status {status}")


def _first_positions(items: Sequence[_Item]) -> dict[int, int]:
    first: dict[int, int] = {}
    for item in items:
        first[item.seq] = min(first.get(item.seq, item.pos), item.pos)
    return first


def _free_context(llama: ModuleType, pointer: Any, batch: Any) -> None:
    llama.llama_batch_free(batch)
    llama.llama_free(pointer)


class _SeqPrefixCache:
    """Recently prefilled prompts, each kept as a sequence of its own (cells shared with the
    rows that made them); least recently used dropped first, ``max_tokens`` in all."""

    def __init__(self, context: _Context, max_tokens: int, min_tokens: int = 8) -> None:
        if max_tokens < 1 or min_tokens < 1:
            raise ValueError("max_tokens and min_tokens must be >= 1")
        self.context = context
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.hits = 0  # lookups that reused a beginning
        self.reused_tokens = 0  # tokens those lookups did not compute again
        self._entries: collections.OrderedDict[tuple[int, ...], int] = collections.OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()
        self._held: list[int] = []  # the entries' sequence ids, given back with the cache
        weakref.finalize(self, context.release_later, self._held)

    @property
    def tokens(self) -> int:
        return self._tokens

    def lend(self, prompt: Sequence[int], target: int) -> int:
        """Give the empty sequence ``target`` the longest held beginning of ``prompt``;
        returns its length (0: none of ``min_tokens`` or more)."""
        with self._lock:
            best, best_key = 0, None
            for key in self._entries:
                length = common_length(key, prompt)
                if length > best:
                    best, best_key = length, key
            if best_key is None or best < self.min_tokens:
                return 0
            self._entries.move_to_end(best_key)
            self.context.share(self._entries[best_key], target, best)
            self.hits += 1
            self.reused_tokens += best
            return best

    def store(self, prompt: Sequence[int], source: int) -> None:
        """Keep ``prompt``, which sequence ``source`` holds now, as an entry of its own."""
        key = tuple(prompt)
        if not self.min_tokens <= len(key) <= self.max_tokens:
            return
        with self._lock:
            for held in list(self._entries):
                shared = common_length(held, key)
                if shared == len(key):  # already held (as itself or a beginning of an entry)
                    self._entries.move_to_end(held)
                    return
                if shared == len(held):  # the held entry is a beginning of the new prompt
                    self._drop(held)
            try:
                (seq,) = self.context.take_seqs(1)
            except BackendCapacityError:
                return  # every id is in use by live rows: they come first
            self.context.share(source, seq, len(key))
            self._entries[key] = seq
            self._held.append(seq)
            self._tokens += len(key)
            while self._tokens > self.max_tokens:
                self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._drop(key)

    def _drop(self, key: tuple[int, ...]) -> None:
        seq = self._entries.pop(key)
        self._tokens -= len(key)
        self._held.remove(seq)
        self.context.release_later([seq])


class LlamaCppBackend:
    """A GGUF model run by llama.cpp, as a :class:`pj_core.backends.protocol.Backend`.

    Args:
        path: the ``.gguf`` file.
        n_ctx: key/value cells of the context, shared by every row of every call at once
            (default :data:`DEFAULT_N_CTX`); a row holds at most ``min(n_ctx, the model's
            training context)`` tokens.
        n_seq_max: rows that can exist at once (default :data:`DEFAULT_N_SEQ_MAX`; at most
            256). A call holds one per persona (plus one for a guided call's neutral prompt).
        n_threads: CPU threads of llama.cpp (default: the cores this process may use).

    Raises:
        BackendNotInstalledError: llama-cpp-python is not installed.
        ModelNotFoundError: ``path`` is not a file.
        ModelLoadError: llama.cpp cannot load it (not a GGUF model, unknown architecture).
        BackendCapacityError: a setting out of range, or no memory for the context.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_seq_max: int = DEFAULT_N_SEQ_MAX,
        n_threads: int | None = None,
        flash_attention: bool | None = False,
    ) -> None:
        model = _Model(Path(path))
        self._context = _Context(
            model,
            n_ctx=n_ctx,
            n_seq_max=n_seq_max,
            n_threads=n_threads or _default_threads(),
            flash_attention=flash_attention,
        )
        self._prefix_cache: _SeqPrefixCache | None = None

    @property
    def path(self) -> Path:
        """The GGUF file."""
        return self._context.model.path

    @property
    def description(self) -> str:
        """llama.cpp's description of the model: architecture, size, quantisation."""
        return self._context.model.description

    @property
    def parameters(self) -> int:
        """How many weights the model has."""
        return self._context.model.parameters

    @property
    def n_threads(self) -> int:
        """llama.cpp's CPU threads."""
        return self._context.n_threads

    @property
    def n_ctx(self) -> int:
        """Key/value cells of the context (shared by all rows)."""
        return self._context.n_ctx

    @property
    def vocab_size(self) -> int:
        return self._context.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token llama.cpp counts as an end of generation (``llama_vocab_is_eog``)."""
        return self._context.model.eos_token_ids

    @property
    def context_window(self) -> int:
        train = self._context.model.n_ctx_train
        return min(self._context.n_ctx, train) if train > 0 else self._context.n_ctx

    @property
    def prefix_cache_tokens(self) -> int:
        """Prompt tokens the prefix cache holds now (0 without one)."""
        return self._prefix_cache.tokens if self._prefix_cache is not None else 0

    def rows(self, prefixes: Sequence[Sequence[int]], *, layout: RowLayout) -> LlamaCppRows:
        """New rows (one layout serves every operation, so ``layout`` changes nothing)."""
        return LlamaCppRows(self._context, prefixes, self._prefix_cache)

    def step_timings(self, *, n_personas: int, lookahead: int) -> StepTimings:
        return measure_step_timings(self, n_personas=n_personas, lookahead=lookahead)

    def with_prefix_cache(self, tokens: int) -> LlamaCppBackend:
        """This model and context, with a prefix cache of at most ``tokens`` tokens (they
        take cells of ``n_ctx`` and one sequence id per prompt kept)."""
        backend = LlamaCppBackend.__new__(LlamaCppBackend)
        backend._context = self._context
        backend._prefix_cache = _SeqPrefixCache(self._context, tokens)
        return backend

    def clear_prefix_cache(self) -> None:
        if self._prefix_cache is not None:
            self._prefix_cache.clear()


class LlamaCppRows:
    """Rows of :class:`LlamaCppBackend` (a :class:`pj_core.backends.protocol.Rows`): row ``i``
    is sequence ``_seqs[i]`` of the context, holding ``_lengths[i]`` tokens."""

    def __init__(
        self,
        context: _Context,
        prefixes: Sequence[Sequence[int]],
        prefix_cache: _SeqPrefixCache | None = None,
    ) -> None:
        self._context = context
        self._prefix_cache = prefix_cache
        self._seqs: list[int] = []  # changed in place only: the finalizer gives back its ids
        self._lengths: list[int] = []
        self._passes = 0
        weakref.finalize(self, context.release_later, self._seqs)
        self.add(prefixes)

    @property
    def forward_passes(self) -> int:
        return self._passes

    @property
    def count(self) -> int:
        return len(self._seqs)

    def length(self, row: int) -> int:
        return self._lengths[self._row(row)]

    def extend(self, row: int, tokens: Sequence[int], keep: int) -> torch.Tensor:
        row = self._row(row)
        if not tokens or not 1 <= keep <= len(tokens):
            raise ValueError(f"extend needs 1 <= keep <= {len(tokens)} new tokens, got {keep}")
        items = self._items(row, tokens, outputs_from=len(tokens) - keep)
        logits = self._decode(items)  # [keep, vocab]
        self._lengths[row] += len(tokens)
        return logits

    def extend_together(self, rows: Sequence[int], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        chosen = [self._row(row) for row in rows]
        if len(set(chosen)) != len(chosen) or len(chosen) != len(tokens):
            raise ValueError("extend_together needs distinct rows and one token list per row")
        if any(not row_tokens for row_tokens in tokens):
            raise ValueError("every row needs at least one new token")
        items = [
            item
            for row, new in zip(chosen, tokens, strict=True)
            for item in self._items(row, new, outputs_from=len(new) - 1)
        ]
        logits = self._decode(items)  # [rows, vocab]
        for row, new in zip(chosen, tokens, strict=True):
            self._lengths[row] += len(new)
        return logits

    def truncate(self, row: int, length: int) -> None:
        row = self._row(row)
        if not 0 <= length <= self._lengths[row]:
            raise ValueError(f"row {row} holds {self._lengths[row]} tokens; cannot keep {length}")
        if length < self._lengths[row]:
            self._context.crop(self._seqs[row], length)
            self._lengths[row] = length

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        if len(tokens) != self.count or not tokens:
            raise ValueError(f"step needs one token per row ({self.count}), got {len(tokens)}")
        items = [
            _Item(seq, length, int(token), True)
            for seq, length, token in zip(self._seqs, self._lengths, tokens, strict=True)
        ]
        logits = self._decode(items)  # [rows, vocab]
        self._lengths[:] = [length + 1 for length in self._lengths]
        return logits

    def add(self, prefixes: Sequence[Sequence[int]]) -> None:
        if not prefixes:
            return
        seqs = self._context.take_seqs(len(prefixes))
        try:
            starts = [
                self._prefix_cache.lend(prefix, seq) if self._prefix_cache is not None else 0
                for seq, prefix in zip(seqs, prefixes, strict=True)
            ]
            items = [
                _Item(seq, start + i, int(token), False)
                for seq, prefix, start in zip(seqs, prefixes, starts, strict=True)
                for i, token in enumerate(prefix[start:])
            ]
            if items:
                self._decode(items)
        except BaseException:
            self._context.release_later(seqs)
            raise
        if self._prefix_cache is not None:
            for seq, prefix in zip(seqs, prefixes, strict=True):
                self._prefix_cache.store(prefix, seq)
        self._seqs += seqs
        self._lengths += [len(prefix) for prefix in prefixes]

    def keep(self, rows: Sequence[int]) -> None:
        kept = [self._row(row) for row in rows]
        leaving = set(range(self.count)) - set(kept)
        self._context.release_later([self._seqs[row] for row in leaving])
        self._seqs[:] = [self._seqs[row] for row in kept]
        self._lengths[:] = [self._lengths[row] for row in kept]

    # ------------------------------------------------------------------ helpers

    def _row(self, row: int) -> int:
        if not 0 <= row < self.count:
            raise IndexError(f"row {row} does not exist; there are {self.count} rows")
        return row

    def _items(self, row: int, tokens: Sequence[int], *, outputs_from: int) -> list[_Item]:
        """``tokens`` appended to ``row``, with the logits read after ``tokens[outputs_from:]``."""
        seq, length = self._seqs[row], self._lengths[row]
        if length + len(tokens) > self._context.n_ctx:
            raise BackendCapacityError(
                f"row {row} would hold {length + len(tokens)} tokens, more than the context's "
                f"n_ctx={self._context.n_ctx}"
            )
        return [
            _Item(seq, length + i, int(token), i >= outputs_from) for i, token in enumerate(tokens)
        ]

    def _decode(self, items: Sequence[_Item]) -> torch.Tensor:
        logits, forwards = self._context.decode(items)
        self._passes += forwards
        return logits
