"""Private batched numerics of the LoRA-FAIR residual solve (see :mod:`lorafair._fair`).

Everything here is float64, batched over a leading layer dimension ``L`` and free of host
syncs except every ``sync_every`` iterations of :func:`lbfgs` (to stop early once every layer
has converged). Inputs are trusted (validated in :mod:`lorafair._fair`).

Two reduced problems, both exactly equivalent to the full ``d_out × r`` problem:

* ``flat`` similarity (:func:`flat_reduce`, :func:`flat_objective`): with ``G = ĀĀᵀ = V diag(g) Vᵀ``
  and ``H = ΔW Āᵀ`` the objective ``1 − <B', H> / (w ‖B'Ā‖) + λ R(B' − B̄)`` depends on column
  ``c_i`` of ``B'V`` only through its coordinates in an orthonormal 3-frame of
  ``span(h_i, b_i) ⊕ (one orthogonal direction)`` (``h_i``/``b_i``: columns of ``HV``/``B̄V``),
  because ``‖B'Ā‖² = Σ g_i ‖c_i‖²`` has no cross-column terms. So each layer becomes an
  ``r × 3`` problem, and layers of every shape that share ``r`` are solved in one batch.
* ``columns`` similarity (:func:`columns_objective`): the mean over the ``d_in`` columns of the
  per-column cosine; solved in the coordinates of an orthonormal basis of
  ``span(B_s, B̄) ⊕ (r orthogonal directions)`` (at most ``(K + 2) r`` rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

Norm = Literal["fro", "fro_squared"]

_TINY = 1e-300


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt`` with a zero (not NaN) gradient at 0."""
    return torch.sqrt(torch.clamp(x, min=_TINY))


def regulariser(delta_sq: Tensor, lam: float, norm: Norm) -> Tensor:
    """``λ‖Δ‖_F`` (``"fro"``) or ``λ‖Δ‖_F²`` (``"fro_squared"``) from ``‖Δ‖_F²``."""
    if norm == "fro":
        return lam * _safe_sqrt(delta_sq)
    return lam * delta_sq


class FlatProblem(NamedTuple):
    """One batch of reduced flat problems (all float64, ``L`` layers, rank ``r``).

    ``eta``/``beta`` (L, r, 3): coordinates of ``h_i``/``b_i`` in each column's frame;
    ``mask`` (L, r, 3): 1 where the frame direction exists (``d_out ≥ 3`` gives all three);
    ``g`` (L, r): eigenvalues of ``G`` (tiny ones zeroed); ``w`` (L,): ``‖ΔW‖_F``.
    ``frame`` (L, r, d, 3) and ``V`` (L, r, r) map a solution back to ``ΔB``.
    """

    eta: Tensor
    beta: Tensor
    mask: Tensor
    g: Tensor
    w: Tensor
    frame: Tensor
    V: Tensor


def flat_reduce(G: Tensor, H: Tensor, base: Tensor, w: Tensor) -> FlatProblem:
    """Reduce ``min_B' 1 − <B',H>/(w sqrt(<B'G,B'>)) + λR(B' − base)`` to ``r × 3`` coordinates.

    ``G`` (L, r, r), ``H`` and ``base`` (L, d, r), ``w`` (L,). Cost: one batched ``eigh`` of
    ``r × r``, two ``(d × r)(r × r)`` products and ``L r`` Householder QRs of ``d × 3``:
    O(L (d r² + r³)) flops and O(L d r) memory.
    """
    g, V = torch.linalg.eigh(G)
    scale = g.abs().amax(dim=-1, keepdim=True)
    small = g <= scale * (g.shape[-1] * 1e-13)
    g = torch.where(small, torch.zeros_like(g), g)
    Hv = H @ V  # columns h_i
    Bv = base @ V  # columns b_i
    Hv = torch.where(small.unsqueeze(-2), torch.zeros_like(Hv), Hv)
    n_layers, d, r = Hv.shape
    cols = torch.stack([Hv.mT, Bv.mT, torch.zeros_like(Hv.mT)], dim=-1)  # (L, r, d, 3)
    frame, R = torch.linalg.qr(cols)  # frame (L, r, d, q), R (L, r, q, 3); q = min(d, 3)
    q = frame.shape[-1]
    eta = R[..., :, 0]
    beta = R[..., :, 1]
    mask = torch.ones_like(eta)
    if q < 3:
        pad = 3 - q
        eta = torch.cat([eta, eta.new_zeros(n_layers, r, pad)], dim=-1)
        beta = torch.cat([beta, beta.new_zeros(n_layers, r, pad)], dim=-1)
        mask = torch.cat([mask, mask.new_zeros(n_layers, r, pad)], dim=-1)
        frame = torch.cat([frame, frame.new_zeros(n_layers, r, d, pad)], dim=-1)
    return FlatProblem(eta, beta, mask, g, w, frame, V)


