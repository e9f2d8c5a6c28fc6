"""Private: LoRA-FAIR's flat-cosine problem reduced to two unknowns per layer.

Notation (one layer; batched over a leading ``L`` everywhere). The corrected factor ``P`` (d × r)
is ``B̄`` (``residual_on="B"``) or ``Āᵀ`` (``"A"``), the fixed one ``Q`` (r × e) is ``Ā`` or
``B̄ᵀ``, and ``ΔW`` (d × e) the ideal update (transposed for ``"A"``). The problem is

    min_P'  f(P') = 1 − <P'Q, ΔW> / (‖ΔW‖ ‖P'Q‖) + λ R(‖P' − P‖²),   R(ρ²) = ρ or ρ².

With ``G = QQᵀ = V diag(g) Vᵀ``, ``H = ΔW Qᵀ`` and the columns ``c_i, h_i, b_i`` of
``P'V, HV, PV``: ``s = <P'Q, ΔW> = Σ <c_i, h_i>``, ``n² = ‖P'Q‖² = Σ g_i ‖c_i‖²`` and
``ρ² = Σ ‖c_i − b_i‖²``. Setting the gradient to zero,

    c_i (μ + κ g_i) = α h_i + μ b_i,   α = 1/(w n),  κ = s/(w n³),  μ = λ/ρ (fro) or 2λ (fro²),

so every stationary point with ``ρ, n > 0`` is ``c_i = (a h_i + b_i) / (1 + k g_i)`` for two
scalars ``a = α/μ > 0`` and ``k = κ/μ``. At a local minimum the curvature along a direction
orthogonal to ``h_i`` and ``b_i`` (one exists when ``d ≥ 3``) is ``μ (1 + k g_i) ≥ 0``, so
``k ≥ −1/max g``. The minimiser is therefore found among

    a = σ e^{θ₁},  k g_i = (e^{θ₂} − 1) ĝ_i,  ĝ_i = g_i / max g,  θ ∈ ℝ²,

and ``s``, ``n²``, ``ρ²`` are sums over ``i`` of rational functions of ``(a, k g_i)`` whose only
data are the per-column Gram numbers ``hh_i = ‖h_i‖²``, ``hb_i = <h_i, b_i>``, ``bb_i = ‖b_i‖²``
and ``g_i``: an O(r) evaluation, with closed-form gradient and Hessian in θ. The answer is
certified afterwards: a point of the family is stationary for the full problem exactly when
``a μ = α`` and ``k μ = κ`` (then every ``∇_{c_i} f`` vanishes); a layer that fails (or has
``d < 3``) is handed back to the general ``r × 3`` solver in :mod:`lorafair._solve`.
The residual comes out as ``ΔP = H V diag(x) Vᵀ − P V diag(y) Vᵀ`` with ``x_i = a/(1 + k g_i)``,
``y_i = k g_i/(1 + k g_i)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lorafair._solve import Batched, Norm

_TINY = 1e-300


class Reduced(NamedTuple):
    """Per-layer data of the reduced flat problem (float64, ``L`` layers, rank ``r``)."""

    g: Tensor  # (L, r) eigenvalues of G, tiny ones zeroed
    V: Tensor  # (L, r, r) eigenvectors of G
    hh: Tensor  # (L, r) ‖h_i‖² (0 where g_i = 0)
    hb: Tensor  # (L, r) <h_i, b_i> (0 where g_i = 0)
    bb: Tensor  # (L, r) ‖b_i‖²
    w: Tensor  # (L,) ‖ΔW‖_F


def eig_basis(G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``g, V, null`` of the PSD ``G`` (L, r, r): eigenvalues at most ``r·1e-13·max g`` zeroed."""
    g, V = torch.linalg.eigh(G)
    scale = g.abs().amax(dim=-1, keepdim=True)
    null = g <= scale * (g.shape[-1] * 1e-13)
    return torch.where(null, torch.zeros_like(g), g), V, null


