"""Every tolerance and step ladder of the LoRA-FAIR solver, in one place.

Grouped by the step that uses it. Values are unchanged from the solver's validation (see
``docs/validation.md``); each says what it decides.
"""

from __future__ import annotations

# ---------------------------------------------------------------- shared by both forms
TINY = 1e-300
"""Below this a squared norm counts as zero (square roots and their derivatives are guarded)."""
TIE = 1e-14
"""A solver result must beat ΔB = 0 (FedIT) by more than this to be returned (both forms)."""
NEWTON_MAX_UNKNOWNS = 192
"""Above this many unknowns per layer, :func:`~lorafair._fair._newton.minimise` uses L-BFGS."""
STEPS = 14
"""Step lengths ``SHRINK**k`` (k < STEPS) that one line search of ``minimise`` tries at once."""
SHRINK = 0.3
"""Ratio of consecutive step lengths in every line search."""
SCOUT = 2
"""Newton steps every start of the flat family takes before only the best one per layer goes on."""
ARMIJO = 1e-4
"""Armijo's sufficient-decrease constant of every line search."""
EIG_FLOOR = 1e-12
"""Modified Newton: the Hessian's absolute eigenvalues are bounded below by this fraction of the
largest (plus ``TINY``); the Hessian counts as positive definite only where every eigenvalue is
above that bound."""
NEGLIGIBLE = 1e-3
"""A ``minimise`` step that lowers the objective by at most this fraction of ``tol (1 + |f|)``
ends that row's run (an infimum only approached, e.g. as a product column shrinks to zero)."""
LBFGS_MEMORY = 10
"""Pairs ``(s, y)`` that L-BFGS keeps."""
LBFGS_CURVATURE = 1e-12
"""L-BFGS stores a pair only where ``sᵀy > LBFGS_CURVATURE ‖s‖ ‖y‖`` (positive curvature)."""
SYNC_EVERY = 5
"""Off the CPU, ``minimise`` reads its ``converged.all()`` every this many iterations (on the
CPU every iteration: that read costs no device sync). Not a tolerance."""
LINE_CANCEL = 1e-4
"""The columns objective along a line (:func:`~lorafair._fair._column_objective.columns_objective`'s
``line``) sums quadratics in the step length; where one falls below this fraction of its
end terms (float64 cancellation costs more than 4 of its 16 digits), the layer is evaluated
exactly instead."""

# ---------------------------------------------------------------- flat: the two-unknown family
GRID_A = tuple(float(v) for v in range(-26, 27, 4))
"""Grid of ``θ₁ = log(a/σ)`` the family is first evaluated on."""
GRID_K = (-16.0, -4.0, -1.0, 0.0, 0.5, 1.0, 2.0)
"""Fixed values of ``θ₂`` on that grid."""
GRID_LAM0 = (0.5, 0.8, 1.0, 1.25, 2.0)
"""Multiples of the λ = 0 end's ``θ₂`` added to the grid."""
GRID_COS = (0.97, 0.99, 1.0, 1.01, 1.03)
"""Multiples of FedIT's cosine (the ``θ₂`` leaving ΔP = 0 along ∇cos) added to the grid."""
FAMILY_STARTS = 3
"""Best grid points per layer that Newton starts from."""
FAMILY_INNER_TOL = 1e-13
"""Newton decrement tolerance of the family (two unknowns: float64 resolution is cheap)."""
CERTIFY_GAIN = 1e-12
"""Certificate: the full problem's diagonal-Newton gain must be below this (relative to 1 + |f|)."""
ZERO_GAIN = 1e-13
"""``fro_squared``: ΔP = 0 is accepted as optimal within this quadratic-model gain."""
FAMILY_END_STEPS = tuple(10.0**-k for k in range(1, 15))
"""Distances ``‖t z‖ / ‖P‖`` of the λ = 0 end's points (candidates) along its ray."""
END_MARGIN = 1e-12
"""The general flat solver's answer is a candidate only where below the λ = 0 end's floor (the
infimum the end's points approach) by more than this (relative): one approaching the same
infimum can only get below it by rounding, and where it stops depends on where its steps fade,
not on what the output can hold."""

# ---------------------------------------------------------------- columns
CHUNK_BYTES = 1 << 21
"""On CPU the columns objective is evaluated over chunks of rows whose ``m × n`` arrays hold at
most this many bytes (cache-sized; not a tolerance: it changes results only by rounding)."""
FACTORED_ROWS = 4
"""Residual on B, the columns objective's ``Y = Z Ā`` (``Z`` p × q) is evaluated without forming
``Y`` (from ``ZᵀX`` and a QR of ``Z``) where ``p ≥ FACTORED_ROWS · q``: the elementwise work drops
from p × n to q × n per pass; on smaller bases the explicit product costs no more (not a
tolerance: it changes results only by rounding)."""
COLUMNS_END_STEPS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
"""Sizes ``‖t D‖ / ‖Z0‖`` of the λ = 0-end points that the columns solver scores."""
END_REACH = 1e-9
"""The columns λ = 0 end is re-solved from shrunken anchors where it could still win by more
than this (relative) over the plain points."""
DROP_TINY = 1e-3
"""A product column below this fraction of its rounding scale is taken as one the minimiser is
driving to zero: the columns problem is re-solved with it dropped."""
DROP_UNSAFE = 2e-10
"""Largest float64 error of the objective (estimated by ``_unsafe``) of a returned point: near a
vanishing column its cosine is sensitive to rounding; such points are not returned (their
dropped counterparts stand in for them)."""
UNSAFE_EPS = 10.0
"""The unsafe limit is also at least this many machine epsilons of the output dtype:
``max(DROP_UNSAFE, UNSAFE_EPS · ε)``."""
DROP_REMAINDER = 1e-10
"""Residual on B, dropping columns ``J``: a product column whose part outside ``span(right_J)``
is below this fraction of its norm vanishes with ``J`` (numerically a tiny remainder) and
counts 0."""
MIX_FLOOR = 1e-12
"""Residual on A, ``norm="fro"``: the column mix linearises ``λ‖D‖`` at the layer's best
candidate, ``λ‖D_j‖² / (2 max(‖D_best‖, MIX_FLOOR))``."""
DROP_STEPS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
"""Relative distances ``ε`` at which a dropped column reappears (``dropped_points``)."""
DROP_SINGLES = 64
"""Up to this many columns, dropping each single column from the best run is scored as well."""
DROP_SINGLES_SOLVE = 4
"""Of those, the best this many per layer seed restricted problems."""
EIG_NULL = 1e-13
"""Eigenvalues of ``G`` at most ``r · EIG_NULL · max g`` are zeroed (both flat reductions)."""