def flat_delta(problem: FlatProblem, x: Tensor) -> Tensor:
    """``ΔB = Σ_i frame_i (x_i − β_i) v_iᵀ`` (L, d, r) from reduced coordinates ``x`` (L, r, 3)."""
    coef = (x - problem.beta) * problem.mask
    cols = torch.einsum("lidq,liq->ldi", problem.frame, coef)
    return cols @ problem.V.mT


def flat_terms(
    x: Tensor, eta: Tensor, beta: Tensor, mask: Tensor, g: Tensor, w: Tensor
) -> tuple[Tensor, Tensor]:
    """``(cos, ‖Δ‖²)`` of one layer's reduced point ``x`` (r, 3) (vmap over layers/candidates).

    ``cos = <x, η> / (w sqrt(Σ_i g_i ‖x_i‖²))``; defined as 0 where ``w = 0`` or the product
    ``B'Ā`` is zero.
    """
    xm = x * mask
    s = (xm * eta).sum()
    n_sq = ((xm * xm).sum(dim=-1) * g).sum()
    ok = (w > 0) & (n_sq > 0)
    denom = torch.where(ok, w * _safe_sqrt(n_sq), torch.ones_like(s))
    cos = torch.where(ok, s / denom, torch.zeros_like(s))
    diff = (x - beta) * mask
    return cos, (diff * diff).sum()


def flat_objective(lam: float, norm: Norm) -> Callable[..., Tensor]:
    """One layer's reduced flat objective ``f(x_flat, eta, beta, mask, g, w)`` (x_flat: 3 r)."""

    def fun(xf: Tensor, eta: Tensor, beta: Tensor, mask: Tensor, g: Tensor, w: Tensor) -> Tensor:
        cos, dsq = flat_terms(xf.reshape(eta.shape), eta, beta, mask, g, w)
        return 1.0 - cos + regulariser(dsq, lam, norm)

    return fun


def flat_lam0(problem: FlatProblem) -> Tensor:
    """The λ = 0 minimiser closest to ``B̄`` in reduced coordinates (L, r, 3).

    Every ``x`` with ``x_i = t g_i⁻¹ η_i`` (``g_i > 0``, ``t > 0``) and free ``x_i`` where
    ``g_i = 0`` maximises the cosine (it reaches ``‖ΔW Ā⁺Ā‖ / ‖ΔW‖``). Closest to ``β``: the null
    columns keep ``β_i`` and ``t = <z, β>/‖z‖²`` with ``z = g⁺η``; where that ``t ≤ 0`` (no
    closest point on the open ray) ``t = 1``, i.e. ``B'Ā`` is the least-squares fit of ``ΔW``.
    Where ``η = 0`` (``ΔW Āᵀ = 0``: every ``B'`` has cosine 0) ``x = β``.
    """
    g = problem.g.unsqueeze(-1)
    pos = g > 0
    z = torch.where(pos, problem.eta / torch.where(pos, g, torch.ones_like(g)), 0.0)
    z = z * problem.mask
    zz = (z * z).sum(dim=(-2, -1))
    zb = (z * problem.beta).sum(dim=(-2, -1))
    t = torch.where(zz > 0, zb / torch.where(zz > 0, zz, torch.ones_like(zz)), 0.0)
    t = torch.where(t > 0, t, torch.ones_like(t))
    x = torch.where(pos, t[:, None, None] * z, problem.beta)
    return torch.where((zz > 0)[:, None, None], x, problem.beta)


def columns_terms(
    Z: Tensor,
    left: Tensor | None,
    right: Tensor | None,
    X: Tensor,
    xn: Tensor,
    active: Tensor,
) -> Tensor:
    """Mean over columns ``j`` of ``<X_j, Y_j> / (xn_j ‖Y_j‖)`` with ``Y = left @ Z @ right``.

    One layer (vmap over layers/candidates): ``Z`` (p, q); ``left`` (m, p) or None (identity);
    ``right`` (q, n) or None; ``X`` (m, n) the projection of ΔW on the coordinates of ``Y``;
    ``xn`` (n,) the full column norms of ΔW; ``active`` (n,): columns whose cosine can be
    non-zero (the others count as 0). Cost per evaluation: O(m p q + m q n).
    """
    Y = Z
    if left is not None:
        Y = left @ Y
    if right is not None:
        Y = Y @ right
    inner = (Y * X).sum(dim=-2)
    ynorm = _safe_sqrt((Y * Y).sum(dim=-2))
    xs = torch.where(active, xn, torch.ones_like(xn))
    cos = torch.where(active, inner / (xs * ynorm), torch.zeros_like(inner))
    return cos.mean(dim=-1)