def reduced_from_columns(G: Tensor, H: Tensor, P: Tensor, w: Tensor) -> Reduced:
    """From explicit ``G`` (L, r, r), ``H`` and ``P`` (L, d, r): O(L d r²), accurate to ε."""
    g, V, null = eig_basis(G)
    Hv = H @ V
    Pv = P @ V
    hh = (Hv * Hv).sum(dim=-2)
    hb = (Hv * Pv).sum(dim=-2)
    bb = (Pv * Pv).sum(dim=-2)
    zero = torch.zeros_like(hh)
    return Reduced(g, V, torch.where(null, zero, hh), torch.where(null, zero, hb), bb, w)


def reduced_from_grams(G: Tensor, HH: Tensor, HP: Tensor, PP: Tensor, w: Tensor) -> Reduced:
    """From the r × r Grams ``HᵀH``, ``HᵀP``, ``PᵀP``: O(L r³) (error ~ ε of their entries)."""
    g, V, null = eig_basis(G)

    def diag(M: Tensor) -> Tensor:
        return ((M @ V) * V).sum(dim=-2)

    hh = torch.clamp(diag(HH), min=0.0)
    hb = diag(HP)
    bb = torch.clamp(diag(PP), min=0.0)
    zero = torch.zeros_like(hh)
    return Reduced(g, V, torch.where(null, zero, hh), torch.where(null, zero, hb), bb, w)


def _reg(p: Tensor, lam: float, norm: Norm) -> tuple[Tensor, Tensor, Tensor]:
    """``R(p)``, ``R'(p)``, ``R''(p)`` of ``λ√p`` or ``λp`` (derivatives 0 where ``p ≤ 1e-300``)."""
    if norm == "fro_squared":
        return lam * p, torch.full_like(p, lam), torch.zeros_like(p)
    big = p > _TINY
    root = torch.sqrt(torch.clamp(p, min=_TINY))
    zero = torch.zeros_like(p)
    r1 = torch.where(big, lam / (2.0 * root), zero)
    r2 = torch.where(big, -lam / (4.0 * root * root * root), zero)
    return lam * torch.where(big, root, zero), r1, r2


class _Sums(NamedTuple):
    s: Tensor
    q: Tensor
    p: Tensor
    grads: tuple[Tensor, Tensor, Tensor] | None  # each (..., 2)
    hessians: tuple[Tensor, Tensor, Tensor] | None  # each (..., 2, 2)


