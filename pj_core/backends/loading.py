"""Loading a model on the backend of one's choice: :func:`load_model` (``pj_core.load_model``).

* ``backend="transformers"`` (the default):
  :func:`pj_core.backends.hf.models.load_model` gives a
  :class:`~pj_core.backends.hf.models.LoadedModel` (GGUF files dequantised to float32 once).
* ``backend="llama.cpp"``: :func:`pj_core.backends.llamacpp.loading.load_llama_cpp` gives a
  :class:`~pj_core.backends.llamacpp.loading.LoadedLlamaCpp`: the GGUF file as it is,
  quantised, on llama.cpp (needs llama-cpp-python).

Example:
    >>> from pj_core.backends.loading import load_model
    >>> m = load_model("smollm2-135m-instruct", backend="llama.cpp")  # doctest: +SKIP
    >>> m.backend.description  # doctest: +SKIP
    'llama ?B Q4_1'
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal, overload

from pj_core.backends import backend_name
from pj_core.backends.hf.models import DEFAULT_MODEL, LoadedModel
from pj_core.backends.hf.models import load_model as load_on_transformers
from pj_core.errors import InvalidModelOptionError

if TYPE_CHECKING:
    import torch

    from pj_core.backends.llamacpp.loading import LoadedLlamaCpp


@overload
def load_model(
    spec: str | os.PathLike[str] = ...,
    *,
    backend: Literal["transformers"] | None = ...,
    device: str | torch.device | None = ...,
    dtype: str | torch.dtype | None = ...,
    trust_remote_code: bool = ...,
    pack_cpu_weights: bool = ...,
) -> LoadedModel: ...


@overload
def load_model(
    spec: str | os.PathLike[str] = ...,
    *,
    backend: Literal["llama.cpp"],
    device: str | torch.device | None = ...,
    n_ctx: int | None = ...,
    n_threads: int | None = ...,
) -> LoadedLlamaCpp: ...


@overload
def load_model(
    spec: str | os.PathLike[str] = ...,
    *,
    backend: str | None = ...,
    device: str | torch.device | None = ...,
    dtype: str | torch.dtype | None = ...,
    trust_remote_code: bool = ...,
    pack_cpu_weights: bool = ...,
    n_ctx: int | None = ...,
    n_threads: int | None = ...,
) -> LoadedModel | LoadedLlamaCpp: ...


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    backend: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    pack_cpu_weights: bool = True,
    n_ctx: int | None = None,
    n_threads: int | None = None,
) -> LoadedModel | LoadedLlamaCpp:
    """Load ``spec`` (a built-in alias, a ``.gguf`` file, a model directory, a cached hub id)
    on ``backend``.

    Args:
        spec: the model.
        backend: ``"transformers"`` (default) or ``"llama.cpp"``
            (:data:`pj_core.backends.BACKENDS`; ``"llamacpp"`` and ``"hf"`` are spellings).
        device, dtype, trust_remote_code, pack_cpu_weights: transformers' settings
            (:func:`pj_core.backends.hf.models.load_model`); llama.cpp takes ``device="cpu"``.
        n_ctx, n_threads: llama.cpp's key/value cells (shared by every call at once) and CPU
            threads (:func:`pj_core.backends.llamacpp.loading.load_llama_cpp`).

    Raises:
        InvalidModelOptionError: an unknown backend, or a setting of the other backend.
        BackendNotInstalledError: ``backend="llama.cpp"`` without llama-cpp-python (the
            message has the pip command).
        ModelNotFoundError, ModelPackageMissingError, ModelLoadError: as the backend's loader.

    Example:
        >>> load_model(backend="vllm")
        Traceback (most recent call last):
        ...
        pj_core.errors.InvalidModelOptionError: unknown backend 'vllm'; use one of: transformers, llama.cpp
    """  # noqa: E501
    if backend_name(backend) == "transformers":
        if n_ctx is not None or n_threads is not None:
            raise InvalidModelOptionError(
                "n_ctx and n_threads are settings of the llama.cpp backend; pass "
                "backend='llama.cpp' with them, or leave them out"
            )
        return load_on_transformers(
            spec,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            pack_cpu_weights=pack_cpu_weights,
        )
    if device is not None and str(device) != "cpu":
        raise InvalidModelOptionError(
            f"the llama.cpp backend runs on the CPU here, not on {str(device)!r}; leave "
            "device out, or use backend='transformers' for a GPU"
        )
    if dtype is not None or not pack_cpu_weights or trust_remote_code:
        raise InvalidModelOptionError(
            "dtype, pack_cpu_weights and trust_remote_code are settings of the transformers "
            "backend; llama.cpp runs the GGUF file's own quantisation and no model code: "
            "leave them out"
        )
    from pj_core.backends.llamacpp.loading import load_llama_cpp

    return load_llama_cpp(spec, n_ctx=n_ctx, n_threads=n_threads)
