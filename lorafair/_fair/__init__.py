"""Private: the LoRA-FAIR solver, one module per problem.

- :mod:`._api`: the entry points :func:`lora_fair`, :func:`solve_residual` (and both from one
  solve, :func:`lora_fair_solved`).
- :mod:`._batch`: the same-shape batch: stacks, Grams, ``P_u @ coef``, the corrected factor and
  how the output dtype rounds it.
- :mod:`._flat`: the flat cosine: reduce, solve, certify, the general ``r × 3`` solver, and the
  pool that picks among the family's candidates and that solver's answer.
- :mod:`._family`: the flat problem's two-unknown family (objective, grid, certificate, the
  λ = 0 end), solved on the CPU: the family's candidates.
- :mod:`._columns`: the column cosine's solve (basis, starts, multi-start, λ = 0 end, mix);
  :mod:`._column_objective` its objective and rounding-safety check; :mod:`._dropped` its
  restricted problems where product columns vanish.
- :mod:`._newton`: the one batched damped Newton / L-BFGS (:func:`~._newton.minimise`) with its
  line search, and the regulariser's derivatives.
- :mod:`._pool`: the one candidate pool of both forms and its scorer (``ΔB = 0`` kept unless
  beaten).
- :mod:`._options`: the options (``_Options``, checked once at the entry points).
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
