"""Private: the options of a LoRA-FAIR solve, checked once at the entry points.

Every module of the solver reads them from here (the lowest floor of :mod:`lorafair._fair`), so
no module below the entry points imports :mod:`._api`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from lorafair.errors import LoRAFairError

Norm = Literal["fro", "fro_squared"]

Similarity = Literal["flat", "columns"]

ResidualOn = Literal["B", "A"]


@dataclass(frozen=True)
class _Options:
    lam: float
    norm: Norm
    similarity: Similarity
    residual_on: ResidualOn
    tol: float
    max_iter: int


def _check_options(
    lam: float, norm: str, similarity: str, residual_on: str, tol: float, max_iter: int
) -> _Options:
    """The options as :class:`_Options`, or :class:`~lorafair.errors.LoRAFairError` naming the
    first bad one."""
    try:
        lam_f = float(lam)
    except (TypeError, ValueError):
        raise LoRAFairError(f"lam must be a number, got {lam!r}") from None
    if not math.isfinite(lam_f) or lam_f < 0:
        raise LoRAFairError(f"lam must be finite and >= 0, got {lam!r}")
    if norm not in get_args(Norm):
        raise LoRAFairError(f"norm must be 'fro' or 'fro_squared', got {norm!r}")
    if similarity not in get_args(Similarity):
        raise LoRAFairError(f"similarity must be 'flat' or 'columns', got {similarity!r}")
    if residual_on not in get_args(ResidualOn):
        raise LoRAFairError(f"residual_on must be 'B' or 'A', got {residual_on!r}")
    try:
        tol_f = float(tol)
    except (TypeError, ValueError):
        raise LoRAFairError(f"tol must be a number, got {tol!r}") from None
    if not math.isfinite(tol_f) or tol_f <= 0:
        raise LoRAFairError(f"tol must be finite and > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise LoRAFairError(f"max_iter must be an int >= 1, got {max_iter!r}")
    return _Options(lam_f, norm, similarity, residual_on, tol_f, max_iter)  # type: ignore[arg-type]
