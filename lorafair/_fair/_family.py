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
with closed-form gradient and Hessian in θ. These tiny problems are solved on the CPU in
float64 (one transfer each way) by :func:`~lorafair._fair._newton.minimise`. The answer is
certified afterwards from the full problem's
gradient ``∇_{c_i} f = (μ + κ g_i) c_i − α h_i − μ b_i``, which vanishes on the family exactly
when ``a μ = α`` and ``k μ = κ``. :func:`solve` is a candidate generator: it returns the
family's point and the λ = 0 end's points (:class:`Points`, unscored, with what the
scorer needs: the data, the certificate, the end's infimum) for the flat form's one scorer,
:class:`~lorafair._fair._flat._FlatScorer`, which scores them (objective plus what rounding the
output can cost them, :func:`turn_cost`); a layer where neither ``ΔP = 0`` nor a certified
family point wins is handed to the general ``r × 3`` solver in :mod:`lorafair._fair._flat`.
A candidate is ``(x, y)`` (per layer ``2 r`` numbers), the residual
``ΔP = H V diag(x) Vᵀ − P V diag(y) Vᵀ`` (on the family ``x_i = a/(1 + k g_i)``,
``y_i = k g_i/(1 + k g_i)``).
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import torch
from torch import Tensor

from lorafair._fair import _tolerances as _tol
from lorafair._fair._batch import turning
from lorafair._fair._cosine import cosine
from lorafair._fair._newton import Batched, minimise, reg_terms
from lorafair._fair._options import Norm


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


_F64 = torch.float64


# ---------------------------------------------------------------- the family objective in θ
#
# With moments m(j, l, x) = Σ_i u_i^j ĝ_i^l x_i (u = 1/(1 + k ĝ), ĝ = g / max g, x one of
# hh, hb, bb), s, n²/max g and ρ² are polynomials in (a, k) with moment coefficients. Terms
# (coef, i, j_k, i_c, j, l, x) stand for coef · a^i k^{j_k} c^{i_c} · m(j, l, x) (c = kscale).
_Term = tuple[float, int, int, int, int, int, int]
_BASE: tuple[tuple[_Term, ...], ...] = (
    ((1.0, 1, 0, 0, 1, 0, 0), (1.0, 0, 0, 0, 1, 0, 1)),  # s = a S₁ + S₀
    ((1.0, 2, 0, 0, 2, 1, 0), (2.0, 1, 0, 0, 2, 1, 1), (1.0, 0, 0, 0, 2, 1, 2)),  # n²/max g
    ((1.0, 2, 0, 0, 2, 0, 0), (-2.0, 1, 1, 0, 2, 1, 1), (1.0, 0, 2, 0, 2, 2, 2)),  # ρ²
)


def _d1(terms: list[_Term]) -> list[_Term]:
    """``∂/∂θ₁``: ``∂a/∂θ₁ = a``, ``∂k/∂θ₁ = k`` and ``∂m(j, l, x)/∂k = −j m(j + 1, l + 1, x)``
    (``du/dk = −ĝ u²``)."""
    out = [(c * (i + jk), i, jk, ic, j, l, x) for c, i, jk, ic, j, l, x in terms if i + jk > 0]
    return out + [(-c * j, i, jk + 1, ic, j + 1, l + 1, x) for c, i, jk, ic, j, l, x in terms]


def _d2(terms: list[_Term]) -> list[_Term]:
    """``∂/∂θ₂``: ``∂a/∂θ₂ = 0``, ``∂k/∂θ₂ = a c``."""
    out = [(c * jk, i + 1, jk - 1, ic + 1, j, l, x) for c, i, jk, ic, j, l, x in terms if jk > 0]
    return out + [(-c * j, i + 1, jk, ic + 1, j + 1, l + 1, x) for c, i, jk, ic, j, l, x in terms]


class _Table(NamedTuple):
    """The terms of ``(s, n²/max g, ρ²)`` and of their first and second derivatives in ``θ``
    (outputs ``o·3 + q``, ``o`` in value, θ₁, θ₂, θ₁θ₁, θ₁θ₂, θ₂θ₂), built once from
    :data:`_BASE` by differentiating its terms (:func:`_d1`, :func:`_d2`)."""

    coef: Tensor  # (T,)
    powers: Tensor  # (T, 3): 5·0 + (power of a), 5·1 + (of k), 5·2 + (of c)
    moment: Tensor  # (T,) (j − 1)·15 + 3 l + x
    sums: Tensor  # (T, outputs) 0/1: which output each term adds to
    q: Tensor  # (outputs,) the outputs of n² (times max g)


@cache
def _table(orders: int) -> _Table:
    rows: list[tuple[int, _Term]] = []
    for q, base in enumerate(_BASE):
        b = list(base)
        every = (b, _d1(b), _d2(b), _d1(_d1(b)), _d2(_d1(b)), _d2(_d2(b)))[:orders]
        rows += [(o * 3 + q, term) for o, terms in enumerate(every) for term in terms]
    cols = list(zip(*(term for _, term in rows), strict=True))
    sums = torch.zeros(len(rows), 3 * orders, dtype=_F64)
    sums[torch.arange(len(rows)), torch.tensor([o for o, _ in rows])] = 1.0
    i, jk, ic, j, l, x = (torch.tensor(col, dtype=torch.int64) for col in cols[1:])
    powers = torch.stack([i, 5 + jk, 10 + ic], dim=-1)
    is_q = torch.arange(3 * orders) % 3 == 1
    return _Table(torch.tensor(cols[0], dtype=_F64), powers, (j - 1) * 15 + 3 * l + x, sums, is_q)


class FamilyData(NamedTuple):
    """The family objective's data per layer (float64, on the CPU; see :func:`_solve_host`):
    ``D`` (L, r, 15) the moments' table ``ĝ^l x`` (``ĝ = g / max g``, ``x`` ∈ {hh, hb, bb});
    ``gh`` (L, r) ``ĝ``; ``sigma`` (L,) the scale of ``a``; ``kscale`` (L,) that of ``k``;
    ``gmax`` (L,) ``max g``; ``w`` (L,) ``‖ΔW‖``. Unpacks as :func:`family_objective`'s data."""

    D: Tensor
    gh: Tensor
    sigma: Tensor
    kscale: Tensor
    gmax: Tensor
    w: Tensor


def _polynomials(theta: Tensor, data: FamilyData, orders: int) -> Tensor:
    """``(s, n², ρ²)`` and, for ``orders = 6``, their θ-derivatives (…, 3·orders) at ``θ``
    (L, S, 2); ``D`` (L, r, 15) holds ``ĝ^l x``. One (S·j × r)(r × 15) product per layer for
    the moments, then every term of :func:`_table` in one product."""
    D, gh, sigma, kscale, gmax, _ = data
    a = sigma[:, None] * torch.exp(theta[..., 0])
    k = a * kscale[:, None] * theta[..., 1]
    u = 1.0 / (1.0 + k.unsqueeze(-1) * gh.unsqueeze(1))
    powers = 4 if orders > 1 else 2
    W = u.unsqueeze(-2).expand(*u.shape[:-1], powers, u.shape[-1]).cumprod(dim=-2)
    n_layers, n_pts = k.shape
    M = (W.reshape(n_layers, n_pts * powers, -1) @ D).reshape(n_layers, n_pts, 15 * powers)
    tab = _table(orders)
    base = torch.stack([a, k, kscale[:, None].expand_as(a)], dim=-1)  # (L, S, 3)
    pw = base.unsqueeze(-1).expand(*base.shape, 4).cumprod(-1)  # powers 1..4
    pw = torch.cat([torch.ones_like(pw[..., :1]), pw], dim=-1).flatten(-2)  # (L, S, 15)
    # index_select, not advanced indexing: the same gather at a fraction of its CPU overhead
    picked = pw.index_select(-1, tab.powers.flatten())
    mono = picked.reshape(*pw.shape[:-1], *tab.powers.shape).prod(-1)
    out = (tab.coef * mono * M.index_select(-1, tab.moment)) @ tab.sums
    return out * torch.where(tab.q, gmax[:, None, None], 1.0)


_VALUE_COLUMNS = torch.tensor([0, 1, 0, 3, 4, 5, 8])
"""Columns ``3 l + x`` of ``D`` that :data:`_BASE` reads: ``S₁, S₀`` (against ``u``), ``P₂,
Q₂, Q₁, Q₀, P₀`` (against ``u²``)."""


def _base_values(theta: Tensor, data: FamilyData) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(s, n², ρ²)`` (L, S) at ``θ`` (L, S, 2): :data:`_BASE` written out, from the seven
    moments it reads (one (2S × r)(r × 7) product per layer); what the line search and the grid
    evaluate. ``s = a S₁ + S₀``, ``n² = max g (a² Q₂ + 2a Q₁ + Q₀)``,
    ``ρ² = a² P₂ − 2ak Q₁ + k² P₀``, and whether ``θ`` is in the family (every ``u_i > 0``)."""
    D, gh, sigma, kscale, gmax, _ = data
    a = sigma[:, None] * torch.exp(theta[..., 0])
    k = a * kscale[:, None] * theta[..., 1]
    u = 1.0 / (1.0 + k.unsqueeze(-1) * gh.unsqueeze(1))
    n_layers, n_pts = k.shape
    U = torch.stack([u, u * u], dim=-2).reshape(n_layers, 2 * n_pts, -1)
    M = (U @ D.index_select(-1, _VALUE_COLUMNS.to(D.device))).reshape(n_layers, n_pts, 14)
    S1, S0, P2, Q2, Q1, Q0, P0 = (M[..., c] for c in (0, 1, 9, 10, 11, 12, 13))
    s = a * S1 + S0
    q = gmax[:, None] * (a * (a * Q2 + 2.0 * Q1) + Q0)
    return s, q, a * (a * P2 - 2.0 * k * Q1) + k * k * P0, (u > 0).all(-1)


def _cos_parts(s: Tensor, q: Tensor, w: Tensor) -> tuple[Tensor, ...]:
    """``φ = −s/(w√q)`` (the cosine, :func:`~lorafair._fair._cosine.cosine` by the reciprocal
    ``1/(w√q)`` it shares with the partials) and its partials ``φ_s, φ_q, φ_sq, φ_qq`` (all 0
    where ``w = 0`` or ``q ≤ TINY``)."""
    c = cosine(s, w, q, defined=w > 0, small="zero_tiny", form="inverse")
    qs = torch.where(c.ok, q, 1.0)
    inv = c.inverse()  # 1/(w√q)
    phi_sq = 0.5 * inv / qs
    return -c.cos, -inv, s * phi_sq, phi_sq, -0.75 * s * inv / (qs * qs)


def family_objective(lam: float, norm: Norm) -> Batched:
    """``F(θ) = f(c(θ)) = 1 − s/(w n) + λ R(ρ²)`` as a :class:`~lorafair._fair._newton.Batched`
    over :class:`FamilyData` (see :func:`_solve_host`); ``+inf`` outside
    the family (some ``1 + k ĝ_i ≤ 0``). ``s``, ``n²``, ``ρ²`` and their θ-derivatives come from
    :func:`_polynomials`, then the chain rule through ``φ(s, q) = −s/(w√q)`` and ``R(p)``:
    ``∇F = φ_s ∇s + φ_q ∇q + R' ∇p``, ``∇²F = Σ (φ_s, φ_q, R') ∇²(s, q, p) + Jᵀ W J`` with
    ``J = ∇(s, q, p)`` and ``W = [[0, φ_sq, 0], [φ_sq, φ_qq, 0], [0, 0, R'']]``. O(r) per point.
    CPU data only: :func:`solve` moves the family's few numbers per layer to the host, and the
    term table (:func:`_table`) is a cached CPU tensor.
    """

    def values(x: Tensor, *tensors: Tensor) -> Tensor:
        data = FamilyData(*tensors)
        s, q, p, inside = _base_values(x, data)
        f = 1.0 + _cos_parts(s, q, data.w[:, None])[0] + reg_terms(p, lam, norm)[0]
        return torch.where(inside, f, torch.inf)

    def derivatives(x: Tensor, *tensors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        data = FamilyData(*tensors)
        T = _polynomials(x[:, None], data, 6)[:, 0]  # (L, 18)
        phi, phi_s, phi_q, phi_sq, phi_qq = _cos_parts(T[:, 0], T[:, 1], data.w)
        reg, r1, r2 = reg_terms(T[:, 2], lam, norm)
        coef = torch.stack([phi_s, phi_q, r1], dim=-1)  # (L, 3)
        J = T[:, 3:9].reshape(-1, 2, 3).mT  # (L, 3, 2)
        h = (T[:, 9:].reshape(-1, 3, 3) * coef[:, None, :]).sum(-1)
        h = torch.stack([h[:, 0], h[:, 1], h[:, 1], h[:, 2]], dim=-1)
        zero = torch.zeros_like(phi)
        Wm = torch.stack([zero, phi_sq, zero, phi_sq, phi_qq, zero, zero, zero, r2], -1)
        hess = h.reshape(-1, 2, 2) + J.mT @ Wm.reshape(-1, 3, 3) @ J
        return 1.0 + phi + reg, (coef[..., None] * J).sum(1), hess

    def value_and_grad(x: Tensor, *data: Tensor) -> tuple[Tensor, Tensor]:
        return derivatives(x, *data)[:2]

    def hessian(x: Tensor, *data: Tensor) -> Tensor:
        return derivatives(x, *data)[2]

    return Batched(values, value_and_grad, hessian, with_hessian=derivatives)


# ---------------------------------------------------------------- closed forms and the end
def point_terms(
    x: Tensor, y: Tensor, g: Tensor, hh: Tensor, hb: Tensor, bb: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, n², ρ²)`` of ``ΔP = H V diag(x) Vᵀ − P V diag(y) Vᵀ``: with ``c_i = x_i h_i +
    (1 − y_i) b_i``, ``s = Σ x hh + (1 − y) hb``, ``n² = Σ g (x² hh + 2x(1 − y) hb + (1 − y)² bb)``,
    ``ρ² = Σ x² hh − 2xy hb + y² bb``."""
    z = 1.0 - y
    s = (x * hh + z * hb).sum(-1)
    n_sq = (g * (x * x * hh + 2.0 * x * z * hb + z * z * bb)).sum(-1)
    rho_sq = torch.clamp((x * x * hh - 2.0 * x * y * hb + y * y * bb).sum(-1), min=0.0)
    return s, n_sq, rho_sq


