"""Private: one batched damped Newton / L-BFGS with one line search, shared by both forms.

Everything here is float64, batched over a leading layer dimension ``L`` and free of host syncs
except every ``sync_every`` iterations of :func:`minimise` (every iteration on CPU). Objectives
(:class:`Batched`) come with closed-form gradients and Hessians (no autograd). The regulariser
``λ‖Δ‖`` / ``λ‖Δ‖²`` and its derivatives live here once (:func:`reg_terms`). :func:`minimise`
is the one driver: the flat family's two unknowns (on the CPU), the general ``r × 3`` flat
problem and the column form (on the layers' device).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lorafair._fair import _tolerances as _tol
from lorafair._fair._options import Norm


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt`` with a zero (not NaN) gradient at 0."""
    return torch.sqrt(torch.clamp(x, min=_tol.TINY))


def reg_terms(p: Tensor, lam: float, norm: Norm) -> tuple[Tensor, Tensor, Tensor]:
    """``R(p)``, ``R'(p)``, ``R''(p)`` of the regulariser as a function of ``p = ‖Δ‖_F²``:
    ``λ√p`` (``"fro"``; all three 0 where ``p ≤ TINY``) or ``λp`` (``"fro_squared"``).

    The one place the regulariser is differentiated (both forms, the flat family included).
    """
    if norm == "fro_squared":
        return lam * p, torch.full_like(p, lam), torch.zeros_like(p)
    big = p > _tol.TINY
    root = torch.sqrt(torch.where(big, p, 1.0))  # 1.0: no division by 0 in branches not taken
    r1 = torch.where(big, lam / (2.0 * root), 0.0)
    r2 = torch.where(big, -lam / (4.0 * root**3), 0.0)
    return lam * torch.where(big, root, 0.0), r1, r2


def regulariser(delta_sq: Tensor, lam: float, norm: Norm) -> Tensor:
    """``λ‖Δ‖_F`` (``"fro"``) or ``λ‖Δ‖_F²`` (``"fro_squared"``) from ``‖Δ‖_F²``."""
    return reg_terms(delta_sq, lam, norm)[0]


def _reg_coefs(dsq: Tensor, lam: float, norm: Norm) -> tuple[Tensor, Tensor]:
    """``(c₁, c₃)`` with ``∇ reg = c₁ d`` and ``∇² reg = c₁ diag(mask) − c₃ d dᵀ`` (``d`` the
    masked difference, ``dsq = ‖d‖²``): ``c₁ = 2R'``, ``c₃ = −4R''`` of :func:`reg_terms`."""
    _, r1, r2 = reg_terms(dsq, lam, norm)
    return 2.0 * r1, -4.0 * r2


def _reg_grad_coef(dsq: Tensor, lam: float, norm: Norm) -> Tensor:
    """``c₁`` of :func:`_reg_coefs`: ``∇ reg = c₁ d``."""
    return _reg_coefs(dsq, lam, norm)[0]


def _reg_hessian(d: Tensor, dsq: Tensor, diag: Tensor, lam: float, norm: Norm) -> Tensor:
    """Hessian of ``reg`` in ``x`` (…, N, N), ``d`` (…, N) the difference, ``diag`` its mask."""
    c1, c3 = _reg_coefs(dsq, lam, norm)
    eye = c1[..., None, None] * torch.diag_embed(diag)
    if norm == "fro_squared":
        return eye
    return eye - c3[..., None, None] * (d.unsqueeze(-1) * d.unsqueeze(-2))


class Batched(NamedTuple):
    """A batched objective: ``values(x (L, S, N), *data) -> (L, S)``; ``value_and_grad(x (L, N),
    *data) -> ((L,), (L, N))``; ``hessian(x (L, N), *data) -> (L, N, N)``. Closed forms only
    (no ``torch.func``/autograd), so no per-layer Python loop and no host sync.

    ``line(x (L, N), d (L, N), ts (S,), *data) -> (L, S)``, if given: the values at
    ``x + ts_s d``, computed more cheaply than ``values`` would (the line search's points);
    None: ``values`` at those points.

    ``features(x (L, N), *data) -> (L, …)``, if given: a product of ``x`` with the data,
    linear in ``x``, that ``value_and_grad`` (keyword ``fx``, at ``x``) and ``line`` (``fx``
    and ``fd``, at ``d``) accept instead of computing it. :func:`minimise` then forms it once
    for each search direction and carries it along its steps, ``F(x + t d) = F(x) + t F(d)``
    (rounding: one addition per step, relative ε); on the L-BFGS path only (Newton's cost is
    its Hessian's).

    ``with_hessian(x (L, N), *data)``, if given: value, gradient and Hessian in one call (where
    they share most of their work), which Newton then uses instead of ``value_and_grad`` and
    ``hessian``; on the Newton path only.
    """

    values: Callable[..., Tensor]
    value_and_grad: Callable[..., tuple[Tensor, Tensor]]
    hessian: Callable[..., Tensor]
    line: Callable[..., Tensor] | None = None
    features: Callable[..., Tensor] | None = None
    with_hessian: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None


