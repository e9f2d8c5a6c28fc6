"""lorafair: exact, factored server-side aggregation for federated LoRA fine-tuning.

The whole API: the aggregators in :mod:`lorafair.aggregate`, the diagnostics in
:mod:`lorafair.metrics`, the types and errors below. Testing helpers live in
:mod:`lorafair.testing`: ``check_aggregator`` runs lorafair's conformance suite and properties on
any aggregator (its properties and the strategies need the ``test`` extra).
"""

from lorafair.aggregate import (
    EnergyThreshold,
    ResidualSolution,
    fedex_lora,
    fedit,
    fedsa_lora,
    fedsvd,
    ffa_lora,
    flexlora,
    flexlora_report,
    flora,
    hetlora,
    hetlora_truncate,
    lora_fair,
    rolora,
    rolora_trained,
    solve_residual,
)
from lorafair.errors import (
    DeviceMismatchError,
    DtypeMismatchError,
    DtypeOverflowError,
    EmptyClientsError,
    FrozenAMismatchError,
    FrozenBMismatchError,
    FrozenFactorMismatchError,
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
from lorafair.types import (
    ClientFactors,
    Clients,
    FedExResult,
    FedSAResult,
    FlexLoRAReport,
    LoRAFactors,
    RankChoice,
    ResidualReport,
    Weights,
)

__version__ = "0.1.0"

__all__ = [
    "BiasReport",
    "ClientFactors",
    "Clients",
    "DeviceMismatchError",
    "DtypeMismatchError",
    "DtypeOverflowError",
    "EmptyClientsError",
    "EnergyThreshold",
    "FairReport",
    "FedExResult",
    "FedSAResult",
    "FlexLoRAReport",
    "FrozenAMismatchError",
    "FrozenBMismatchError",
    "FrozenFactorMismatchError",
    "InvalidWeightsError",
    "LayerKeyError",
    "LoRAFactors",
    "LoRAFairError",
    "LoRAShapeError",
    "NonFiniteError",
    "RankChoice",
    "ResidualReport",
    "ResidualSolution",
    "Weights",
    "__version__",
    "aggregation_bias",
    "fedex_lora",
    "fedit",
    "fedsa_lora",
    "fedsvd",
    "ffa_lora",
    "flexlora",
    "flexlora_report",
    "flora",
    "hetlora",
    "hetlora_truncate",
    "ideal_update",
    "lora_fair",
    "lora_fair_report",
    "rolora",
    "rolora_trained",
    "solve_residual",
]