def point_objective(
    s: Tensor, n_sq: Tensor, rho_sq: Tensor, w: Tensor, lam: float, norm: Norm
) -> tuple[Tensor, Tensor]:
    """``(f, cos)`` with ``cos = s/(w n)`` (0 where a side is 0), ``f = 1 − cos + λ R(ρ²)``."""
    cos = cosine(s, w, n_sq, defined=w > 0, small="zero").cos
    return 1.0 - cos + reg_terms(rho_sq, lam, norm)[0], cos


class Ray(NamedTuple):
    """The λ = 0 ray ``P' = P (I − Q Q⁺) + t Z`` (``t > 0``), whose every point reaches the bound
    ``‖ΔW Q⁺Q‖ / ‖ΔW‖``: ``Z V`` has columns ``z_i = h_i/g_i`` (``g_i > 0``; 0 elsewhere). ``gi``
    (L, r) ``g⁺``; ``zz`` (L,) ``‖z‖²``; ``zb`` (L,) ``<z, P V> = Σ hb_i/g_i``; ``has`` (L,)
    ``zz > 0`` (else ``H = 0``: no ``P'`` has a non-zero cosine)."""

    gi: Tensor
    zz: Tensor
    zb: Tensor
    has: Tensor


def ray(g: Tensor, hh: Tensor, hb: Tensor) -> Ray:
    """The λ = 0 :class:`Ray` from the family's data (for :func:`_lam0` and :func:`_end`)."""
    pos = g > 0
    gi = torch.where(pos, 1.0 / torch.where(pos, g, 1.0), 0.0)
    zz = (hh * gi * gi).sum(-1)
    return Ray(gi, zz, (hb * gi).sum(-1), zz > 0)


