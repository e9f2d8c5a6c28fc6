"""Exceptions raised on bad input. All derive from :class:`LoRAFairError`, a ``ValueError``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "AdapterFolderError",
    "AdapterFormatError",
    "DeviceMismatchError",
    "DtypeMismatchError",
    "DtypeOverflowError",
    "EmptyClientsError",
    "FrozenAMismatchError",
    "FrozenBMismatchError",
    "FrozenFactorMismatchError",
    "InvalidWeightsError",
    "LayerKeyError",
    "LoRAFairError",
    "LoRAShapeError",
    "NonFiniteError",
]


class LoRAFairError(ValueError):
    """Base class of every error lorafair raises on bad input."""


class AdapterFormatError(LoRAFairError):
    """A client's adapter is not laid out as ``layer -> (A, B)``: e.g. a raw peft state dict."""


class EmptyClientsError(LoRAFairError):
    """No clients, or clients with no layers."""


class LayerKeyError(LoRAFairError):
    """Clients (or an aggregated result) do not have the same layer names."""


class LoRAShapeError(LoRAFairError):
    """A factor has the wrong number of dimensions, or shapes disagree within or across clients."""


class NonFiniteError(LoRAFairError):
    """A factor holds NaN or Inf."""


class InvalidWeightsError(LoRAFairError):
    """Client weights are negative, non-finite, all zero, or of the wrong length."""


class DeviceMismatchError(LoRAFairError):
    """Factors of one layer live on different devices."""


class DtypeMismatchError(LoRAFairError):
    """Factors of one layer have different dtypes, or a dtype that is not floating point."""


class FrozenFactorMismatchError(LoRAFairError):
    """A method that needs one factor frozen and shared was given clients whose copies differ."""


class FrozenAMismatchError(FrozenFactorMismatchError):
    """FFA-LoRA was given clients whose ``A`` factors differ (``A`` must be frozen and shared)."""


class FrozenBMismatchError(FrozenFactorMismatchError):
    """A method freezing ``B`` (RoLoRA's A-rounds) was given clients whose ``B`` factors differ."""


class AdapterFolderError(LoRAFairError):
    """A peft adapter folder is missing, unreadable, inconsistent with its config, unsupported
    (DoRA, embedding LoRA, LoRA biases), or cannot be written (a non-empty output folder)."""


class DtypeOverflowError(LoRAFairError):
    """A result does not fit the output dtype: a factor holds a value beyond its largest finite.

    Raised for finite input only when the method's documented factorisation fixes the scale of
    the factor (e.g. FedSVD's ``B' = UΣ`` beside an orthonormal ``A'``): the message names the
    layer, the factor, the value (from the same computation in float64) and the dtype, and
    suggests aggregating in float32. ``layer``, ``factor``, ``value`` (``None`` if the float64
    recomputation failed) and ``dtype`` are kept as attributes.
    """

    def __init__(
        self, message: str, *, layer: str, factor: str, value: float | None, dtype: torch.dtype
    ) -> None:
        super().__init__(message)
        self.layer = layer
        self.factor = factor
        self.value = value
        self.dtype = dtype