def modified_newton(hess: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``(−|H|⁻¹ g, pd)`` per row: the Newton step with the Hessian's eigenvalues replaced by
    their absolute values, bounded below by ``EIG_FLOOR`` of the largest (and ``TINY``), and
    whether every eigenvalue is above that bound."""
    evals, evecs = torch.linalg.eigh(hess)
    floor = evals.abs().amax(dim=-1, keepdim=True) * _tol.EIG_FLOOR + _tol.TINY
    coef = (evecs.mT @ g.unsqueeze(-1)).squeeze(-1) / torch.clamp(evals.abs(), min=floor)
    return -(evecs @ coef.unsqueeze(-1)).squeeze(-1), (evals > floor).all(dim=-1)


def armijo_step(f: Tensor, gd: Tensor, fc: Tensor, ts: Tensor) -> tuple[Tensor, Tensor]:
    """The one line search's choice per row among step lengths ``ts`` (longest first), all
    tried in one batched evaluation ``fc`` (L, S) of ``f(x + t d)``: the index of the longest
    meeting Armijo's condition ``f(x + t d) ≤ f + ARMIJO·t·∇fᵀd`` (``gd = ∇fᵀd``), else of the
    lowest value; and that value (non-finite values count as +inf). No data-dependent control
    flow, so no host sync; on the tensors' device."""
    v = torch.where(torch.isfinite(fc), fc, torch.inf)
    ok = v <= f[:, None] + _tol.ARMIJO * ts[None, :] * gd[:, None]
    pick = torch.where(ok.any(1), torch.argmax(ok.to(torch.int64), 1), torch.argmin(v, 1))
    return pick, v.gather(1, pick[:, None]).squeeze(1)


def _newton_direction(hess: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Newton direction and a positive-definiteness flag per layer.

    On CPU (where reading a flag costs no device sync) a batched Cholesky serves the positive
    definite Hessians and only the others pay for an eigendecomposition; on accelerators, and
    for 2 × 2 Hessians, every layer takes the (sync-free) eigendecomposition path.
    """
    if hess.device.type != "cpu" or hess.shape[-1] <= 2:  # 2 × 2 (the family): eigh is as cheap
        return modified_newton(hess, g)
    chol, info = torch.linalg.cholesky_ex(hess)
    ok = info == 0
    d = torch.cholesky_solve(-g.unsqueeze(-1), chol).squeeze(-1)
    ok = ok & torch.isfinite(d).all(dim=-1)
    if bool(ok.all()):
        return d, ok
    bad = ~ok
    d_bad, _ = modified_newton(hess[bad], g[bad])
    d = d.clone()
    d[bad] = d_bad
    return d, ok


class Runs(NamedTuple):
    """The runs of :func:`minimise`, one per row: point ``x``, objective ``f``, ``iterations``,
    ``converged``."""

    x: Tensor
    f: Tensor
    iterations: Tensor
    converged: Tensor


def minimise(
    obj: Batched,
    data: tuple[Tensor, ...],
    x0: Tensor,
    *,
    tol: float,
    max_iter: int,
    n_steps: int = _tol.STEPS,
    shrink: float = _tol.SHRINK,
    memory: int = _tol.LBFGS_MEMORY,
    sync_every: int = _tol.SYNC_EVERY,
) -> Runs:
    """Minimise ``obj`` independently for each of the ``L`` rows of ``x0`` (L, N).

    Direction: Newton's with the exact (closed-form) Hessian, its eigenvalues replaced by
    their absolute values (bounded below), when ``N <= _tol.NEWTON_MAX_UNKNOWNS``; else L-BFGS.
    Step: ``n_steps`` lengths ``shrink**k`` tried in one batched evaluation; per layer the
    longest satisfying Armijo's condition (else the best that lowers the objective), so there
    is no data-dependent control flow and no host sync; ``converged.all()`` is read every
    ``sync_every`` iterations (every iteration on CPU, where that costs no device sync). A
    layer has converged when the Hessian is positive definite and the Newton decrement
    ``gᵀH⁻¹g`` is at most ``tol (1 + |f|)`` (L-BFGS: the step changed the objective by at most
    ``tol (1 + |f|)`` and the quasi-Newton decrement is that small), or when a step lowers the
    objective by less than ``NEGLIGIBLE · tol (1 + |f|)`` (an infimum that is only approached,
    e.g. as a product column shrinks to zero), or when no step length lowers the objective along the
    steepest-descent direction either (no float64 progress).
    Cost per iteration: Newton O(L N³) plus the Hessian; L-BFGS
    O(L N memory) plus ``n_steps + 1`` objective evaluations.
    """
    n_layers, n = x0.shape
    newton = n <= _tol.NEWTON_MAX_UNKNOWNS
    every = 1 if x0.device.type == "cpu" else sync_every  # reading a CPU flag costs no sync
    dev, dt = x0.device, x0.dtype
    x = x0.clone()
    joint = obj.with_hessian if newton else None
    h_at: Tensor | None = None  # the Hessian at x, where `joint` gave it with f and g
    lin = None if newton else obj.features  # Newton's steps are the Hessian's: nothing to save
    fx = None if lin is None else lin(x, *data)
    kw = {} if fx is None else {"fx": fx}
    if joint is None:
        f, g = obj.value_and_grad(x, *data, **kw)
    else:
        f, g, h_at = joint(x, *data)
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
            hess = obj.hessian(x, *data) if h_at is None else h_at
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
        sd_scale = (xnorm + 1.0) / torch.clamp(gnorm, min=_tol.TINY)
        steepest = use_sd | ~(gd < 0) | ~torch.isfinite(gd)
        d = torch.where(steepest[:, None], -g * sd_scale[:, None], d)
        gd = torch.where(steepest, -gnorm * gnorm * sd_scale, gd)
        bound = tol * (1.0 + f.abs())
        if newton:
            small = pd & ~steepest & (-gd <= bound)
            done = done | small
        fd = None if lin is None else lin(d, *data)
        if obj.line is None:
            fc = obj.values(x.unsqueeze(1) + ts[None, :, None] * d.unsqueeze(1), *data)
        else:
            fc = obj.line(x, d, ts, *data, **({} if fd is None else {"fx": fx, "fd": fd}))
        pick, f_pick = armijo_step(f, gd, fc, ts)
        improved = f_pick < f
        move = improved & ~done
        x_new = torch.where(move[:, None], x + ts[pick][:, None] * d, x)
        if fx is not None and fd is not None:
            shape = (-1, *([1] * (fx.ndim - 1)))
            fx = torch.where(move.reshape(shape), fx + ts[pick].reshape(shape) * fd, fx)
            kw = {"fx": fx}
        if joint is None:
            f_new, g_new = obj.value_and_grad(x_new, *data, **kw)
        else:
            f_new, g_new, h_new = joint(x_new, *data)
            assert h_at is not None
            h_at = torch.where(move[:, None, None], h_new, h_at)
        f_new = torch.where(move, f_new, f)
        g_new = torch.where(move[:, None], g_new, g)
        iters = iters + (~done).to(torch.int64)
        stalled = ~improved & steepest
        if not newton:
            small = (f - f_new <= bound) & (-gd <= bound) & ~steepest
            done = done | (move & small)
        # No minimiser (an infimum approached as the product vanishes) or float64 resolution.
        negligible = move & (f - f_new <= _tol.NEGLIGIBLE * bound)
        done = done | stalled | negligible
        use_sd = ~improved & ~steepest
        if not newton:
            s_vec = x_new - x
            y_vec = g_new - g
            sy = (s_vec * y_vec).sum(-1)
            yy = (y_vec * y_vec).sum(-1)
            ss = (s_vec * s_vec).sum(-1)
            valid = move & (sy > _tol.LBFGS_CURVATURE * torch.sqrt(yy * ss))
            S[:, head] = s_vec
            Yh[:, head] = y_vec
            rho[:, head] = torch.where(
                valid, 1.0 / torch.where(valid, sy, torch.ones_like(sy)), 0.0
            )
            gamma = torch.where(valid, sy / torch.where(valid, yy, torch.ones_like(yy)), gamma)
            head = (head + 1) % memory
            filled = min(filled + 1, memory)
        x, f, g = x_new, f_new, g_new
        if (it + 1) % every == 0 and bool(done.all()):
            break
    return Runs(x, f, iters, done)