def closest_scale(zz: Tensor, zb: Tensor) -> Tensor:
    """``τ = <z, P>/‖z‖²``: the point ``τ z`` of a λ = 0 ray closest to ``P``, where ``τ > 0``;
    where not (no closest point on the open ray, or ``z = 0``) ``τ = 1``, the least-squares fit.
    The one rule of both reductions (:func:`_lam0` here, ``flat_lam0`` of the ``r × 3`` one)."""
    t = torch.where(zz > 0, zb / torch.where(zz > 0, zz, 1.0), 0.0)
    return torch.where(t > 0, t, 1.0)


def turn_cost(n_sq: Tensor, g: Tensor, bb: Tensor, eps: Tensor, noise: Tensor) -> Tensor:
    """``½ u²``, ``u = (ε ‖P‖ + noise) √max g / n``: the angle by which rounding ``P'`` (or
    ``ΔP``) as computed and returned can turn a product of norm ``n``, squared: what that costs
    its cosine (the rounding model :func:`~lorafair._fair._batch.turning`, for the whole
    product). ``g``, ``bb`` (L, r); ``eps``, ``noise`` (L,) (see :class:`Host`); ``n_sq`` (L,) or
    (L, S)."""
    u_sq = (eps * torch.sqrt(bb.sum(-1)) + noise) ** 2 * g.amax(-1)
    return 0.5 * turning(u_sq if n_sq.ndim == 1 else u_sq[:, None], n_sq)


