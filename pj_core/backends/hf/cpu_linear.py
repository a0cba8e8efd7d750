"""Faster CPU forwards: the model's linear layers with weights pre-packed for oneDNN.

Why: Persona-judge's speed on a CPU rests on two kinds of forward being about as cheap as a
single-token decode step: the judge's (λ+1)-token verify and the lockstep batch of one token
per persona. With PyTorch's default CPU path (MKL ``sgemm``), a linear layer over 2-6 rows
costs about twice one row on the 2-core AMD EPYC we develop on (matrix-vector vs small
matrix-matrix kernels), so every verify cost ~1.6 decode steps. oneDNN with the weights
reordered once into its blocked layout (what ``torch.compile``'s CPU "freezing" does) runs
1 to 6 rows in about the time of one, and the vocabulary projection of one row in about half
the time. ``benchmarks/linear_kernels.py`` measures both paths.

:func:`pack_linear_layers` swaps every ``nn.Linear`` of a float32 CPU model for a
:class:`PackedLinear` holding only the packed weight (no second copy), after checking on
random input that the packed layer computes what the original did. A weight shared with the
input embeddings (tied output projection) must stay dense for the embedding lookup, so
packing it costs a second copy; it is packed only when that copy stays under
:data:`MAX_TIED_COPY_FRACTION` of the model's parameter bytes (SmolLM2-135M: 21 %, packed;
Gemma 3 270M: 63 %, left dense). :func:`unpack_linear_layers` restores plain ``nn.Linear``
layers bit for bit (for training, export or moving the model to a GPU).

Packed layers are for inference: their forward refuses inputs that require gradients.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> model = model.requires_grad_(False)  # packed layers are for inference
    >>> x = torch.randn(3, 8)
    >>> before = model(x)
    >>> packed = pack_linear_layers(model)
    >>> after = model(x)
    >>> packed.layers if packed.available else 2
    2
    >>> bool(torch.allclose(before, after, atol=1e-5))
    True
    >>> unpack_linear_layers(model)
    2
    >>> type(model[0]).__name__
    'Linear'
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pj_core.errors import PersonaJudgeError

# A tied output projection is packed only when its second (packed) copy adds at most this
# fraction of the model's parameter bytes: a small vocabulary pays for itself, Gemma's
# 262k x 640 embedding (63 % of the model) would not.
MAX_TIED_COPY_FRACTION = 0.25

# Packed and reference outputs of the trial layer must agree this closely (float32; the two
# kernels only add in a different order).
_TRIAL_TOLERANCE = 1e-4


class PackedLinearGradientError(PersonaJudgeError, RuntimeError):
    """A packed (inference-only) linear layer was asked to propagate gradients."""


def _ops_present() -> bool:
    mkldnn_ops: Any = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and mkldnn_ops is not None
        and hasattr(mkldnn_ops, "_reorder_linear_weight")
        and hasattr(mkldnn_ops, "_linear_pointwise")
    )


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


@functools.cache
def packing_available() -> bool:
    """Whether this PyTorch build can run packed oneDNN linear layers (checked once, on a trial).

    Example:
        >>> isinstance(packing_available(), bool)
        True
    """
    if not _ops_present():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 16, generator=generator)
        bias = torch.randn(24, generator=generator)
        x = torch.randn(2, 3, 16, generator=generator)
        with torch.no_grad():
            expected = nn.functional.linear(x, weight, bias)
            got = _packed_linear(x, _pack(weight), bias)
        return bool(torch.allclose(got, expected, atol=_TRIAL_TOLERANCE, rtol=_TRIAL_TOLERANCE))
    except (RuntimeError, TypeError, AttributeError):  # a build without the kernels
        return False


class PackedLinear(nn.Module):
    """``nn.Linear`` for inference on CPU, its weight stored pre-packed for oneDNN.

    ``weight`` is still readable (unpacked on each access, so avoid it in loops); when the
    weight is shared with another module (a tied output projection), the dense original is
    kept and ``weight`` returns it.
    """

    def __init__(self, linear: nn.Linear, *, keep_dense: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed_weight = _pack(linear.weight)
        self.bias = linear.bias
        # Not a registered parameter: the owner of a shared weight (the embedding) registers it.
        self._dense: torch.Tensor | None = linear.weight if keep_dense else None

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight."""
        if self._dense is not None:
            return self._dense
        return self.packed_weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise PackedLinearGradientError(
                "this layer's weight is packed for inference; call "
                "pj_core.backends.hf.cpu_linear.unpack_linear_layers(model) before training"
            )
        return _packed_linear(x, self.packed_weight, self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same (bit-identical) weight and bias."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        weight = self._dense if self._dense is not None else self.packed_weight.to_dense()
        linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, False)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedLinear:
        # oneDNN tensors have no storage to copy; clone() does copy them.
        clone = PackedLinear.__new__(PackedLinear)
        nn.Module.__init__(clone)
        clone.in_features, clone.out_features = self.in_features, self.out_features
        clone.packed_weight = self.packed_weight.clone()
        clone.bias = copy.deepcopy(self.bias, memo)
        clone._dense = copy.deepcopy(self._dense, memo)
        memo[id(self)] = clone
        return clone

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, packed=oneDNN"
        )


@dataclass(frozen=True)
class PackingReport:
    """What :func:`pack_linear_layers` did.

    Attributes:
        available: whether this PyTorch build has the packed kernels at all.
        layers: how many ``nn.Linear`` layers were packed.
        skipped_tied: names of tied output projections left dense (their copy was too big).
    """

    available: bool
    layers: int
    skipped_tied: tuple[str, ...] = ()


def _shared_weight_ids(model: nn.Module) -> set[int]:
    """Ids of weights that belong to a module other than a linear layer (tied embeddings)."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear | PackedLinear):
            continue
        ids.update(id(parameter) for parameter in module.parameters(recurse=False))
    return ids


def _parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def pack_linear_layers(model: nn.Module) -> PackingReport:
    """Replace the float32 CPU ``nn.Linear`` layers of ``model`` by :class:`PackedLinear`.

    Layers of another type (subclasses included), dtype or device, and layers whose weight
    requires gradients (call ``model.requires_grad_(False)`` first), are left alone, as is
    everything when :func:`packing_available` is false.
    """
    if not packing_available():
        return PackingReport(available=False, layers=0)
    shared = _shared_weight_ids(model)
    budget = MAX_TIED_COPY_FRACTION * _parameter_bytes(model)
    packed, skipped = 0, []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            weight = child.weight
            if weight.device.type != "cpu" or weight.dtype != torch.float32:
                continue
            if weight.requires_grad:
                continue  # a trained weight must stay a dense parameter
            tied = id(weight) in shared
            if tied and weight.numel() * weight.element_size() > budget:
                skipped.append(f"{parent_name}.{name}".lstrip("."))
                continue
            setattr(parent, name, PackedLinear(child, keep_dense=tied))
            packed += 1
    return PackingReport(available=True, layers=packed, skipped_tied=tuple(skipped))


def weight_count(model: nn.Module) -> int:
    """Number of weights of ``model``, packed layers included (their packed weights are not
    registered parameters, so ``model.parameters()`` alone undercounts a packed model).

    Example:
        >>> weight_count(nn.Linear(3, 2))
        8
    """
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, PackedLinear) and module._dense is None:
            total += module.in_features * module.out_features
    return total


def unpack_linear_layers(model: nn.Module) -> int:
    """Turn every :class:`PackedLinear` of ``model`` back into ``nn.Linear``; return how many."""
    restored = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                setattr(parent, name, child.to_linear())
                restored += 1
    return restored