def columns_objective(
    lam: float, norm: Norm, shape: tuple[int, int], has_left: bool, has_right: bool
) -> Callable[..., Tensor]:
    """One layer's ``f(z_flat, X, xn, active, Z0, left?, right?)`` for the column similarity."""

    def fun(zf: Tensor, X: Tensor, xn: Tensor, active: Tensor, Z0: Tensor, *lr: Tensor) -> Tensor:
        Z = zf.reshape(shape)
        left = lr[0] if has_left else None
        right = lr[-1] if has_right else None
        cos = columns_terms(Z, left, right, X, xn, active)
        diff = Z - Z0
        return 1.0 - cos + regulariser((diff * diff).sum(), lam, norm)

    return fun


class Batched(NamedTuple):
    """A one-layer objective lifted to batches: values (L, S), value+gradient, Hessian."""

    values: Callable[..., Tensor]
    value_and_grad: Callable[..., tuple[Tensor, Tensor]]
    hessian: Callable[..., Tensor]


def batched(fun: Callable[..., Tensor], n_data: int) -> Batched:
    """Lift ``fun(x, *data)`` (one layer, x of shape (N,)) over layers and candidate points."""
    func = torch.func
    over_s = func.vmap(fun, in_dims=(0,) + (None,) * n_data)
    values = func.vmap(over_s)

    def gv(x: Tensor, *data: Tensor) -> tuple[Tensor, Tensor]:
        grad, value = func.vmap(func.grad_and_value(fun))(x, *data)
        return value, grad

    hess = func.vmap(func.jacrev(func.jacrev(fun)))  # reverse-over-reverse: no forward AD
    return Batched(values, gv, hess)