def _sums(theta: Tensor, data: tuple[Tensor, ...], order: int) -> _Sums:
    """``s, n², ρ²`` at ``θ`` (…, 2) and, for ``order`` ≥ 1/2, their θ-gradients/Hessians.

    ``data = (hh, hb, bb, g, sigma, nu_s)``: (…, r) ×4 and (…,) ×2; ``a = σ e^{θ₁}``,
    ``k = a ν_s θ₂``. Per column, with ``t = k g_i``, ``u = 1/(1 + t)``,
    ``e = a²hh + 2a hb + bb`` and ``m = a²hh − 2at hb + t²bb``: ``s_i = u (a hh + hb)``,
    ``q_i = g u² e``, ``p_i = u² m``. Derivatives in ``(a, t)`` by hand, then the chain rule
    with ``∂a/∂θ₁ = a``, ``∂t/∂θ₁ = t``, ``∂t/∂θ₂ = τ = a ν_s g_i`` (``∂²t/∂θ₁∂θ₂ = τ``,
    ``∂²t/∂θ₂² = 0``).
    """
    hh, hb, bb, g, sigma, nu_s = data
    a = (sigma * torch.exp(theta[..., 0])).unsqueeze(-1)
    tau = (a * nu_s.unsqueeze(-1)) * g
    t = tau * theta[..., 1].unsqueeze(-1)
    u = 1.0 / (1.0 + t)
    u = torch.where(u > 0, u, torch.full_like(u, float("nan")))  # outside the family: 1 + t <= 0
    u2 = u * u
    lin = a * hh + hb
    e = a * lin + a * hb + bb
    m = a * (a * hh - 2.0 * t * hb) + t * t * bb
    s_i = u * lin
    q_i = g * u2 * e
    p_i = u2 * m
    s, q, p = s_i.sum(-1), q_i.sum(-1), p_i.sum(-1)
    if order == 0:
        return _Sums(s, q, p, None, None)
    u3 = u2 * u
    e_a = 2.0 * lin
    m_a = 2.0 * (a * hh - t * hb)
    m_t = 2.0 * (t * bb - a * hb)
    # (∂a, ∂t) of each column term
    s_a, s_t = u * hh, -u2 * lin
    q_a, q_t = g * u2 * e_a, -2.0 * g * u3 * e
    p_a, p_t = u2 * m_a, -2.0 * u3 * m + u2 * m_t
    firsts = ((s_a, s_t), (q_a, q_t), (p_a, p_t))
    grads = tuple(
        torch.stack([(a * xa + t * xt).sum(-1), (tau * xt).sum(-1)], dim=-1) for xa, xt in firsts
    )
    if order == 1:
        return _Sums(s, q, p, grads, None)  # type: ignore[arg-type]
    u4 = u2 * u2
    s_aa, s_at, s_tt = torch.zeros_like(u), -u2 * hh, 2.0 * u3 * lin
    q_aa, q_at, q_tt = 2.0 * g * u2 * hh, -2.0 * g * u3 * e_a, 6.0 * g * u4 * e
    p_aa = 2.0 * u2 * hh
    p_at = -2.0 * u3 * m_a - 2.0 * u2 * hb
    p_tt = 6.0 * u4 * m - 4.0 * u3 * m_t + 2.0 * u2 * bb
    hessians = []
    for (xa, xt), xaa, xat, xtt in zip(
        firsts, (s_aa, q_aa, p_aa), (s_at, q_at, p_at), (s_tt, q_tt, p_tt), strict=True
    ):
        h11 = (a * a * xaa + 2.0 * a * t * xat + t * t * xtt + a * xa + t * xt).sum(-1)
        h12 = (tau * (a * xat + t * xtt + xt)).sum(-1)
        h22 = (tau * tau * xtt).sum(-1)
        hessians.append(torch.stack([torch.stack([h11, h12], -1), torch.stack([h12, h22], -1)], -2))
    return _Sums(s, q, p, grads, tuple(hessians))  # type: ignore[arg-type]


def _cos_parts(s: Tensor, q: Tensor, w: Tensor) -> tuple[Tensor, ...]:
    """``φ = −s/(w√q)`` and its partials ``φ_s, φ_q, φ_sq, φ_qq`` (all 0 where ``w q = 0``)."""
    ok = (w > 0) & (q > _TINY)
    qs = torch.where(ok, q, torch.ones_like(q))
    ws = torch.where(ok, w, torch.ones_like(w))
    root = torch.sqrt(qs)
    zero = torch.zeros_like(q)
    phi = torch.where(ok, -s / (ws * root), zero)
    phi_s = torch.where(ok, -1.0 / (ws * root), zero)
    phi_q = torch.where(ok, s / (2.0 * ws * qs * root), zero)
    phi_sq = torch.where(ok, 1.0 / (2.0 * ws * qs * root), zero)
    phi_qq = torch.where(ok, -3.0 * s / (4.0 * ws * qs * qs * root), zero)
    return phi, phi_s, phi_q, phi_sq, phi_qq


def _family_value(x: Tensor, data: tuple[Tensor, ...], lam: float, norm: Norm) -> Tensor:
    """``F`` at ``x`` (…, 2); ``data`` broadcast to ``x``'s leading dimensions."""
    sm = _sums(x, data[:6], 0)
    return 1.0 + _cos_parts(sm.s, sm.q, data[6])[0] + _reg(sm.p, lam, norm)[0]