class Host(NamedTuple):
    """The family's problem on the host (CPU, float64), per layer: ``g``, ``hh``, ``hb``, ``bb``
    (L, r) and ``w`` (L,) of :class:`Reduced`, and the output's rounding ``eps``, ``noise`` (L,)
    (see :func:`turn_cost`)."""

    g: Tensor
    hh: Tensor
    hb: Tensor
    bb: Tensor
    w: Tensor
    eps: Tensor
    noise: Tensor


class Points(NamedTuple):
    """Candidate points for the flat form's scorer, on the host: ``ΔP = H V diag(x) Vᵀ −
    P V diag(y) Vᵀ`` with ``x`` (L, S, r) and ``y`` (L, S, r), or (L, 1, r) for one ``y`` per
    layer; ``iterations``, ``converged`` (L,) of the run that made them; ``valid`` (L, S) where a
    point stands (None: every point); ``charged``: whether the scorer adds what rounding the
    output can cost them (:func:`turn_cost`; the closed forms are exact and are not charged)."""

    x: Tensor
    y: Tensor
    iterations: Tensor
    converged: Tensor
    valid: Tensor | None
    charged: bool


class End(NamedTuple):
    """The λ = 0 end (:func:`_end`): its ``points`` and the infimum ``floor`` they approach, which
    is the objective of its first point (``t = τ``) where the ray points towards ``P``
    (``toward`` (L,)); ``limit`` (L,), approached as ``t → 0⁺``, where the ray exists (``has``
    (L,)) but points away; that of ``ΔP = 0`` where it does not."""

    points: Points
    toward: Tensor
    has: Tensor
    limit: Tensor