def _modified_newton(hess: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``−|H|⁻¹ g`` with ``|H|`` the Hessian's eigenvalues made positive (and bounded below)."""
    evals, evecs = torch.linalg.eigh(hess)
    floor = evals.abs().amax(dim=-1, keepdim=True) * 1e-12 + 1e-300
    pd = (evals > floor).all(dim=-1)
    coef = (evecs.mT @ g.unsqueeze(-1)).squeeze(-1) / torch.clamp(evals.abs(), min=floor)
    return -(evecs @ coef.unsqueeze(-1)).squeeze(-1), pd


def _newton_direction(hess: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Newton direction and a positive-definiteness flag per layer.

    On CPU (where reading a flag costs no device sync) a batched Cholesky serves the positive
    definite Hessians and only the others pay for an eigendecomposition; on accelerators every
    layer takes the (sync-free) eigendecomposition path.
    """
    if hess.device.type != "cpu":
        return _modified_newton(hess, g)
    chol, info = torch.linalg.cholesky_ex(hess)
    ok = info == 0
    d = torch.cholesky_solve(-g.unsqueeze(-1), chol).squeeze(-1)
    ok = ok & torch.isfinite(d).all(dim=-1)
    if bool(ok.all()):
        return d, ok
    bad = ~ok
    d_bad, _ = _modified_newton(hess[bad], g[bad])
    d = d.clone()
    d[bad] = d_bad
    return d, ok


class SolveResult(NamedTuple):
    """Per-layer result of :func:`minimise`: point, objective, iterations, convergence flag."""

    x: Tensor
    f: Tensor
    iterations: Tensor
    converged: Tensor


NEWTON_MAX_UNKNOWNS = 192
"""Above this many unknowns per layer, :func:`minimise` uses L-BFGS instead of Newton."""


def minimise(
    obj: Batched,
    data: tuple[Tensor, ...],
    x0: Tensor,
    *,
    tol: float,
    max_iter: int,
    n_steps: int = 14,
    shrink: float = 0.3,
    memory: int = 10,
    sync_every: int = 5,
) -> SolveResult:
    """Minimise ``obj`` independently for each of the ``L`` rows of ``x0`` (L, N).

    Direction: Newton's with the exact Hessian (by ``torch.func``), its eigenvalues replaced by
    their absolute values (bounded below), when ``N <= NEWTON_MAX_UNKNOWNS``; else L-BFGS.
    Step: ``n_steps`` lengths ``shrink**k`` tried in one batched evaluation; per layer the
    longest satisfying Armijo's condition (else the best that lowers the objective), so there
    is no data-dependent control flow and no host sync; ``converged.all()`` is read every
    ``sync_every`` iterations. A layer has converged when the Hessian is positive definite and
    the Newton decrement ``gᵀH⁻¹g`` is at most ``tol (1 + |f|)`` (L-BFGS: the step changed the
    objective by at most ``tol (1 + |f|)`` and the quasi-Newton decrement is that small), or
    when a step lowers the objective by less than ``1e-3 tol (1 + |f|)`` (an infimum that is
    only approached, e.g. as a product column shrinks to zero), or when no step length lowers
    the objective along the steepest-descent direction either (no float64 progress).
    Cost per iteration: Newton O(L N³) plus the Hessian; L-BFGS
    O(L N memory) plus ``n_steps + 1`` objective evaluations.
    """
    n_layers, n = x0.shape
    newton = n <= NEWTON_MAX_UNKNOWNS
    dev, dt = x0.device, x0.dtype
    x = x0.clone()
    f, g = obj.value_and_grad(x, *data)
    S = x.new_zeros(n_layers, memory, n)
    Yh = x.new_zeros(n_layers, memory, n)
    rho = x.new_zeros(n_layers, memory)
    gamma = x.new_ones(n_layers)
    filled = 0
    head = 0
    ts = shrink ** torch.arange(n_steps, device=dev, dtype=dt)
    done = torch.zeros(n_layers, dtype=torch.bool, device=dev)
    use_sd = torch.zeros(n_layers, dtype=torch.bool, device=dev) if newton else ~done
    iters = torch.zeros(n_layers, dtype=torch.int64, device=dev)
    for it in range(max_iter):
        if newton:
            hess = obj.hessian(x, *data)
            hess = 0.5 * (hess + hess.mT)
            hess = torch.where(torch.isfinite(hess), hess, torch.zeros_like(hess))
            d, pd = _newton_direction(hess, g)
        else:
            q = g.clone()
            order = [(head - 1 - j) % memory for j in range(filled)]
            alphas = []
            for j in order:
                a = rho[:, j] * (S[:, j] * q).sum(-1)
                q = q - a[:, None] * Yh[:, j]
                alphas.append(a)
            r = gamma[:, None] * q
            for j, a in zip(reversed(order), reversed(alphas), strict=True):
                b = rho[:, j] * (Yh[:, j] * r).sum(-1)
                r = r + S[:, j] * (a - b)[:, None]
            d = -r
            pd = torch.ones_like(done)
        gd = (g * d).sum(-1)
        gnorm = torch.linalg.vector_norm(g, dim=-1)
        xnorm = torch.linalg.vector_norm(x, dim=-1)
        sd_scale = (xnorm + 1.0) / torch.clamp(gnorm, min=1e-300)
        steepest = use_sd | ~(gd < 0) | ~torch.isfinite(gd)
        d = torch.where(steepest[:, None], -g * sd_scale[:, None], d)
        gd = torch.where(steepest, -gnorm * gnorm * sd_scale, gd)
        bound = tol * (1.0 + f.abs())
        if newton:
            small = pd & ~steepest & (-gd <= bound)
            done = done | small
        xc = x.unsqueeze(1) + ts[None, :, None] * d.unsqueeze(1)
        fc = obj.values(xc, *data)
        fc = torch.where(torch.isfinite(fc), fc, torch.full_like(fc, float("inf")))
        armijo = fc <= f[:, None] + 1e-4 * ts[None, :] * gd[:, None]
        first = torch.argmax(armijo.to(torch.int8), dim=1)
        pick = torch.where(armijo.any(dim=1), first, torch.argmin(fc, dim=1))
        f_pick = fc.gather(1, pick[:, None]).squeeze(1)
        improved = f_pick < f
        move = improved & ~done
        x_new = torch.where(move[:, None], x + ts[pick][:, None] * d, x)
        f_new, g_new = obj.value_and_grad(x_new, *data)
        f_new = torch.where(move, f_new, f)
        g_new = torch.where(move[:, None], g_new, g)
        iters = iters + (~done).to(torch.int64)
        stalled = ~improved & steepest
        if not newton:
            small = (f - f_new <= bound) & (-gd <= bound) & ~steepest
            done = done | (move & small)
        # No minimiser (an infimum approached as the product vanishes) or float64 resolution.
        negligible = move & (f - f_new <= 1e-3 * bound)
        done = done | stalled | negligible
        use_sd = ~improved & ~steepest
        if not newton:
            s_vec = x_new - x
            y_vec = g_new - g
            sy = (s_vec * y_vec).sum(-1)
            yy = (y_vec * y_vec).sum(-1)
            ss = (s_vec * s_vec).sum(-1)
            valid = move & (sy > 1e-12 * torch.sqrt(yy * ss))
            S[:, head] = s_vec
            Yh[:, head] = y_vec
            rho[:, head] = torch.where(
                valid, 1.0 / torch.where(valid, sy, torch.ones_like(sy)), 0.0
            )
            gamma = torch.where(valid, sy / torch.where(valid, yy, torch.ones_like(yy)), gamma)
            head = (head + 1) % memory
            filled = min(filled + 1, memory)
        x, f, g = x_new, f_new, g_new
        if (it + 1) % sync_every == 0 and bool(done.all()):
            break
    return SolveResult(x, f, iters, done)