def _family_derivatives(
    x: Tensor, data: tuple[Tensor, ...], lam: float, norm: Norm
) -> tuple[Tensor, Tensor, Tensor]:
    """``(F, ∇F, ∇²F)`` at ``x`` (L, 2): (L,), (L, 2), (L, 2, 2)."""
    sm = _sums(x, data[:6], 2)
    phi, phi_s, phi_q, phi_sq, phi_qq = _cos_parts(sm.s, sm.q, data[6])
    reg, r1, r2 = _reg(sm.p, lam, norm)
    assert sm.grads is not None
    assert sm.hessians is not None
    gs, gq, gp = sm.grads
    hs, hq, hp = sm.hessians

    def outer(u: Tensor, v: Tensor) -> Tensor:
        return u.unsqueeze(-1) * v.unsqueeze(-2)

    grad = phi_s[:, None] * gs + phi_q[:, None] * gq + r1[:, None] * gp
    hess = (
        phi_s[:, None, None] * hs
        + phi_q[:, None, None] * hq
        + r1[:, None, None] * hp
        + phi_sq[:, None, None] * (outer(gs, gq) + outer(gq, gs))
        + phi_qq[:, None, None] * outer(gq, gq)
        + r2[:, None, None] * outer(gp, gp)
    )
    return 1.0 + phi + reg, grad, hess


def family_objective(lam: float, norm: Norm) -> Batched:
    """``F(θ) = f(c(θ)) = 1 − s/(w n) + λ R(ρ²)`` on the two-parameter family, closed forms.

    Data ``(hh, hb, bb, g, sigma, nu_s, w)``: (L, r) ×4, (L,) ×3. Chain rule through
    ``φ(s, q) = −s/(w√q)`` and ``R(p)``: ``∇F = φ_s ∇s + φ_q ∇q + R' ∇p`` and
    ``∇²F = φ_s ∇²s + φ_q ∇²q + R' ∇²p + φ_sq (∇s∇qᵀ + ∇q∇sᵀ) + φ_qq ∇q∇qᵀ + R'' ∇p∇pᵀ``.
    Cost O(r) per point.
    """

    def values(x: Tensor, *data: Tensor) -> Tensor:
        return _family_value(x, tuple(t.unsqueeze(1) for t in data), lam, norm)

    def value_and_grad(x: Tensor, *data: Tensor) -> tuple[Tensor, Tensor]:
        f, g, _ = _family_derivatives(x, data, lam, norm)
        return f, g

    def hessian(x: Tensor, *data: Tensor) -> Tensor:
        return _family_derivatives(x, data, lam, norm)[2]

    return Batched(values, value_and_grad, hessian)


_STEPS = 0.3 ** torch.arange(10.0)


