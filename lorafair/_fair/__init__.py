"""Private: the LoRA-FAIR solver, one module per problem.

- :mod:`._api`: the entry points :func:`lora_fair`, :func:`solve_residual` (and both from one
  solve, :func:`lora_fair_solved`) and their options.
- :mod:`._batch`: the same-shape batch: stacks, Grams, ``P_u @ coef``, the corrected factor and
  how the output dtype rounds it.
- :mod:`._flat`: the flat cosine: reduce, solve, certify, and the general ``r × 3`` fallback.
- :mod:`._family`: the flat problem's two-unknown family, solved on the host in NumPy.
- :mod:`._columns`: the column cosine.
- :mod:`._newton`: the batched damped Newton / L-BFGS with its line search, the regulariser's
  derivatives, and the rule that keeps ΔB = 0 unless beaten.
- :mod:`._tolerances`: every tolerance and step ladder.

``docs/lora_fair.md`` describes the design.
"""

from lorafair._fair._api import (
    FairSolved,
    ResidualSolution,
    lora_fair,
    lora_fair_solved,
    solve_residual,
)

__all__ = ["FairSolved", "ResidualSolution", "lora_fair", "lora_fair_solved", "solve_residual"]
