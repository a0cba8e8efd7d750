"""Loading a GGUF model for the llama.cpp backend: :func:`load_llama_cpp`.

llama.cpp runs the file as it is; the prompts are rendered by the transformers tokenizer
converted from the same file (its vocabulary and chat template), so both backends see the
same token ids (``tests/test_llamacpp_loading.py`` checks llama.cpp's own tokenizer on the
rendered prompts). The converted tokenizer is cached on disk by the file's sha256, next to the
other conversions (:mod:`pj_core.backends.hf.model_cache`).

Example:
    >>> loaded = load_llama_cpp("smollm2-135m-instruct")  # doctest: +SKIP
    >>> loaded.backend.description, loaded.context_window  # doctest: +SKIP
    ('llama ?B Q4_1', 8192)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pj_core.backends.hf import model_cache
from pj_core.backends.hf.models import (
    DEFAULT_MODEL,
    _resolve,
    gguf_file,
    max_loaded_models,
)
from pj_core.backends.llamacpp.backend import DEFAULT_N_CTX, LlamaCppBackend, llama_cpp_module
from pj_core.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

_TOKENIZERS_DIR = "tokenizers"
_COMPLETE = "complete"  # written last into a finished tokenizer entry


@dataclass(frozen=True)
class LoadedLlamaCpp:
    """A GGUF model on llama.cpp, ready for ``PersonaJudge.from_backend``.

    Attributes:
        backend: the :class:`LlamaCppBackend` (one context shared by every call).
        tokenizer: the transformers tokenizer converted from the GGUF (``pad_token`` set).
        name: the alias or path given to :func:`load_llama_cpp`.
        path: the GGUF file.
    """

    backend: LlamaCppBackend
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: Path

    @property
    def context_window(self) -> int:
        """The most positions one row may hold (``min(n_ctx, training context)``)."""
        return self.backend.context_window

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token llama.cpp counts as an end of generation."""
        return self.backend.eos_token_ids

    @property
    def device(self) -> torch.device:
        """Where the weights live: llama.cpp's CPU build."""
        import torch

        return torch.device("cpu")


_Key = tuple[str, int, int | None]
_loaded: OrderedDict[_Key, LoadedLlamaCpp] = OrderedDict()
_lock = threading.Lock()


def load_llama_cpp(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    n_ctx: int | None = None,
    n_threads: int | None = None,
) -> LoadedLlamaCpp:
    """Load the GGUF file ``spec`` names (a ``.gguf`` path, a directory holding one, or a
    built-in alias) on llama.cpp.

    Repeated calls with the same file and settings return the same object (at most
    ``$PJ_MAX_LOADED_MODELS`` kept, as :func:`pj_core.backends.hf.models.load_model`).

    Args:
        spec: the model.
        n_ctx: key/value cells shared by all rows of all calls at once (default 8192).
        n_threads: llama.cpp's CPU threads (default: the cores this process may use).

    Raises:
        BackendNotInstalledError: llama-cpp-python is missing (the message has the command).
        InvalidModelOptionError: ``spec`` is a Hugging Face model (no GGUF file).
        ModelNotFoundError, ModelPackageMissingError: as ``load_model``.
        ModelLoadError: llama.cpp or transformers cannot read the file.
    """
    llama_cpp_module()  # a missing package fails before anything is read
    source = _resolve(spec)
    path = gguf_file(spec, source=source)
    key: _Key = (str(path), n_ctx or DEFAULT_N_CTX, n_threads)
    limit = max_loaded_models()
    with _lock:
        loaded = _loaded.get(key)
        if loaded is None:
            backend = LlamaCppBackend(path, n_ctx=n_ctx or DEFAULT_N_CTX, n_threads=n_threads)
            loaded = LoadedLlamaCpp(
                backend=backend, tokenizer=gguf_tokenizer(path), name=source.name, path=path
            )
            _loaded[key] = loaded
        _loaded.move_to_end(key)
        while len(_loaded) > limit:
            _loaded.popitem(last=False)
    if loaded.name != source.name:  # another spelling of the same file
        loaded = LoadedLlamaCpp(loaded.backend, loaded.tokenizer, source.name, loaded.path)
    return loaded


def clear_loaded_llama_cpp() -> None:
    """Forget every kept model (their memory is freed once no engine holds them)."""
    with _lock:
        _loaded.clear()


def gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The transformers tokenizer of the GGUF file ``path``, converted once and cached.

    Raises:
        ModelLoadError: transformers cannot read the file's tokenizer.
    """
    from transformers import AutoTokenizer

    sha = model_cache.file_sha256(path)
    model_dir = model_cache.converted_dir(sha)  # a full conversion holds the same tokenizer
    folder = model_cache.cache_root() / _TOKENIZERS_DIR / sha
    if model_cache.is_complete(model_dir):
        folder = model_dir
    elif not (folder / _COMPLETE).is_file():
        _convert_tokenizer(path, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ModelLoadError(f"cannot read the tokenizer converted from {path}: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _convert_tokenizer(path: Path, entry: Path) -> None:
    """Write the tokenizer of ``path`` into ``entry``, atomically (a private folder renamed
    into place; a rival process that finished first wins)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except Exception as exc:  # transformers raises many types for unsupported GGUF files
        raise ModelLoadError(
            f"transformers cannot read the tokenizer of {path}: {exc}; the prompts need it "
            "(its vocabulary and chat template)"
        ) from exc
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name[:12]}-", dir=entry.parent))
    try:
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text("ok\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if entry.exists() and not (entry / _COMPLETE).is_file():
            shutil.rmtree(entry, ignore_errors=True)  # left half-written by a crash
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / _COMPLETE).is_file():  # not a finished rival: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
