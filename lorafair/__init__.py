"""lorafair: exact, factored server-side aggregation for federated LoRA fine-tuning.

The whole API: the aggregators in :mod:`lorafair.aggregate`, the diagnostics in
:mod:`lorafair.metrics`, the types and errors below. Property-testing helpers live in
:mod:`lorafair.testing` (needs the ``test`` extra for its Hypothesis strategies).
"""

from lorafair.aggregate import (
    ResidualSolution,
    fedit,
    ffa_lora,
    flexlora,
    flora,
    lora_fair,
    solve_residual,
)
from lorafair.errors import (
    DeviceMismatchError,
    DtypeMismatchError,
    EmptyClientsError,
    FrozenAMismatchError,
    InvalidWeightsError,
    LayerKeyError,
    LoRAFairError,
    LoRAShapeError,
    NonFiniteError,
)
from lorafair.metrics import (
    BiasReport,
    FairReport,
    aggregation_bias,
    ideal_update,
    lora_fair_report,
)
from lorafair.types import ClientFactors, Clients, LoRAFactors, Weights

__version__ = "0.1.0"

__all__ = [
    "BiasReport",
    "ClientFactors",
    "Clients",
    "DeviceMismatchError",
    "DtypeMismatchError",
    "EmptyClientsError",
    "FairReport",
    "FrozenAMismatchError",
    "InvalidWeightsError",
    "LayerKeyError",
    "LoRAFactors",
    "LoRAFairError",
    "LoRAShapeError",
    "NonFiniteError",
    "ResidualSolution",
    "Weights",
    "__version__",
    "aggregation_bias",
    "fedit",
    "ffa_lora",
    "flexlora",
    "flora",
    "ideal_update",
    "lora_fair",
    "lora_fair_report",
    "solve_residual",
]