def _end(g: Tensor, hh: Tensor, hb: Tensor, bb: Tensor, w: Tensor, lam: float, norm: Norm) -> End:
    """The λ = 0 end of the trade-off: points ``c_i = t h_i/g_i`` (``g_i > 0``), ``c_i = b_i``
    elsewhere, i.e. ``P' = P (I − Q Q⁺) + t Z`` with ``Z`` the λ = 0 direction (``‖Z‖ = ‖z‖``),
    for ``t = τ`` (where the ray points towards ``P``, ``Σ hb_i/g_i > 0``: its best point) and
    for ``‖t z‖ = s ‖P‖`` (``s ‖z‖`` if ``P = 0``), ``s`` of ``_tol.FAMILY_END_STEPS``.

    Where the ray points towards ``P``, the floor is ``f(τ)``. Otherwise the infimum
    ``limit = 1 − cos_max + λ R(‖P Q⁺Q‖²)`` is only approached as ``t → 0⁺`` (the product
    vanishes), where no stationary point lies; the scorer charges each point what rounding
    ``P'`` or ``ΔP`` can cost it (:func:`turn_cost`: it turns the vanishing product and so
    lowers its cosine), so the pool takes the point the output can hold. ``H = 0``: no valid
    points, the floor is ``f(ΔP = 0)``. Closed forms: reported with 0 iterations, converged.
    """
    pos = g > 0
    gi, zz, zb, has = ray(g, hh, hb)
    zz1 = torch.where(has, zz, 1.0)
    toward = has & (zb > 0)
    p_norm = torch.sqrt(bb.sum(-1))
    ref = torch.where(p_norm > 0, p_norm / torch.sqrt(zz1), 1.0)  # t at which ‖t z‖ = ‖P‖ (or ‖z‖)
    steps = torch.tensor(_tol.FAMILY_END_STEPS, dtype=_F64)
    t = torch.cat([torch.where(toward, zb / zz1, 1.0)[:, None], ref[:, None] * steps], dim=1)
    x = t[..., None] * gi[:, None, :]
    y = torch.where(pos & has[:, None], 1.0, 0.0)[:, None, :]
    valid = has[:, None] & torch.cat(
        [toward[:, None], torch.ones_like(t[:, 1:], dtype=torch.bool)], 1
    )
    cos_max = torch.where(
        has & (w > 0), torch.sqrt((hh * gi).sum(-1)) / torch.where(w > 0, w, 1.0), 0.0
    )
    limit = 1.0 - cos_max + reg_terms(torch.where(pos, bb, 0.0).sum(-1), lam, norm)[0]
    it = torch.zeros(g.shape[0], dtype=torch.int64)
    return End(Points(x, y, it, it == 0, valid, charged=True), toward, has, limit)


