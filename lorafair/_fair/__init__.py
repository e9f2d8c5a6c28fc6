"""Private: the LoRA-FAIR solver, one module per problem. This docstring is its package map.

Each form (``similarity``) reads as problem → candidates → one scorer:

- **flat**: the problem is :class:`._family.Reduced` (every layer's family data, from
  :func:`._flat._flat_reduce`), solved as :class:`._family.FamilyData` by the two-unknown
  family and as :class:`._flat.FlatProblem` (``r × 3``) by the general solver. Candidates:
  :func:`._family.solve` (unscored :class:`._family.Points`: the family's Newton point and the
  λ = 0 end's points along :class:`._family.Ray`, in :class:`._family.FamilyCandidates` with
  the certificate and the end's infimum), then :func:`._flat._solve_flat_general` for the
  layers the family cannot certify. Scorer: :class:`._flat._FlatScorer` (it scores every
  candidate: objective plus the rounding cost :func:`._family.turn_cost`; the general answer
  only below the end's floor).
- **columns**: the problem is :class:`._column_objective.ColumnProblem` (tensors
  :class:`._column_objective.ColumnData`, built by :func:`._columns._setup` in a basis of at most
  ``(K + 1) r`` rows; a restricted problem is the same type with its own ``mat``, ``active``
  and regulariser offset ``c0``, so one objective serves both). Candidates (:mod:`._columns`):
  the four starts, the multi-start, the
  restricted problems where product columns vanish (:mod:`._dropped`), the column mix
  (residual on A) and the λ = 0 end. Scorer: :class:`._column_objective.ColumnScorer`
  (``offer``/``pick``: the objective, ``inf`` where the output cannot resolve it,
  :func:`._column_objective._unsafe`).

Shared: :mod:`._cosine` (the one cosine of both forms, :func:`._cosine.cosine`, whose options
name its edge cases), :mod:`._api` (entry points :func:`lora_fair`, :func:`solve_residual`,
:func:`lora_fair_solved`; ``_FORMS``, the registry of the two forms), :mod:`._options` (the
options, checked once), :mod:`._batch` (the same-shape batch: stacks, Grams, ``P_u @ coef``, the
corrected factor and how the output dtype rounds it, :func:`._batch.turning`), :mod:`._pool` (the
pool both scorers keep: per layer the lowest score, ``ΔB = 0`` kept unless beaten by ``TIE``),
:mod:`._scale` (float64 factors near its limits: the same problem on factors scaled by
powers of two), :mod:`._newton` (the one batched damped Newton / L-BFGS,
:func:`._newton.minimise`, with its line search, and the regulariser's derivatives) and
:mod:`._tolerances` (every tolerance and step ladder). ``docs/lora_fair.md`` describes the design.
"""

from lorafair._fair._api import (
    AdaptersAndSolutions,
    ResidualSolution,
    lora_fair,
    lora_fair_solved,
    solve_residual,
)

__all__ = [
    "AdaptersAndSolutions",
    "ResidualSolution",
    "lora_fair",
    "lora_fair_solved",
    "solve_residual",
]
