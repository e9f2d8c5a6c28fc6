"""Exceptions raised on bad input. All derive from :class:`LoRAFairError`, a ``ValueError``."""

from __future__ import annotations

__all__ = [
    "AdapterFolderError",
    "AdapterFormatError",
    "DeviceMismatchError",
    "DtypeMismatchError",
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