def _lam0(g: Tensor, hh: Tensor, hb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The λ = 0 maximiser closest to ``P``: ``c_i = τ h_i/g_i`` (``g_i > 0``), else ``c_i = b_i``.

    Every such ``c`` with ``τ > 0`` reaches the bound ``‖ΔW Q⁺Q‖ / ‖ΔW‖``; the closest to ``P`` has
    ``τ = Σ hb_i/g_i / Σ hh_i/g_i²`` (``τ = 1``, the least-squares fit, where that is ``≤ 0``).
    ``H = 0`` (no ``P'`` has a non-zero cosine): ``ΔP = 0`` and ``τ = 0``. Returns ``(x, y, τ)``.
    """
    gi, zz, zb, has = ray(g, hh, hb)
    tau = torch.where(has, closest_scale(zz, zb), 0.0)
    x = tau[:, None] * gi
    y = torch.where(has[:, None] & (g > 0), 1.0, 0.0)
    return x, y, tau


# ---------------------------------------------------------------- the solve
class FamilyCandidates(NamedTuple):
    """The family's candidates for the flat form's scorer, per layer, on the host, unscored.

    ``problem``: the data they are scored on; ``found``: the family's Newton result (one point
    per layer, in order; closed form for λ = 0 and one client, then not charged); ``good`` (L,):
    that point certified stationary for the full problem (``d ≥ 3`` only); ``zero_ok`` (L,):
    ``ΔP = 0`` shown optimal; ``end``: the λ = 0 end (:func:`_end`; None for the closed forms,
    which are exact: the floor is their objective).
    """

    problem: Host
    found: Points
    good: Tensor
    zero_ok: Tensor
    end: End | None


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
) -> FamilyCandidates:
    """The family's candidates for every layer of ``red`` at once (see the module docstring).

    The reduced problems hold ``4r + 1`` numbers per layer, so they are solved on the CPU (one
    transfer each way, no per-iteration device sync, no kernel-launch latency). One client:
    only ``ΔP = 0`` (FedIT is exact). ``λ = 0``: closed form (:func:`_lam0`). Otherwise the
    family objective is evaluated on a fixed grid of ``θ`` (14 values of ``log(a/σ)`` over
    ``±26`` by 17 of ``θ₂``, five of them around FedIT's cosine and five around the λ = 0 end),
    :func:`~lorafair._fair._newton.minimise` takes ``SCOUT`` steps from each of the
    ``FAMILY_STARTS`` best grid points and goes on to convergence from the best of them.
    ``wide`` (L,) bool: ``d ≥ 3``, where the family provably holds every local minimum; other
    layers are never certified. ``eps``, ``noise`` (L,): each layer's output rounding (for
    :func:`turn_cost`). The candidates stay on the host, unscored: the flat form's scorer
    scores them there. Cost O(L r) per point.
    """
    host = Host(
        *(t.detach().to("cpu", _F64) for t in (red.g, red.hh, red.hb, red.bb, red.w, eps, noise))
    )
    with torch.inference_mode():  # ~0.1 of the solve: tiny tensors, per-op overhead dominates
        return _solve_host(
            host, wide.cpu(), lam=lam, norm=norm, tol=tol, max_iter=max_iter, single=single
        )


def _solve_host(
    host: Host,
    wide: Tensor,
    *,
    lam: float,
    norm: Norm,
    tol: float,
    max_iter: int,
    single: bool,
) -> FamilyCandidates:
    g, hh, hb, bb, w, _, _ = host
    n_layers = g.shape[0]
    zeros = torch.zeros_like(g)
    yes = torch.ones(n_layers, dtype=torch.bool)
    if single or lam == 0.0:
        x, y, _ = (zeros, zeros, None) if single else _lam0(g, hh, hb)
        zero_it = torch.zeros(n_layers, dtype=torch.int64)
        found = Points(x[:, None], y[:, None], zero_it, yes, None, charged=False)
        return FamilyCandidates(host, found, yes, yes, None)
    cos0 = point_objective(*point_terms(zeros, zeros, g, hh, hb, bb), w, lam, norm)[1]
    gmax = g.amax(-1)
    gmax = torch.where(gmax > 0, gmax, 1.0)
    gh = g / gmax[:, None]
    powers = gh[..., None] ** torch.arange(5.0, dtype=_F64)
    D = (powers[..., None] * torch.stack([hh, hb, bb], -1)[..., None, :]).reshape(n_layers, -1, 15)
    sig_h = torch.sqrt(hh.sum(-1))
    sig_b = torch.sqrt(bb.sum(-1))
    sigma = torch.where(sig_h > 0, sig_b / torch.where(sig_h > 0, sig_h, 1.0), 1.0 / gmax)
    sigma = torch.where(sigma > 0, sigma, 1.0 / gmax)
    n_ref = torch.sqrt((g * bb).sum(-1))
    n_ref = torch.where(n_ref > 0, n_ref, sig_h / torch.sqrt(gmax))
    n_ref = torch.where(n_ref > 0, n_ref, 1.0)
    w1 = torch.where(w > 0, w, 1.0)
    kscale = gmax * w1 / n_ref
    data = FamilyData(D, gh, sigma, kscale, gmax, w)
    obj = family_objective(lam, norm)
    # θ₂ equals cos(ΔW, P'Q)·n_ref/n at a stationary point. θ₂ = cos₀ (FedIT's cosine) makes the
    # family leave ΔP = 0 along ∇cos; θ₂ = n_ref/(τ w) with a → ∞ is the λ = 0 solution
    # (c_i = τ h_i/g_i). The grid refines around both, the two ends of LoRA-FAIR's trade-off.
    tau = _lam0(g, hh, hb)[2]
    k_lam0 = torch.where(tau > 0, n_ref / (torch.where(tau > 0, tau, 1.0) * w1), 1.0)
    k_vals = torch.cat(
        [
            torch.tensor(_tol.GRID_K, dtype=_F64).expand(n_layers, -1),
            cos0[:, None] * torch.tensor(_tol.GRID_COS, dtype=_F64),
            k_lam0[:, None] * torch.tensor(_tol.GRID_LAM0, dtype=_F64),
        ],
        dim=1,
    )
    n_a, n_k = len(_tol.GRID_A), k_vals.shape[1]
    grid_a = torch.tensor(_tol.GRID_A, dtype=_F64).repeat_interleave(n_k).expand(n_layers, -1)
    grid = torch.stack([grid_a, k_vals.repeat(1, n_a)], dim=-1)  # (L, n_a n_k, 2)
    fg = obj.values(grid, *data)
    # minimise from the FAMILY_STARTS best grid points of every layer, all at once, for SCOUT
    # steps; then only the best of them per layer goes on to convergence (a run never ends
    # above its start: the others are not candidates).
    m = _tol.FAMILY_STARTS
    top = torch.topk(fg, m, dim=1, largest=False, sorted=True).indices  # (L, m)
    theta0 = grid.gather(1, top[..., None].expand(-1, -1, 2)).reshape(n_layers * m, 2)
    rep = FamilyData(*(t.repeat_interleave(m, dim=0) for t in data))
    inner = min(tol, _tol.FAMILY_INNER_TOL)
    scout = minimise(obj, rep, theta0, tol=inner, max_iter=_tol.SCOUT)
    pick = torch.arange(n_layers) * m + torch.argmin(scout.f.reshape(n_layers, m), dim=1)
    run = minimise(obj, data, scout.x[pick], tol=inner, max_iter=max_iter)
    theta = run.x[:, None]
    per_start = (run.iterations + scout.iterations[pick], run.converged)
    a = sigma[:, None] * torch.exp(theta[..., 0])
    t = (a * kscale[:, None] * theta[..., 1])[..., None] * gh[:, None]
    u = 1.0 / (1.0 + t)
    x = torch.where(g[:, None] > 0, a[..., None] * u, 0.0)  # null columns: h_i = 0, c_i = b_i
    y = t * u
    found = Points(x, y, *per_start, None, charged=True)
    # the certificate reads the objective's pieces at the found point (the scorer scores it)
    g_, hh_, hb_, bb_ = (v[:, None] for v in (g, hh, hb, bb))
    s, n_sq, rho_sq = point_terms(x, y, g_, hh_, hb_, bb_)
    f = point_objective(s, n_sq, rho_sq, w[:, None], lam, norm)[0]
    # Certificate: the full problem's gradient per column is ∇_i = (μ + κ g_i) c_i − α h_i − μ b_i
    # (α = 1/(w n), κ = s/(w n³), μ = λ/ρ or 2λ; zero exactly on the family's stationary points).
    # Accept when the curvature μ + κ g_i off the family is positive and the Newton gain
    # Σ ‖∇_i‖² / (2 (μ + κ g_i)) of that diagonal model is below float64 resolution of f.
    tiny = _tol.TINY
    if norm == "fro_squared":
        mu = torch.full_like(rho_sq, 2.0 * lam)
    else:
        mu = lam / torch.sqrt(torch.clamp(rho_sq, min=tiny))
    wn = w[:, None] * torch.sqrt(torch.clamp(n_sq, min=tiny))
    kappa = s / (wn * torch.clamp(n_sq, min=tiny))
    curv = mu[..., None] + kappa[..., None] * g_
    gx = curv * x - (1.0 / wn)[..., None]
    gz = curv * (1.0 - y) - mu[..., None]
    gain = ((gx * gx * hh_ + 2.0 * gx * gz * hb_ + gz * gz * bb_) / (2.0 * curv)).sum(-1)
    good = (curv > 0).all(-1) & (gain <= _tol.CERTIFY_GAIN * (1.0 + f.abs()))
    good = good & (rho_sq > 0) & (n_sq > 0) & (w > 0)[:, None] & wide[:, None]
    # ΔP = 0 is a (strict) local minimum for "fro" when ‖∇cos‖ < λ there; "fro_squared": it is
    # within ‖∇cos‖²/(4λ) (the quadratic model's gain) of optimal; H = 0: cos ≡ 0.
    q0 = (g * bb).sum(-1)
    wn0 = w * torch.sqrt(torch.clamp(q0, min=tiny))
    al0 = (1.0 / wn0)[:, None]
    ka0 = (hb.sum(-1) / (wn0 * torch.clamp(q0, min=tiny)))[:, None] * g
    grad_sq = (al0 * al0 * hh - 2.0 * al0 * ka0 * hb + ka0 * ka0 * bb).sum(-1)
    near = grad_sq < lam * lam if norm == "fro" else grad_sq <= 4.0 * lam * _tol.ZERO_GAIN
    zero_ok = (hh.sum(-1) == 0) | (w == 0) | ((q0 > 0) & near)
    # The λ = 0 end sits at θ₂ → ∞ when its best t is at (or near) 0⁺ (the ray points away
    # from P): the family cannot get there, so its points are candidates of their own.
    end = _end(g, hh, hb, bb, w, lam, norm)
    return FamilyCandidates(host, found, good.reshape(-1), zero_ok, end)