def newton(
    data: tuple[Tensor, ...],
    x0: Tensor,
    *,
    lam: float,
    norm: Norm,
    tol: float,
    max_iter: int,
    sync_every: int = 5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Damped Newton on ``F`` for every layer at once from ``x0`` (L, 2): ``(x, iters, done)``.

    Direction ``−|∇²F|⁻¹ ∇F`` (eigenvalues made positive, bounded below); the longest of the
    steps ``0.3^j`` (j < 10) meeting Armijo's condition, all tried in one batched evaluation
    (else the best one that lowers ``F``). A layer is done when ``∇²F`` is positive definite
    and the decrement ``∇Fᵀ|∇²F|⁻¹∇F ≤ tol (1 + |F|)``, or when no step lowers ``F`` (float64
    resolution). ``done.all()`` is read every iteration on CPU, every ``sync_every`` elsewhere.
    """
    n_layers = x0.shape[0]
    dev = x0.device
    every = 1 if dev.type == "cpu" else sync_every
    steps = _STEPS.to(dev, x0.dtype)
    cand_data = tuple(t.unsqueeze(1) for t in data)
    x = x0
    done = torch.zeros(n_layers, dtype=torch.bool, device=dev)
    iters = torch.zeros(n_layers, dtype=torch.int64, device=dev)
    for it in range(max_iter):
        f, g, hess = _family_derivatives(x, data, lam, norm)
        hess = torch.where(torch.isfinite(hess), hess, torch.zeros_like(hess))
        evals, evecs = torch.linalg.eigh(hess)
        floor = evals.abs().amax(dim=-1, keepdim=True) * 1e-12 + 1e-300
        coef = (evecs.mT @ g.unsqueeze(-1)).squeeze(-1) / torch.clamp(evals.abs(), min=floor)
        d = -(evecs @ coef.unsqueeze(-1)).squeeze(-1)
        gd = (g * d).sum(-1)
        pd = (evals > floor).all(dim=-1)
        done = done | (pd & (-gd <= tol * (1.0 + f.abs())))
        xc = x.unsqueeze(1) + steps[:, None] * d.unsqueeze(1)
        fc = _family_value(xc, cand_data, lam, norm)
        fc = torch.where(torch.isfinite(fc), fc, torch.full_like(fc, float("inf")))
        armijo = fc <= f[:, None] + 1e-4 * steps * gd[:, None]
        first = torch.argmax(armijo.to(torch.int8), dim=1)
        pick = torch.where(armijo.any(dim=1), first, torch.argmin(fc, dim=1))
        f_pick = fc.gather(1, pick[:, None]).squeeze(1)
        move = (f_pick < f) & ~done
        x = torch.where(move[:, None], x + steps[pick][:, None] * d, x)
        iters = iters + (~done).to(torch.int64)
        done = done | ~move
        if (it + 1) % every == 0 and bool(done.all()):
            break
    return x, iters, done


def terms(x: Tensor, y: Tensor, red: Reduced) -> tuple[Tensor, Tensor]:
    """``(cos, ρ²)`` of ``ΔP = H V diag(x) Vᵀ − P V diag(y) Vᵀ`` (cos 0 where a side is 0).

    ``c_i = x_i h_i + (1 − y_i) b_i``, so ``s = Σ x hh + (1 − y) hb``,
    ``n² = Σ g (x² hh + 2x(1 − y) hb + (1 − y)² bb)``, ``ρ² = Σ x² hh − 2xy hb + y² bb``.
    """
    z = 1.0 - y
    s = (x * red.hh + z * red.hb).sum(-1)
    n_sq = (red.g * (x * x * red.hh + 2.0 * x * z * red.hb + z * z * red.bb)).sum(-1)
    rho_sq = (x * x * red.hh - 2.0 * x * y * red.hb + y * y * red.bb).sum(-1)
    ok = (red.w > 0) & (n_sq > 0)
    den = torch.where(ok, red.w * torch.sqrt(torch.where(ok, n_sq, torch.ones_like(n_sq))), 1.0)
    cos = torch.where(ok, s / den, torch.zeros_like(s))
    return cos, torch.clamp(rho_sq, min=0.0)


def objective(x: Tensor, y: Tensor, red: Reduced, lam: float, norm: Norm) -> tuple[Tensor, Tensor]:
    """``(f, cos)`` at ``(x, y)``: ``f = 1 − cos + λ R(ρ²)``."""
    cos, rho_sq = terms(x, y, red)
    return 1.0 - cos + _reg(rho_sq, lam, norm)[0], cos


def lam0(red: Reduced) -> tuple[Tensor, Tensor]:
    """The λ = 0 maximiser closest to ``P``: ``c_i = τ h_i/g_i`` (``g_i > 0``), else ``c_i = b_i``.

    Every such ``c`` with ``τ > 0`` reaches the bound ``‖ΔW Q⁺Q‖ / ‖ΔW‖``; the closest to ``P`` has
    ``τ = Σ hb_i/g_i / Σ hh_i/g_i²`` (``τ = 1``, the least-squares fit, where that is ``≤ 0``).
    ``H = 0`` (no ``P'`` has a non-zero cosine): ``ΔP = 0``.
    """
    pos = red.g > 0
    gi = torch.where(pos, 1.0 / torch.where(pos, red.g, torch.ones_like(red.g)), 0.0)
    zz = (red.hh * gi * gi).sum(-1)
    zb = (red.hb * gi).sum(-1)
    has = zz > 0
    tau = torch.where(has, zb / torch.where(has, zz, torch.ones_like(zz)), 0.0)
    tau = torch.where(tau > 0, tau, torch.ones_like(tau))
    x = torch.where(has[:, None], tau[:, None] * gi, 0.0)
    y = torch.where(has[:, None] & pos, 1.0, 0.0).to(x.dtype)
    return x, y


class Solution(NamedTuple):
    """``(x, y)`` per layer (``ΔP`` as in :func:`terms`) and how they were found."""

    x: Tensor  # (L, r)
    y: Tensor  # (L, r)
    objective: Tensor  # (L,)
    cosine: Tensor  # (L,)
    iterations: Tensor  # (L,) int64
    converged: Tensor  # (L,) bool
    certified: Tensor  # (L,) bool: stationary for the full problem (or closed form, or ΔP = 0)


_GRID_A = torch.arange(-24.0, 25.0, 2.0)
_GRID_K = torch.tensor([-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0])
_GRID_COS = torch.tensor([0.9, 0.97, 0.99, 0.997, 1.0, 1.003, 1.01, 1.03, 1.1])
_TIE = 1e-14  # the family must beat ΔP = 0 by more than this
_GAIN = 1e-12
_ZERO_GAIN = 1e-13
_INNER_TOL = 1e-13  # two unknowns: Newton to float64 resolution costs an iteration or two


def solve(
    red: Reduced, wide: Tensor, *, lam: float, norm: Norm, tol: float, max_iter: int, single: bool
) -> Solution:
    """Minimise ``f`` for every layer of ``red`` at once (see the module docstring).

    One client: ``ΔP = 0`` (FedIT is exact). ``λ = 0``: :func:`lam0`. Otherwise the family
    objective is evaluated on a fixed log-grid of ``θ`` (25 × 19 points, ``e^{±24}`` in ``a/σ``),
    then damped Newton (:func:`newton`) runs from the best grid point;
    ``ΔP = 0`` is returned unless beaten by more than 1e-14. ``wide`` (L,) bool: ``d ≥ 3``, where
    the family provably holds every local minimum; other layers are never certified.
    Cost O(L r) per point.
    """
    n_layers = red.g.shape[0]
    dev, dt = red.g.device, red.g.dtype
    zeros = torch.zeros_like(red.g)
    zero_it = torch.zeros(n_layers, dtype=torch.int64, device=dev)
    yes = torch.ones(n_layers, dtype=torch.bool, device=dev)
    if single:
        f, cos = objective(zeros, zeros, red, lam, norm)
        return Solution(zeros, zeros, f, cos, zero_it, yes, yes)
    if lam == 0.0:
        x, y = lam0(red)
        f, cos = objective(x, y, red, lam, norm)
        return Solution(x, y, f, cos, zero_it, yes, yes)
    gmax = red.g.amax(dim=-1)
    gmax = torch.where(gmax > 0, gmax, torch.ones_like(gmax))
    sig_h = red.hh.sum(-1).sqrt()
    sig_b = red.bb.sum(-1).sqrt()
    one = torch.ones_like(gmax)
    sigma = torch.where(sig_h > 0, sig_b / torch.where(sig_h > 0, sig_h, one), 1.0 / gmax)
    sigma = torch.where(sigma > 0, sigma, 1.0 / gmax)
    n_ref = (red.g * red.bb).sum(-1).sqrt()
    n_ref = torch.where(n_ref > 0, n_ref, sig_h / gmax.sqrt())
    n_ref = torch.where(n_ref > 0, n_ref, one)
    nu_s = torch.where(red.w > 0, red.w, one) / n_ref
    data = (red.hh, red.hb, red.bb, red.g, sigma, nu_s, red.w)
    # θ₂ = ν/ν_s equals cos(ΔW, P'Q)·n_ref/n at a stationary point, and θ₂ = cos₀ (FedIT's
    # cosine) makes the family leave ΔP = 0 along ∇cos, so the grid is refined around cos₀.
    cos0 = objective(zeros, zeros, red, lam, norm)[1]
    k_vals = torch.cat(
        [_GRID_K.to(dev, dt).expand(n_layers, -1), cos0[:, None] * _GRID_COS.to(dev, dt)], dim=1
    )
    a_vals = _GRID_A.to(dev, dt)
    grid = torch.stack(
        [
            a_vals.repeat_interleave(k_vals.shape[1]).expand(n_layers, -1),
            k_vals.repeat(1, a_vals.shape[0]),
        ],
        dim=-1,
    )
    fg = _family_value(grid, tuple(t.unsqueeze(1) for t in data), lam, norm)
    fg = torch.where(torch.isfinite(fg), fg, torch.full_like(fg, float("inf")))
    theta0 = grid[torch.arange(n_layers, device=dev), torch.argmin(fg, dim=1)]
    theta, iters, conv = newton(
        data, theta0, lam=lam, norm=norm, tol=min(tol, _INNER_TOL), max_iter=max_iter
    )
    a = sigma * torch.exp(theta[:, 0])
    k = a * nu_s * theta[:, 1]
    t = k[:, None] * red.g
    u = 1.0 / (1.0 + t)
    x = torch.where(red.g > 0, a[:, None] * u, 0.0)  # null columns: h_i = 0 and c_i = b_i
    y = t * u
    f, cos = objective(x, y, red, lam, norm)
    f0, cos0 = objective(zeros, zeros, red, lam, norm)
    zero = ~(f < f0 - _TIE)
    # Certificate: the full problem's gradient per column is ∇_i = (μ + κ g_i) c_i − α h_i − μ b_i
    # (α = 1/(w n), κ = s/(w n³), μ = λ/ρ or 2λ; zero exactly on the family's stationary points).
    # Accept when the curvature μ + κ g_i off the family is positive and the Newton gain
    # Σ ‖∇_i‖² / (2 (μ + κ g_i)) of that diagonal model is below float64 resolution of f.
    z = 1.0 - y
    s = (x * red.hh + z * red.hb).sum(-1)
    n_sq = (red.g * (x * x * red.hh + 2.0 * x * z * red.hb + z * z * red.bb)).sum(-1)
    rho_sq = (x * x * red.hh - 2.0 * x * y * red.hb + y * y * red.bb).sum(-1)
    if norm == "fro_squared":
        mu = torch.full_like(rho_sq, 2.0 * lam)
    else:
        mu = lam / torch.sqrt(torch.clamp(rho_sq, min=_TINY))
    wn = red.w * torch.sqrt(torch.clamp(n_sq, min=_TINY))
    alpha = 1.0 / wn
    kappa = s / (wn * n_sq.clamp(min=_TINY))
    curv = mu[:, None] + kappa[:, None] * red.g
    gx = curv * x - alpha[:, None]
    gz = curv * z - mu[:, None]
    grad_i = gx * gx * red.hh + 2.0 * gx * gz * red.hb + gz * gz * red.bb
    gain = (grad_i / (2.0 * curv)).sum(-1)
    good = (
        (curv > 0).all(dim=-1)
        & (gain <= _GAIN * (1.0 + f.abs()))
        & (rho_sq > 0)
        & (n_sq > 0)
        & (red.w > 0)
        & wide
    )
    # ΔP = 0 is a (strict) local minimum for "fro" when ‖∇cos‖ < λ there; H = 0: cos ≡ 0.
    s0 = red.hb.sum(-1)
    q0 = (red.g * red.bb).sum(-1)
    wn0 = red.w * torch.sqrt(torch.clamp(q0, min=_TINY))
    al0 = 1.0 / wn0
    ka0 = s0 / (wn0 * q0.clamp(min=_TINY))
    al0, ka0 = al0[:, None], ka0[:, None] * red.g
    grad_sq = (al0 * al0 * red.hh - 2.0 * al0 * ka0 * red.hb + ka0 * ka0 * red.bb).sum(-1)
    # "fro_squared": ΔP = 0 is within ‖∇cos‖²/(4λ) (the quadratic model's gain) of optimal.
    flat0 = red.hh.sum(-1) == 0
    near = grad_sq < lam * lam if norm == "fro" else grad_sq <= 4.0 * lam * _ZERO_GAIN
    zero_ok = flat0 | (red.w == 0) | ((q0 > 0) & near)
    certified = torch.where(zero, zero_ok, good)
    keep = zero[:, None]
    x = torch.where(keep, zeros, x)
    y = torch.where(keep, zeros, y)
    f = torch.where(zero, f0, f)
    cos = torch.where(zero, cos0, cos)
    return Solution(x, y, f, cos, iters, conv, certified)
