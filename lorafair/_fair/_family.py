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

    a = σ e^{θ₁},  k = a ν,  ν = (w / n_ref) θ₂,  θ ∈ ℝ²  (σ, n_ref: scales from the data),

(``θ₂ = cos(ΔW, P'Q)·n_ref/n`` at a stationary point), and ``s``, ``n²``, ``ρ²`` are sums over
``i`` of rational functions of ``(a, k g_i)`` whose only data are the per-column Gram numbers
``hh_i = ‖h_i‖²``, ``hb_i = <h_i, b_i>``, ``bb_i = ‖b_i‖²`` and ``g_i``: an O(r) evaluation,
with closed-form gradient and Hessian in θ. These tiny problems are solved in NumPy on the
host (one transfer each way). The answer is certified afterwards from the full problem's
gradient ``∇_{c_i} f = (μ + κ g_i) c_i − α h_i − μ b_i``, which vanishes on the family exactly
when ``a μ = α`` and ``k μ = κ``; a layer that fails (or has ``d < 3``) is handed back to the
general ``r × 3`` solver in :mod:`lorafair._fair._flat`. The residual comes out as
``ΔP = H V diag(x) Vᵀ − P V diag(y) Vᵀ`` with ``x_i = a/(1 + k g_i)``, ``y_i = k g_i/(1 + k g_i)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from lorafair._fair import _tolerances as _tol
from lorafair._fair._batch import turning
from lorafair._fair._newton import Norm, armijo_step, modified_newton, reg_terms

Arr = NDArray[np.float64]


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
    null = g <= scale * (g.shape[-1] * _tol.EIG_NULL)
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


class _Data(NamedTuple):
    """Host (NumPy, float64) data of the family problem, per layer."""

    D: Arr  # (L, r, 15): ĝ_i^l · (hh_i, hb_i, bb_i), l = 0..4, at column 3l + x
    gh: Arr  # (L, r): ĝ = g / max g ∈ [0, 1]
    sigma: Arr  # (L,): a = σ e^{θ₁}
    kscale: Arr  # (L,): k = a c θ₂ (k = k_true · max g)
    gmax: Arr  # (L,)
    w: Arr  # (L,): ‖ΔW‖


def _cos_parts(s: Arr, q: Arr, w: Arr) -> tuple[Arr, ...]:
    """``φ = −s/(w√q)`` and its partials ``φ_s, φ_q, φ_sq, φ_qq`` (all 0 where ``w q = 0``)."""
    ok = (w > 0) & (q > _tol.TINY)
    qs = np.where(ok, q, 1.0)
    ws = np.where(ok, w, 1.0)
    inv = 1.0 / (ws * np.sqrt(qs))  # 1/(w√q)
    phi = np.where(ok, -s * inv, 0.0)
    phi_s = np.where(ok, -inv, 0.0)
    phi_sq = np.where(ok, 0.5 * inv / qs, 0.0)
    phi_q = s * phi_sq
    phi_qq = np.where(ok, -0.75 * s * inv / (qs * qs), 0.0)
    return phi, phi_s, phi_q, phi_sq, phi_qq


def _weights(k: Arr, gh: Arr, n: int) -> Arr:
    """``u^j`` for ``j = 1..n`` (…, n, r), ``u = 1/(1 + k ĝ)``; NaN outside the family."""
    u = 1.0 / (1.0 + k[..., None] * gh)
    u = np.where(u > 0, u, np.nan)
    out = [u]
    for _ in range(n - 1):
        out.append(out[-1] * u)
    return np.stack(out, axis=-2)


def _sqp(theta: Arr, d: _Data) -> tuple[Arr, Arr, Arr]:
    """``s, n², ρ²`` (L, S) at ``S`` points ``θ`` (L, S, 2) per layer.

    With ``a = σ e^{θ₁}``, ``k = a c θ₂`` and moments ``Σ_i u_i^j ĝ_i^l x_i`` (one matmul):
    ``s = a S₁ + S₀``, ``n² = max g (a² Q₂ + 2a Q₁ + Q₀)``, ``ρ² = a² P₂ − 2ak Q₁ + k² P₀`` with
    ``S₁ = Σu hh``, ``S₀ = Σu hb``, ``Q₂ = Σu²ĝ hh``, ``Q₁ = Σu²ĝ hb``, ``Q₀ = Σu²ĝ bb``,
    ``P₂ = Σu² hh``, ``P₀ = Σu²ĝ² bb``.
    """
    a = d.sigma[:, None] * np.exp(theta[..., 0])
    k = a * d.kscale[:, None] * theta[..., 1]
    n_layers, n_pts = k.shape
    U = _weights(k, d.gh[:, None, :], 2).reshape(n_layers, 2 * n_pts, -1)
    M = (U @ d.D).reshape(n_layers, n_pts, 2, 15)  # one (2S × r)(r × 15) GEMM per layer
    S1, S0, P2 = M[..., 0, 0], M[..., 0, 1], M[..., 1, 0]
    Q2, Q1, Q0, P0 = M[..., 1, 3], M[..., 1, 4], M[..., 1, 5], M[..., 1, 8]
    s = a * S1 + S0
    q = d.gmax[:, None] * (a * (a * Q2 + 2.0 * Q1) + Q0)
    p = a * (a * P2 - 2.0 * k * Q1) + k * k * P0
    return s, q, p


def _sqp_derivatives(theta: Arr, d: _Data) -> tuple[Arr, Arr, Arr]:
    """``(X, ∇X, ∇²X)`` for ``X = (s, n², ρ²)`` at ``θ`` (L, 2): (L, 3), (L, 3, 2), (L, 3, 2, 2).

    ``d/dk Σ u^m ĝ^l x = −m Σ u^{m+1} ĝ^{l+1} x`` (``du/dk = −ĝ u²``), so the first and second
    k-derivatives of every moment in :func:`_sqp` are moments too (powers up to 4). In
    ``(a, k)`` the polynomials differentiate by hand; then, with ``∂a/∂θ₁ = a``, ``∂k/∂θ₁ = k``,
    ``∂k/∂θ₂ = ac`` (second derivatives ``a``, ``k``, ``ac`` and 0):
    ``X₁ = a X_a + k X_k``, ``X₂ = ac X_k``,
    ``X₁₁ = a² X_aa + 2ak X_ak + k² X_kk + X₁``, ``X₁₂ = ac (a X_ak + k X_kk + X_k)``,
    ``X₂₂ = (ac)² X_kk``.
    """
    a = d.sigma * np.exp(theta[:, 0])
    k = a * d.kscale * theta[:, 1]
    M = _weights(k, d.gh, 4) @ d.D  # (L, 4, 15)

    def m(j: int, lev: int, x: int) -> Arr:
        return M[:, j - 1, 3 * lev + x]

    S1, S1k, S1kk = m(1, 0, 0), -m(2, 1, 0), 2.0 * m(3, 2, 0)
    S0, S0k, S0kk = m(1, 0, 1), -m(2, 1, 1), 2.0 * m(3, 2, 1)
    Q2, Q2k, Q2kk = m(2, 1, 0), -2.0 * m(3, 2, 0), 6.0 * m(4, 3, 0)
    Q1, Q1k, Q1kk = m(2, 1, 1), -2.0 * m(3, 2, 1), 6.0 * m(4, 3, 1)
    Q0, Q0k, Q0kk = m(2, 1, 2), -2.0 * m(3, 2, 2), 6.0 * m(4, 3, 2)
    P2, P2k, P2kk = m(2, 0, 0), -2.0 * m(3, 1, 0), 6.0 * m(4, 2, 0)
    P0, P0k, P0kk = m(2, 2, 2), -2.0 * m(3, 3, 2), 6.0 * m(4, 4, 2)
    g = d.gmax
    X = np.stack(
        [a * S1 + S0, g * (a * (a * Q2 + 2.0 * Q1) + Q0), a * (a * P2 - 2.0 * k * Q1) + k * k * P0],
        axis=-1,
    )
    Xa = np.stack([S1, 2.0 * g * (a * Q2 + Q1), 2.0 * (a * P2 - k * Q1)], axis=-1)
    Xaa = np.stack([np.zeros_like(a), 2.0 * g * Q2, 2.0 * P2], axis=-1)
    Xk = np.stack(
        [
            a * S1k + S0k,
            g * (a * (a * Q2k + 2.0 * Q1k) + Q0k),
            a * (a * P2k - 2.0 * Q1 - 2.0 * k * Q1k) + k * (2.0 * P0 + k * P0k),
        ],
        axis=-1,
    )
    Xak = np.stack([S1k, 2.0 * g * (a * Q2k + Q1k), 2.0 * (a * P2k - Q1 - k * Q1k)], axis=-1)
    Xkk = np.stack(
        [
            a * S1kk + S0kk,
            g * (a * (a * Q2kk + 2.0 * Q1kk) + Q0kk),
            a * (a * P2kk - 4.0 * Q1k - 2.0 * k * Q1kk) + 2.0 * P0 + k * (4.0 * P0k + k * P0kk),
        ],
        axis=-1,
    )
    a_, k_, ac = a[:, None], k[:, None], (a * d.kscale)[:, None]
    X1 = a_ * Xa + k_ * Xk
    X11 = a_ * (a_ * Xaa + 2.0 * k_ * Xak) + k_ * k_ * Xkk + X1
    X12 = ac * (a_ * Xak + k_ * Xkk + Xk)
    grad = np.stack([X1, ac * Xk], axis=-1)
    hess = np.stack([X11, X12, X12, ac * ac * Xkk], axis=-1).reshape(-1, 3, 2, 2)
    return X, grad, hess


def _family_value(x: Arr, d: _Data, lam: float, norm: Norm) -> Arr:
    """``F = f(c(θ)) = 1 − s/(w n) + λ R(ρ²)`` (L, S) at ``x`` (L, S, 2); +inf outside the family
    (some ``1 + k ĝ_i ≤ 0``)."""
    s, q, p = _sqp(x, d)
    f = 1.0 + _cos_parts(s, q, d.w[:, None])[0] + reg_terms(p, lam, norm)[0]
    return np.where(np.isnan(s + q + p), np.inf, f)


def _family_derivatives(x: Arr, d: _Data, lam: float, norm: Norm) -> tuple[Arr, Arr, Arr]:
    """``(F, ∇F, ∇²F)`` at ``x`` (L, 2): (L,), (L, 2), (L, 2, 2).

    Chain rule through ``φ(s, q) = −s/(w√q)`` and ``R(p)``: ``∇F = φ_s ∇s + φ_q ∇q + R' ∇p``,
    ``∇²F = φ_s ∇²s + φ_q ∇²q + R' ∇²p + φ_sq (∇s∇qᵀ + ∇q∇sᵀ) + φ_qq ∇q∇qᵀ + R'' ∇p∇pᵀ``.
    """
    X, grad, hess = _sqp_derivatives(x, d)
    phi, phi_s, phi_q, phi_sq, phi_qq = _cos_parts(X[:, 0], X[:, 1], d.w)
    reg, r1, r2 = reg_terms(X[:, 2], lam, norm)
    coef = np.stack([phi_s, phi_q, r1], axis=-1)
    gs, gq, gp = grad[:, 0], grad[:, 1], grad[:, 2]
    g = (coef[..., None] * grad).sum(axis=1)
    sq = gs[:, :, None] * gq[:, None, :]
    h = (
        (coef[..., None, None] * hess).sum(axis=1)
        + phi_sq[:, None, None] * (sq + sq.transpose(0, 2, 1))
        + phi_qq[:, None, None] * (gq[:, :, None] * gq[:, None, :])
        + r2[:, None, None] * (gp[:, :, None] * gp[:, None, :])
    )
    return 1.0 + phi + reg, g, h


def newton(
    d: _Data, x0: Arr, *, lam: float, norm: Norm, tol: float, max_iter: int
) -> tuple[Arr, NDArray[np.int64], NDArray[np.bool_]]:
    """Damped Newton on ``F`` for every layer at once from ``x0`` (L, 2): ``(x, iters, done)``.

    Direction ``−|∇²F|⁻¹ ∇F`` (eigenvalues made positive, bounded below); the longest of the
    steps ``0.3^j`` (j < 10) meeting Armijo's condition, all tried in one batched evaluation
    (else the best one that lowers ``F``). A layer is done when ``∇²F`` is positive definite
    and the decrement ``∇Fᵀ|∇²F|⁻¹∇F ≤ tol (1 + |F|)``, or when no step lowers ``F`` (float64
    resolution).
    """
    n_layers = x0.shape[0]
    x = x0.copy()
    done = np.zeros(n_layers, dtype=bool)
    iters = np.zeros(n_layers, dtype=np.int64)
    for _ in range(max_iter):
        f, g, hess = _family_derivatives(x, d, lam, norm)
        step, pd = modified_newton(np.where(np.isfinite(hess), hess, 0.0), g)
        gd = (g * step).sum(-1)
        done |= pd & (-gd <= tol * (1.0 + np.abs(f)))
        fc = _family_value(
            x[:, None, :] + _tol.FAMILY_STEPS[:, None] * step[:, None, :], d, lam, norm
        )
        pick, f_pick = armijo_step(f, gd, fc, _tol.FAMILY_STEPS)
        move = (f_pick < f) & ~done
        x = np.where(move[:, None], x + _tol.FAMILY_STEPS[pick][:, None] * step, x)
        iters += ~done
        done |= ~move
        if done.all():
            break
    return x, iters, done


def _terms(x: Arr, y: Arr, g: Arr, hh: Arr, hb: Arr, bb: Arr) -> tuple[Arr, Arr, Arr]:
    """``(s, n², ρ²)`` of ``ΔP = H V diag(x) Vᵀ − P V diag(y) Vᵀ``: with ``c_i = x_i h_i +
    (1 − y_i) b_i``, ``s = Σ x hh + (1 − y) hb``, ``n² = Σ g (x² hh + 2x(1 − y) hb + (1 − y)² bb)``,
    ``ρ² = Σ x² hh − 2xy hb + y² bb``."""
    z = 1.0 - y
    s = (x * hh + z * hb).sum(-1)
    n_sq = (g * (x * x * hh + 2.0 * x * z * hb + z * z * bb)).sum(-1)
    rho_sq = np.maximum((x * x * hh - 2.0 * x * y * hb + y * y * bb).sum(-1), 0.0)
    return s, n_sq, rho_sq


def _objective(s: Arr, n_sq: Arr, rho_sq: Arr, w: Arr, lam: float, norm: Norm) -> tuple[Arr, Arr]:
    """``(f, cos)`` with ``cos = s/(w n)`` (0 where a side is 0), ``f = 1 − cos + λ R(ρ²)``."""
    ok = (w > 0) & (n_sq > 0)
    cos = np.where(ok, s / np.where(ok, w * np.sqrt(np.where(ok, n_sq, 1.0)), 1.0), 0.0)
    return 1.0 - cos + reg_terms(rho_sq, lam, norm)[0], cos


def _ray(g: Arr, hh: Arr) -> tuple[Arr, Arr]:
    """``(g⁺, ‖z‖²)`` of the λ = 0 direction ``z_i = h_i/g_i`` (``g_i > 0``; 0 elsewhere)."""
    pos = g > 0
    gi = np.where(pos, 1.0 / np.where(pos, g, 1.0), 0.0)
    return gi, (hh * gi * gi).sum(-1)


def _turn(n_sq: Arr, g: Arr, bb: Arr, eps: Arr, noise: Arr) -> Arr:
    """``½ u²``, ``u = (ε ‖P‖ + noise) √max g / n``: the angle by which rounding ``P'`` (or
    ``ΔP``) as computed and returned can turn a product of norm ``n``, squared: what that costs
    its cosine (the rounding model :func:`~lorafair._fair._batch.turning`, for the whole
    product). ``eps``, ``noise`` (L,) (see :func:`_end`); ``n_sq`` (L,) or (L, S)."""
    u_sq = (eps * np.sqrt(bb.sum(-1)) + noise) ** 2 * g.max(-1)
    u_sq = u_sq[:, None] if n_sq.ndim == 2 else u_sq
    out: Arr = 0.5 * turning(u_sq, n_sq)
    return out


class _End(NamedTuple):
    """The λ = 0 end of :func:`_end`: point ``(x, y)``, its objective and cosine, the infimum
    ``floor`` it approaches, and its ``cost`` (objective plus what rounding can cost it)."""

    x: Arr
    y: Arr
    objective: Arr
    cosine: Arr
    floor: Arr
    cost: Arr


def _end(
    g: Arr, hh: Arr, hb: Arr, bb: Arr, w: Arr, eps: Arr, noise: Arr, lam: float, norm: Norm
) -> _End:
    """The λ = 0 end of the trade-off: ``(x, y, f, cos, floor)`` of ``c_i = t h_i/g_i``
    (``g_i > 0``), ``c_i = b_i`` elsewhere, i.e. ``P' = P (I − Q Q⁺) + t Z`` with ``Z`` the λ = 0
    direction (``‖Z‖ = ‖z‖``).

    Where that ray points towards ``P`` (``Σ hb_i/g_i > 0``), ``t = τ``, its best point, and
    ``floor = f``. Otherwise the infimum ``floor = 1 − cos_max + λ R(‖P Q⁺Q‖²)`` is only approached
    as ``t → 0⁺`` (the product vanishes), where no stationary point lies: ``t`` is the one with
    ``‖t z‖ = s ‖P‖`` (``s ‖z‖`` if ``P = 0``), ``s`` of ``_tol.FAMILY_END_STEPS``, that minimises
    ``f(t) + _turn(n²(t))``, the second term bounding how much rounding ``P'`` or ``ΔP`` (unit
    roundoff ``eps`` of the output dtype, relative to ``‖P‖``; ``noise``: an absolute error
    floor, from float64 cancellation and the output's subnormals; both per layer) turns the
    vanishing product and so lowers its cosine. ``H = 0``: ``t = 0`` and ``floor = f``. Also
    returns that cost of the point (``f + _turn``).
    """
    pos = g > 0
    gi, zz = _ray(g, hh)
    zb = (hb * gi).sum(-1)
    has = zz > 0
    zz1 = np.where(has, zz, 1.0)
    y = np.where(pos & has[:, None], 1.0, 0.0)
    p_norm = np.sqrt(bb.sum(-1))
    ref = np.where(p_norm > 0, p_norm / np.sqrt(zz1), 1.0)  # t at which ‖t z‖ = ‖P‖ (or ‖z‖)
    t_k = ref[:, None] * _tol.FAMILY_END_STEPS  # (L, S)
    x_k = t_k[..., None] * gi[:, None, :]
    data = (g, hh, hb, bb)
    terms_k = _terms(x_k, y[:, None, :], *(a[:, None, :] for a in data))
    f_k, _ = _objective(*terms_k, w[:, None], lam, norm)
    cost = f_k + _turn(terms_k[1], g, bb, eps, noise)
    t_small = np.take_along_axis(t_k, np.argmin(cost, axis=-1)[:, None], axis=-1)[:, 0]
    toward = zb > 0
    t = np.where(has, np.where(toward, zb / zz1, t_small), 0.0)
    x = t[:, None] * gi
    terms = _terms(x, y, *data)
    f, cos = _objective(*terms, w, lam, norm)
    b_pos = np.where(pos, bb, 0.0).sum(-1)
    cos_max = np.where(has & (w > 0), np.sqrt((hh * gi).sum(-1)) / np.where(w > 0, w, 1.0), 0.0)
    limit = 1.0 - cos_max + reg_terms(b_pos, lam, norm)[0]
    cost_end = f + _turn(terms[1], g, bb, eps, noise)
    return _End(x, y, f, cos, np.where(has & ~toward, limit, f), cost_end)


def _lam0(g: Arr, hh: Arr, hb: Arr) -> tuple[Arr, Arr, Arr]:
    """The λ = 0 maximiser closest to ``P``: ``c_i = τ h_i/g_i`` (``g_i > 0``), else ``c_i = b_i``.

    Every such ``c`` with ``τ > 0`` reaches the bound ``‖ΔW Q⁺Q‖ / ‖ΔW‖``; the closest to ``P`` has
    ``τ = Σ hb_i/g_i / Σ hh_i/g_i²`` (``τ = 1``, the least-squares fit, where that is ``≤ 0``).
    ``H = 0`` (no ``P'`` has a non-zero cosine): ``ΔP = 0`` and ``τ = 0``. Returns ``(x, y, τ)``.
    """
    gi, zz = _ray(g, hh)
    zb = (hb * gi).sum(-1)
    has = zz > 0
    tau = np.where(has, zb / np.where(has, zz, 1.0), 0.0)
    tau = np.where(has, np.where(tau > 0, tau, 1.0), 0.0)
    x = tau[:, None] * gi
    y = np.where(has[:, None] & (g > 0), 1.0, 0.0)
    return x, y, tau


class Solution(NamedTuple):
    """``(x, y)`` per layer (``ΔP = H V diag(x) Vᵀ − P V diag(y) Vᵀ``) and how they were found.

    Tensors on the layers' device: ``x``, ``y`` (L, r) float64; ``objective``, ``cosine`` (L,);
    ``iterations`` (L,) int64; ``converged``, ``certified`` (L,) bool (``certified``: stationary
    for the full problem, closed form, or ``ΔP = 0`` shown optimal). ``end_x``, ``end_y``,
    ``end_objective``, ``end_cosine``, ``end_floor``: the λ = 0 end of the trade-off
    (:func:`_end`), which the caller keeps for an uncertified layer where the general solver does
    not get below ``end_floor`` (the infimum that the end point approaches).
    """

    x: Tensor
    y: Tensor
    objective: Tensor
    cosine: Tensor
    iterations: Tensor
    converged: Tensor
    certified: Tensor
    end_x: Tensor
    end_y: Tensor
    end_objective: Tensor
    end_cosine: Tensor
    end_floor: Tensor


def solve(
    red: Reduced,
    wide: Tensor,
    eps: Tensor,
    noise: Tensor,
    *,
    lam: float,
    norm: Norm,
    tol: float,
    max_iter: int,
    single: bool,
) -> Solution:
    """Minimise ``f`` for every layer of ``red`` at once (see the module docstring).

    The reduced problems hold ``4r + 1`` numbers per layer, so they are solved on the host in
    NumPy (one transfer each way, no per-iteration device sync, no kernel-launch latency).
    One client: ``ΔP = 0`` (FedIT is exact). ``λ = 0``: closed form (:func:`_lam0`).
    Otherwise the family objective is evaluated on a fixed grid of ``θ`` (14 values of
    ``log(a/σ)`` over ``±26`` by 17 of ``θ₂``, five of them around FedIT's cosine and five around
    the λ = 0 end), damped Newton (:func:`newton`) takes ``SCOUT`` steps from each of
    the ``FAMILY_STARTS`` best grid points and goes on to convergence from the best of them;
    ``ΔP = 0`` is returned unless beaten by more than ``TIE``. ``wide`` (L,) bool: ``d ≥ 3``,
    where the family provably holds every local minimum; other layers are never certified.
    ``eps``, ``noise`` (L,): each layer's output rounding (for :func:`_end`). Cost O(L r) per
    point.
    """
    dev = red.g.device

    def host(t: Tensor) -> Any:
        return t.detach().cpu().numpy()

    data = _Host(*(host(t) for t in (red.g, red.hh, red.hb, red.bb, red.w, wide, eps, noise)))
    with np.errstate(all="ignore"):
        out = _solve_host(data, lam=lam, norm=norm, tol=tol, max_iter=max_iter, single=single)

    def back(a: NDArray[np.generic]) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

    return Solution(*(back(a) for a in out))


class _Host(NamedTuple):
    """:func:`solve`'s inputs as NumPy arrays: the family data of :class:`Reduced` (less ``V``)
    and each layer's ``wide``, ``eps``, ``noise``."""

    g: Arr
    hh: Arr
    hb: Arr
    bb: Arr
    w: Arr
    wide: NDArray[np.bool_]
    eps: Arr
    noise: Arr


class _HostSolution(NamedTuple):
    """:class:`Solution` as NumPy arrays (the same fields, in the same order)."""

    x: Arr
    y: Arr
    objective: Arr
    cosine: Arr
    iterations: NDArray[np.int64]
    converged: NDArray[np.bool_]
    certified: NDArray[np.bool_]
    end_x: Arr
    end_y: Arr
    end_objective: Arr
    end_cosine: Arr
    end_floor: Arr


def _solve_host(
    data: _Host, *, lam: float, norm: Norm, tol: float, max_iter: int, single: bool
) -> _HostSolution:
    g, hh, hb, bb, w, wide, eps, noise = data
    n_layers = g.shape[0]
    zeros = np.zeros_like(g)
    zero_it = np.zeros(n_layers, dtype=np.int64)
    yes = np.ones(n_layers, dtype=bool)
    f0, cos0 = _objective(*_terms(zeros, zeros, g, hh, hb, bb), w, lam, norm)
    if single:
        return _HostSolution(zeros, zeros, f0, cos0, zero_it, yes, yes, zeros, zeros, f0, cos0, f0)
    if lam == 0.0:
        x, y, _ = _lam0(g, hh, hb)
        f, cos = _objective(*_terms(x, y, g, hh, hb, bb), w, lam, norm)
        return _HostSolution(x, y, f, cos, zero_it, yes, yes, x, y, f, cos, f)
    gmax = g.max(axis=-1)
    gmax = np.where(gmax > 0, gmax, 1.0)
    gh = g / gmax[:, None]
    D = (gh[..., None] ** np.arange(5.0))[..., None] * np.stack([hh, hb, bb], -1)[..., None, :]
    sig_h = np.sqrt(hh.sum(-1))
    sig_b = np.sqrt(bb.sum(-1))
    sigma = np.where(sig_h > 0, sig_b / np.where(sig_h > 0, sig_h, 1.0), 1.0 / gmax)
    sigma = np.where(sigma > 0, sigma, 1.0 / gmax)
    n_ref = np.sqrt((g * bb).sum(-1))
    n_ref = np.where(n_ref > 0, n_ref, sig_h / np.sqrt(gmax))
    n_ref = np.where(n_ref > 0, n_ref, 1.0)
    kscale = gmax * np.where(w > 0, w, 1.0) / n_ref
    d = _Data(D.reshape(n_layers, -1, 15), gh, sigma, kscale, gmax, w)
    # θ₂ equals cos(ΔW, P'Q)·n_ref/n at a stationary point. θ₂ = cos₀ (FedIT's cosine) makes the
    # family leave ΔP = 0 along ∇cos; θ₂ = n_ref/(τ w) with a → ∞ is the λ = 0 solution
    # (c_i = τ h_i/g_i). The grid refines around both, the two ends of LoRA-FAIR's trade-off.
    tau = _lam0(g, hh, hb)[2]
    k_lam0 = np.where(tau > 0, n_ref / (np.where(tau > 0, tau, 1.0) * np.where(w > 0, w, 1.0)), 1.0)
    k_vals = np.concatenate(
        [
            np.broadcast_to(_tol.GRID_K, (n_layers, _tol.GRID_K.size)),
            cos0[:, None] * _tol.GRID_COS,
            k_lam0[:, None] * _tol.GRID_LAM0,
        ],
        axis=1,
    )
    grid = np.stack(
        [
            np.broadcast_to(
                np.repeat(_tol.GRID_A, k_vals.shape[1]),
                (n_layers, _tol.GRID_A.size * k_vals.shape[1]),
            ),
            np.tile(k_vals, (1, _tol.GRID_A.size)),
        ],
        axis=-1,
    )
    fg = _family_value(grid, d, lam, norm)
    fg = np.where(np.isfinite(fg), fg, np.inf)
    # Newton from the FAMILY_STARTS best grid points of every layer, all at once, for
    # SCOUT steps; then only the best of them per layer goes on to convergence.
    top = np.argsort(fg, axis=1)[:, : _tol.FAMILY_STARTS]  # (L, m)
    m = top.shape[1]
    theta0 = np.take_along_axis(grid, top[..., None], axis=1).reshape(n_layers * m, 2)
    rep = _Data(*(np.repeat(t, m, axis=0) for t in d))
    inner = min(tol, _tol.FAMILY_INNER_TOL)
    ends, it_m, _ = newton(rep, theta0, lam=lam, norm=norm, tol=inner, max_iter=_tol.SCOUT)
    f_end = _family_value(ends[:, None, :], rep, lam, norm)[:, 0].reshape(n_layers, m)
    best = np.argmin(np.where(np.isfinite(f_end), f_end, np.inf), axis=1)
    pick = np.arange(n_layers) * m + best
    theta, iters, conv = newton(d, ends[pick], lam=lam, norm=norm, tol=inner, max_iter=max_iter)
    iters = iters + it_m[pick]
    a = sigma * np.exp(theta[:, 0])
    t = (a * kscale * theta[:, 1])[:, None] * gh
    u = 1.0 / (1.0 + t)
    x = np.where(g > 0, a[:, None] * u, 0.0)  # null columns: h_i = 0 and c_i = b_i
    y = t * u
    s, n_sq, rho_sq = _terms(x, y, g, hh, hb, bb)
    f, cos = _objective(s, n_sq, rho_sq, w, lam, norm)
    zero = ~(f < f0 - _tol.TIE)
    # Certificate: the full problem's gradient per column is ∇_i = (μ + κ g_i) c_i − α h_i − μ b_i
    # (α = 1/(w n), κ = s/(w n³), μ = λ/ρ or 2λ; zero exactly on the family's stationary points).
    # Accept when the curvature μ + κ g_i off the family is positive and the Newton gain
    # Σ ‖∇_i‖² / (2 (μ + κ g_i)) of that diagonal model is below float64 resolution of f.
    mu = (
        np.full_like(rho_sq, 2.0 * lam)
        if norm == "fro_squared"
        else lam / np.sqrt(np.maximum(rho_sq, _tol.TINY))
    )
    wn = w * np.sqrt(np.maximum(n_sq, _tol.TINY))
    alpha = 1.0 / wn
    kappa = s / (wn * np.maximum(n_sq, _tol.TINY))
    curv = mu[:, None] + kappa[:, None] * g
    gx = curv * x - alpha[:, None]
    gz = curv * (1.0 - y) - mu[:, None]
    grad_i = gx * gx * hh + 2.0 * gx * gz * hb + gz * gz * bb
    gain = (grad_i / (2.0 * curv)).sum(-1)
    good = (
        (curv > 0).all(axis=-1)
        & (gain <= _tol.CERTIFY_GAIN * (1.0 + np.abs(f)))
        & (rho_sq > 0)
        & (n_sq > 0)
        & (w > 0)
        & wide
    )
    # ΔP = 0 is a (strict) local minimum for "fro" when ‖∇cos‖ < λ there; "fro_squared": it is
    # within ‖∇cos‖²/(4λ) (the quadratic model's gain) of optimal; H = 0: cos ≡ 0.
    q0 = (g * bb).sum(-1)
    wn0 = w * np.sqrt(np.maximum(q0, _tol.TINY))
    al0 = (1.0 / wn0)[:, None]
    ka0 = (hb.sum(-1) / (wn0 * np.maximum(q0, _tol.TINY)))[:, None] * g
    grad_sq = (al0 * al0 * hh - 2.0 * al0 * ka0 * hb + ka0 * ka0 * bb).sum(-1)
    near = grad_sq < lam * lam if norm == "fro" else grad_sq <= 4.0 * lam * _tol.ZERO_GAIN
    zero_ok = (hh.sum(-1) == 0) | (w == 0) | ((q0 > 0) & near)
    # The λ = 0 end of the trade-off, c_i = t h_i/g_i, sits at θ₂ → ∞ when its best t is at
    # (or near) 0⁺ (the ray points away from P): the family cannot get there, so a layer where
    # that point beats the family is handed to the general solver (with the point as its floor).
    # Both sides are charged what rounding to the output dtype can cost a vanishing product
    # (_turn): the family too may creep towards that end, to a point the output cannot hold.
    end = _end(g, hh, hb, bb, w, eps, noise, lam, norm)
    cost = f + _turn(n_sq, g, bb, eps, noise)
    beaten = (_ray(g, hh)[1] > 0) & (end.cost < np.minimum(cost, f0) - _tol.TIE)
    certified = np.where(zero, zero_ok, good) & ~beaten
    x = np.where(zero[:, None], 0.0, x)
    y = np.where(zero[:, None], 0.0, y)
    f, cos = np.where(zero, f0, f), np.where(zero, cos0, cos)
    return _HostSolution(
        x, y, f, cos, iters, conv, certified, end.x, end.y, end.objective, end.cosine, end.floor
    )
