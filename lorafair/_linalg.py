"""Private factored linear algebra: quantities of products ``B @ A`` without forming them.

All functions take float64 tensors (callers cast) and accept leading batch dimensions.
``ΔW = B A`` has four ways to its singular triplets (:class:`FactoredSVD`): from the two R × R
Grams (:func:`gram_svd`, the cheapest), from thin QRs (:func:`qr_svd`, accurate however much the
clients cancel), densely (:func:`dense_svd`, one d_out × d_in layer, cheapest when R is large),
and, for the top few triplets only, densely with a certified eigensolver on ΔW's smaller Gram
(:func:`dense_top_svd`); callers choose by the rules stated where they call them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from lorafair._threads import split_map

_EPS64 = torch.finfo(torch.float64).eps
_U64 = _EPS64 / 2  # float64 unit roundoff


def fro_inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
    """``<B1 A1, B2 A2>_F = tr((B1ᵀ B2)(A2 A1ᵀ))``: O((d_out + d_in) r1 r2), no d_out × d_in."""
    left = B1.mT @ B2  # (r1, r2)
    right = A2 @ A1.mT  # (r2, r1)
    return (left * right.mT).sum(dim=(-2, -1))


def fro_norm(B: Tensor, A: Tensor) -> Tensor:
    """``‖B A‖_F`` via a thin QR ``B = Q R`` (orthonormal Q): ``‖B A‖_F = ‖R A‖_F``.

    Unlike the Gram trace ``tr((BᵀB)(AAᵀ))`` this has no cancellation, so it is accurate even when
    ``B A`` is a difference of nearly equal products. Cost O(d_out r² + r² d_in).
    """
    _, R = torch.linalg.qr(B, mode="r")
    norm: Tensor = torch.linalg.matrix_norm(R @ A)
    return norm


class FactoredSVD(NamedTuple):
    """Every singular triplet of ``ΔW = B A``, in descending order, kept in factored form.

    ``ΔW = U diag(S) Vh`` with ``U = left @ U_core`` and ``Vh = Vh_core @ right``. ``S`` (…, m)
    holds all m values, zeros included, so that a rank policy can cut it first and then form only
    the columns it keeps (:func:`top`, :func:`split`); :func:`dense_top_svd` holds only the top
    ones it was asked for. ``U_core`` is (…, R_left, m) and ``Vh_core``
    (…, m, R_right). The Gram route gives ``left = B`` and ``right = A``; the QR route the two
    orthonormal bases; the dense route ``U`` and ``Vh`` themselves with identity cores.
    """

    S: Tensor
    left: Tensor
    U_core: Tensor
    Vh_core: Tensor
    right: Tensor


def _clip(values: Tensor, rel: float) -> Tensor:
    """``values`` with every entry ≤ ``rel · max`` (negative rounding included) set to zero."""
    floor = values.amax(dim=-1, keepdim=True).clamp_min(0) * rel
    return torch.where(values > floor, values, torch.zeros_like(values))


def _pinv_diag(values: Tensor) -> Tensor:
    """``1 / values`` where positive, 0 elsewhere: the pseudo-inverse of a diagonal."""
    return torch.where(values > 0, 1.0 / values.clamp_min(torch.finfo(values.dtype).tiny), 0.0)


class _Syrk(NamedTuple):
    """One matrix's Gram for :func:`_syrks`: ``m mᵀ`` (``left``) or ``mᵀ m`` into ``out``."""

    m: npt.NDArray[np.float64]
    out: npt.NDArray[np.float64]
    left: bool


class _SyrkBatch(NamedTuple):
    """The Grams of every matrix of one batch: the items to run, and the (…, k, k) result
    they fill."""

    items: list[_Syrk]
    out: Tensor


def _syrk_items(x: npt.NDArray[np.float64], left: bool) -> _SyrkBatch:
    """One :class:`_Syrk` per matrix of ``x`` (…, m, n), and the result they fill."""
    k = x.shape[-2] if left else x.shape[-1]
    out = np.empty((*x.shape[:-2], k, k))
    items = [_Syrk(x[i], out[i], left) for i in np.ndindex(*x.shape[:-2])]
    return _SyrkBatch(items, torch.from_numpy(out))


def _syrks(items: list[_Syrk]) -> None:
    """Every item's Gram through NumPy: its matmul hands a product of a matrix with its own
    transpose to BLAS ``syrk``, which computes one triangle (half the flops of torch's general
    product) and mirrors it. The items run side by side on :func:`lorafair._threads.split_map`'s
    threads, largest first, each on one thread: even a batch of one layer runs its two sides
    side by side instead of one threaded BLAS call, whose workers spin after it and slow the
    next torch cast-copy."""

    def flops(it: _Syrk) -> int:
        return int(it.m.size * it.out.shape[0])  # n² m

    def syrk(_: None, it: _Syrk) -> None:
        np.matmul(it.m, it.m.T, out=it.out) if it.left else np.matmul(it.m.T, it.m, out=it.out)

    items = sorted(items, key=lambda it: -flops(it))
    # the thread policy: matrices side by side, one matrix's syrk (n² m flops) each
    per = sum(map(flops, items)) / max(1, len(items))
    split_map(syrk, items, scratch=lambda: None, flops=per)


def _gram_host(X: Tensor, left: bool) -> Tensor:
    """``X Xᵀ`` (``left``) or ``Xᵀ X`` of a CPU float64 tensor, matrix by matrix
    (:func:`_syrks`)."""
    batch = _syrk_items(X.detach().numpy(), left)
    _syrks(batch.items)
    return batch.out


_SPLIT_FLOPS = float(1 << 29)
"""One matrix's product flops (``2mkn``) from which :func:`matmul` splits it in halves on
NumPy (about 8 ms of one core: R ≥ 645 for an R × R product). Below, torch's product: split
at R = 320 (K = 20, r = 16), ``flexlora`` took 171–190 ms against 167–180 ms on one
Llama-3-8B block, bf16, in five alternating rounds, as NumPy's one-thread ``gemm`` is slower
than torch's here and its halves narrower."""


class _Half(NamedTuple):
    """Columns of one matrix's product for :func:`matmul`: ``out = x @ y``, ``y`` and ``out``
    the same column range of the whole."""

    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]
    out: npt.NDArray[np.float64]


def matmul(x: Tensor, y: Tensor) -> Tensor:
    """``x @ y``; for CPU float64 (…, m, k) @ (…, k, n) of at least ``_SPLIT_FLOPS`` a matrix,
    each matrix's product in two column halves (split at ``⌈n/2⌉``, by the shape alone), NumPy
    ``gemm`` calls into one result, side by side on :func:`lorafair._threads.split_map`'s
    threads, one thread each.

    For FlexLoRA's two R × R products of :func:`gram_core` (``2R³`` flops each) and the dense
    ΔW of :func:`dense_top_svd`: where a chunk holds one layer (R ≥ 1280 on a Llama-3-8B
    block) its core runs alone, and the halves keep a second core busy, where torch's product
    ran on one thread (torch's R × R algebra stays on one: MKL's results change with its thread
    count). The split depends on the shape alone, and each half is one single-threaded call:
    the same bits on any number of threads. On one Llama-3-8B block, bf16, ``flexlora`` took
    4142–4365 ms against 4712–4978 ms at K = 100, r = 16, and 3395–3590 against
    3711–3998 ms at K = 20, r = 64 (``python -m benchmarks.against --commit d8805bd
    --methods flexlora``, three rounds). Elsewhere (accelerators, other dtypes) torch's
    product, as for smaller products. Cost ``2mkn`` flops per matrix. Non-finite entries
    propagate silently, as in torch's product (the callers read them off traces).
    """
    cpu64 = x.device.type == y.device.type == "cpu" and x.dtype == y.dtype == torch.float64
    if not cpu64 or 2.0 * x.shape[-2] * x.shape[-1] * y.shape[-1] < _SPLIT_FLOPS:
        return x @ y
    a, b = x.detach().numpy(), y.detach().numpy()
    shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = np.broadcast_to(a, (*shape, *a.shape[-2:]))
    b = np.broadcast_to(b, (*shape, *b.shape[-2:]))
    out = np.empty((*shape, a.shape[-2], b.shape[-1]))
    n = b.shape[-1]
    cuts = [(0, n)] if n < 2 else [(0, (n + 1) // 2), ((n + 1) // 2, n)]
    items = [
        _Half(a[i], b[i][:, lo:hi], out[i][:, lo:hi]) for i in np.ndindex(*shape) for lo, hi in cuts
    ]

    def half(_: None, it: _Half) -> None:
        with np.errstate(all="ignore"):  # NaN/Inf pass through, as in torch's product
            np.matmul(it.x, it.y, out=it.out)

    # the thread policy: the halves side by side, one half's gemm each
    flops = 2.0 * a.shape[-2] * a.shape[-1] * n / len(cuts)
    split_map(half, items, scratch=lambda: None, flops=flops)
    return torch.from_numpy(out)


def grams(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """The two R × R Grams ``G_a = A Aᵀ`` and ``G_b = Bᵀ B``: O((d_in + d_out) R²).

    CPU float64 Grams go through BLAS ``syrk``, both sides' matrices side by side
    (:func:`_syrks`); elsewhere torch's product.
    """
    if A.device.type == "cpu" and A.dtype == B.dtype == torch.float64:
        a = _syrk_items(A.detach().numpy(), left=True)
        b = _syrk_items(B.detach().numpy(), left=False)
        _syrks(a.items + b.items)
        return a.out, b.out
    return A @ A.mT, B.mT @ B


def _gram_root(G: Tensor, rel: float) -> Tensor:
    """Some ``P`` with ``P Pᵀ = G`` (G symmetric positive semi-definite, batched).

    On the CPU, Cholesky (R³/3 flops, a tenth of ``eigh``'s time) when every matrix of the batch
    is numerically positive definite (its ``info`` is read on the host at no cost); otherwise,
    and always on accelerators (no host round trip), ``P = V Λ^{1/2}`` from ``eigh`` with
    eigenvalues at most ``rel`` times the largest taken as zero.
    """
    if G.device.type == "cpu":
        L: Tensor
        L, info = torch.linalg.cholesky_ex(G)
        if not bool(info.any()):
            return L
    lam, V = torch.linalg.eigh(G)
    root: Tensor = V * _clip(lam, rel).sqrt().unsqueeze(-2)
    return root


def gram_svd(
    B: Tensor, A: Tensor, G_a: Tensor, G_b: Tensor, rank: int = 0, unit_roundoff: float = 0.0
) -> tuple[FactoredSVD, Tensor | None]:
    """Every singular triplet of ``B A`` from the Grams ``G_a = A Aᵀ`` and ``G_b = Bᵀ B``.

    With any ``P`` such that ``P Pᵀ = G_a`` (Cholesky, or ``V Λ^{1/2}`` from ``eigh``; then
    ``A = P Qᵀ`` with Q orthonormal on A's row space),
    ``B A = (B P) Qᵀ`` and ``(B P)ᵀ (B P) = Pᵀ G_b P = W Σ² Wᵀ``. Hence ``U = B (P W Σ⁻¹)`` and,
    from ``Vh = Σ⁻¹ Uᵀ B A``, ``Vh = (Σ⁻² Wᵀ Pᵀ G_b) A``: two R × R eigendecompositions, no
    d × R factorisation and no inverse of P. Eigenvalues at most ``R·ε₆₄`` times the largest are
    taken as zero, and so are the triplets they carry.

    Accuracy: the Grams and the core carry a float64 rounding of about ``(d + R)·ε₆₄·κ²`` relative
    to ``‖BA‖_F``, with ``κ = ‖B‖_F ‖A‖_F / ‖BA‖_F`` and d the longer side (the argument of
    ``docs/lora_fair.md`` for LoRA-FAIR's Grams), against ``(d + R)·ε₆₄·κ`` for :func:`qr_svd`.
    Cost O(R³) on top of the Grams.

    With ``rank`` > 0 and a block :func:`top_block` at most ``R / _TOP_GRAM_MIN``, only the
    top ``rank`` triplets: :func:`top_eigh` of the core C replaces its full ``eigh``
    (``oblique``: ``Vh`` keeps the form above, exact only for exact eigenvectors), certified per
    layer to ``unit_roundoff·‖ΔW‖_F`` with ``δ = 2R·u₆₄·tr C`` for the core's own arithmetic (the
    Grams' rounding is the κ rule's, above); the products with W then cost O(R² rank). On the
    CPU a batch with an uncertified core takes the full ``eigh`` of the same C at once. Returns
    the certificate (…,) as well, or ``None`` for the full decomposition.
    """
    core = gram_core(G_a, G_b, rank, unit_roundoff)
    return FactoredSVD(core.S, B, core.U_core, core.Vh_core, A), core.certified


class GramCore(NamedTuple):
    """:func:`gram_core`'s result: ``ΔW = left · U_core diag(S) Vh_core · right`` for the
    stacks ``left = B``, ``right = A`` of :func:`gram_svd`, and the top triplets' certificate
    (``None`` for the full decomposition)."""

    S: Tensor
    U_core: Tensor
    Vh_core: Tensor
    certified: Tensor | None


def gram_core(G_a: Tensor, G_b: Tensor, rank: int = 0, unit_roundoff: float = 0.0) -> GramCore:
    """:func:`gram_svd` from the Grams alone (the stacks enter only through later products,
    e.g. :func:`lorafair._stacks.products`). Cost O(R³), R × R throughout."""
    R = G_a.shape[-1]
    rel = R * _EPS64
    P = _gram_root(G_a, rel)
    PtGb = matmul(P.mT, G_b)  # the two R³ products: on the CPU, halves side by side
    C = matmul(PtGb, P)
    C = (C + C.mT).mul_(0.5)
    certified: Tensor | None = None
    if rank > 0 and _TOP_GRAM_MIN * top_block(rank) <= R:
        trace = C.diagonal(dim1=-2, dim2=-1).sum(-1)
        delta = 2 * R * _U64 * trace
        top = top_eigh(C, rank, delta, unit_roundoff * trace.clamp_min(0).sqrt(), oblique=True)
        sig2, W, certified = top
        # on the CPU the certificate is read at no cost: a batch with an uncertified core takes
        # the full eigh now, on the same C (elsewhere the caller redoes its layers after the
        # call's one host round trip)
        if C.device.type == "cpu" and not bool(certified.all()):
            certified = None
    if certified is None:
        sig2, W = torch.linalg.eigh(C)
        sig2, W = sig2.flip(-1), W.flip(-1)
    S = _clip(sig2, rel).sqrt()
    inv = _pinv_diag(S)
    U_core = (P @ W) * inv.unsqueeze(-2)
    Vh_core = (inv * inv).unsqueeze(-1) * (W.mT @ PtGb)
    return GramCore(S, U_core, Vh_core, certified)


def qr_svd(B: Tensor, A: Tensor) -> FactoredSVD:
    """Every singular triplet of ``B A`` via thin QRs ``B = Q_b R_b``, ``Aᵀ = Q_a R_a``.

    ``B A = Q_b (R_b R_aᵀ) Q_aᵀ``; the SVD of the R × R core gives the triplets. No squared
    condition number, so accurate for float64 inputs and for clients whose updates nearly cancel.
    Cost O((d_out + d_in) R² + R³).
    """
    Q_b, R_b = torch.linalg.qr(B)
    Q_a, R_a = torch.linalg.qr(A.mT)
    U_c, S, Vh_c = torch.linalg.svd(R_b @ R_a.mT, full_matrices=False)
    return FactoredSVD(S, Q_b, U_c, Vh_c, Q_a.mT)


def dense_svd(B: Tensor, A: Tensor) -> FactoredSVD:
    """Every singular triplet of ``B A``, formed densely: one d_out × d_in matrix per layer.

    Cost O(d_out d_in R) to form plus O(d_out d_in min(d_out, d_in)) for the SVD; cheaper than the
    factored routes once R approaches ``d_out d_in / (d_out + d_in)``.
    """
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand(*S.shape, S.shape[-1])
    return FactoredSVD(S, U, eye, eye, Vh)


# top_eigh's fixed schedule: the number of subspace iterations (see there)
_TOP_ITERATIONS = 6
# gram_svd takes top_eigh over the full R × R eigh once R is this many blocks: measured on the
# CPU of benchmarks/README.md (one thread, batches of 3, block 40): 7.7 vs 3.9 ms at R = 96,
# 25 vs 45 ms at R = 288, 67 vs 176 ms at R = 480
_TOP_GRAM_MIN = 4


def top_block(rank: int) -> int:
    """Block size of :func:`dense_top_svd`'s subspace iteration for ``rank`` wanted triplets."""
    return 2 * rank + 8


class TopEigh(NamedTuple):
    """:func:`top_eigh`'s result: the top k eigenpairs of an SPD matrix, and their certificate."""

    values: Tensor  # (…, k), descending
    vectors: Tensor  # (…, n, k), orthonormal
    certified: Tensor  # (…,) bool


def top_eigh(G: Tensor, k: int, delta: Tensor, tol: Tensor, *, oblique: bool) -> TopEigh:
    """The top ``k`` eigenpairs of ``G = XᵀX`` (n × n, batched) by certified subspace iteration.

    ``_TOP_ITERATIONS`` steps of ``Q ← qr(G Q)`` on a block of ``p =`` :func:`top_block`
    columns from a fixed seed, then Rayleigh–Ritz: ``QᵀGQ = Z Θ Zᵀ``, Ritz vectors
    ``W = Q Z_k``, values ``θ_1 ≥ … ≥ θ_p``, residual ``E = G W − W Θ_k``. The returned
    ``X W Wᵀ`` (X's projection on span W) has the squared error ``s = tr G − tr Θ_k``.

    Certificate: with ``μ = (θ_k + θ_{k+1}) / 2`` and ``t = θ_k − μ``, a float64 Cholesky of
    ``μI − (I − WWᵀ) G (I − WWᵀ) − cI`` that succeeds, with Rump's shift
    ``c = 2(n + 1)·u₆₄·tr(·) + 2kδ``, proves that G has no eigenvalue above μ outside span(W).
    In the basis (W, W⊥), ``G ≼ diag(Θ_k + EᵀE/t, W⊥ᵀGW⊥ + tI)``, so Ky Fan's maximum principle
    bounds the optimum ``Σ_{i≤k} λ_i ≤ tr Θ_k + ‖E‖_F²/t``: the squared error exceeds the optimal
    one by at most ``η = ‖E‖_F²/t + 2kδ``, where ``δ`` (the caller's) bounds the rounding of G
    and of this arithmetic in spectral norm (‖E‖_F is taken with its rounding, ``+ √k δ``); in
    Frobenius norm by at most ``√s − √(s − η)``. ``oblique``: the caller's output is
    ``X W Θ⁻¹ Wᵀ G`` instead of the projection (no inverse of a root of G), which adds at most
    ``‖E‖_F / √θ_k``. Certified when the excess is at most ``tol``, t > 0 and the Cholesky
    succeeded. σ_k = σ_{k+1}, a rank below k, G = 0, or a spectrum that six steps do not
    resolve, leave a matrix uncertified (the caller then takes an exact route).

    Cost: ``≈ 2n²p`` per step, ``n³/3`` for the Cholesky, O(n²k) besides. No host sync.
    """
    n = G.shape[-1]
    p = min(n, top_block(k))
    g = torch.Generator(device=G.device).manual_seed(0)  # drawn where G lives: no copy, no sync
    Q = torch.randn(n, p, generator=g, dtype=G.dtype, device=G.device)
    Q = Q.expand(*G.shape[:-2], n, p)
    for _ in range(_TOP_ITERATIONS):
        Q = torch.linalg.qr(G @ Q).Q
    GQ = G @ Q
    H = Q.mT @ GQ
    th, Z = torch.linalg.eigh((H + H.mT) * 0.5)
    th, Z = th.flip(-1), Z.flip(-1)
    W, GW, theta = Q @ Z[..., :k], GQ @ Z[..., :k], th[..., :k]
    E = GW - W * theta.unsqueeze(-2)
    trace = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    e = torch.linalg.matrix_norm(E) + k**0.5 * delta
    mu = (th[..., k - 1] + th[..., k]) * 0.5 if p > k else th[..., k - 1]
    t = th[..., k - 1] - mu
    s = (trace - theta.sum(-1)).clamp_min(0)
    tiny = torch.finfo(G.dtype).tiny
    eta = torch.where(t > 0, e * e / t.clamp_min(tiny), torch.inf) + 2 * k * delta
    excess = s.sqrt() - (s - eta).clamp_min(0).sqrt()
    if oblique:
        last = theta[..., k - 1]
        excess = excess + torch.where(last > 0, e / last.clamp_min(tiny).sqrt(), torch.inf)
    within = (t > 0) & (excess <= tol)
    # μI − (I − WWᵀ) G (I − WWᵀ) = μI − (G − W (GW)ᵀ − E Wᵀ)
    Hc = (G - W @ GW.mT).sub_(E @ W.mT).neg_()  # in place: two R × R temporaries, not four
    Hc.diagonal(dim1=-2, dim2=-1).add_(mu.unsqueeze(-1))
    shift = 2 * (n + 1) * _U64 * Hc.diagonal(dim1=-2, dim2=-1).sum(-1) + 2 * k * delta
    Hc.diagonal(dim1=-2, dim2=-1).sub_(shift.unsqueeze(-1))
    _, info = torch.linalg.cholesky_ex(Hc)
    return TopEigh(theta, W, within & (info == 0))


def full_top_eigh(G: Tensor, k: int, delta: Tensor, tol: Tensor) -> TopEigh:
    """The top ``k`` eigenpairs of ``G = XᵀX`` from its full ``eigh``, certified with no gap.

    With ``G V ≈ V Λ`` from LAPACK, the residual ``r = ‖G V − V Λ‖_F`` and the loss of
    orthogonality ``o = ‖VᵀV − I‖_F`` (two n³ products) bound a backward error: V is within o
    of an orthonormal Ṽ, and ``G + F`` has the exact eigenpairs (Ṽ, Λ) with
    ``‖F‖₂ ≤ f = r + 2o·λ_1``. Ky Fan then gives ``Σ_{i≤k} λ_i(G) ≤ tr Λ_k + k f``, and the
    projection on the top k columns W captures at least ``tr Λ_k − k f − 2o·tr G``: the squared
    error ``s = tr G − tr Λ_k`` exceeds the optimum by at most ``η = 2k(f + δ) + 2o·tr G``, in
    Frobenius norm by at most ``√s − √(s − η)``; certified when that is at most ``tol``. No gap
    is needed, only ``s`` not too small (ΔW not nearly of rank ≤ k). Cost ≈ 9n³ (eigh, two
    products).
    """
    lam, V = torch.linalg.eigh(G)
    lam, V = lam.flip(-1), V.flip(-1)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    r = torch.linalg.matrix_norm(G @ V - V * lam.unsqueeze(-2))
    o = torch.linalg.matrix_norm(V.mT @ V - eye)
    trace = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    f = r + 2 * o * lam[..., 0].abs()
    eta = 2 * k * (f + delta) + 2 * o * trace
    s = (trace - lam[..., :k].sum(-1)).clamp_min(0)
    excess = s.sqrt() - (s - eta).clamp_min(0).sqrt()
    return TopEigh(lam[..., :k], V[..., :k], (excess <= tol) & (o < 0.5))


class TopSVD(NamedTuple):
    """:func:`dense_top_svd`'s result: the top triplets and, per layer, whether they are certified
    and whether ``‖ΔW‖_F²`` is finite."""

    svd: FactoredSVD
    certified: Tensor
    finite: Tensor


def dense_top_svd(B: Tensor, A: Tensor, rank: int, unit_roundoff: float) -> TopSVD:
    """The top ``rank`` triplets of ``ΔW = B A``, formed densely, with a per-layer certificate.

    Form ``ΔW`` (float64) and its Gram on the smaller side, ``G = XᵀX`` (n × n,
    ``n = min(d_out, d_in)``, ``X = ΔW`` or ``ΔWᵀ``, m the longer side; BLAS ``syrk`` on the
    CPU); :func:`top_eigh` gives its top ``rank`` eigenvectors W with a certificate that the
    projection ``ΔW W Wᵀ`` (or ``W Wᵀ ΔW``) is Eckart–Young optimal to ``unit_roundoff·‖ΔW‖_F``:
    half of that for the eigensolve, with ``δ = 2m·u₆₄·‖ΔW‖_F²``, which bounds the float64
    rounding of G in spectral norm (the cost of squaring), and half for forming ΔW in float64
    (at most ``2R·u₆₄·‖B‖_F‖A‖_F``; a layer whose clients cancel beyond that is not
    certified). That bound is the rounding of a result in the inputs' dtype; for float64
    (``u₆₄``) the squaring term alone exceeds it: never certified. The projection is returned as
    an SVD through the thin SVD of the m × k matrix ``Y = X W``. On the CPU a layer that
    :func:`top_eigh` leaves uncertified takes :func:`full_top_eigh` of the same G at once
    (certified without a gap); a layer still uncertified is for the caller to redo exactly.

    Non-finite inputs: ``finite`` is ``‖ΔW‖_F² = tr G``'s finiteness. A NaN or Inf factor entry
    makes some entry of ΔW, hence of G's diagonal, non-finite (in IEEE arithmetic a sum with a
    non-finite term is non-finite and ``0·Inf`` is NaN); float32-range inputs cannot overflow in
    float64 here. A non-finite layer's G and Y are zeroed (so no LAPACK call sees a NaN) and it is
    left uncertified; the caller raises.

    Cost per layer: ``2 d_out d_in R`` to form ΔW, ``n² m`` for G, :func:`top_eigh`'s
    ``≈ 2n²p`` per step and ``n³/3`` (``≈ 9n³`` more where :func:`full_top_eigh` is needed),
    O(mnk) for the products; memory: ΔW and a few n × n buffers.
    No host synchronisation: ``certified`` and ``finite`` (…,) are tensors.
    """
    dw = matmul(B, A)
    left = dw.shape[-2] < dw.shape[-1]  # Gram on the smaller side
    X = dw.mT if left else dw  # (…, m, n), n ≤ m, G = Xᵀ X
    m = X.shape[-2]
    k = rank
    G = _gram_host(X, left=False) if X.device.type == "cpu" else X.mT @ X
    fro2 = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    finite = torch.isfinite(fro2)
    G = torch.where(finite.reshape(*finite.shape, 1, 1), G, 0.0)
    fro2 = torch.where(finite, fro2, 0.0)
    # Forming ΔW in float64 errs by at most F = R·u₆₄·‖B‖_F‖A‖_F (Frobenius); an answer within
    # tol of optimal for the computed ΔW is within tol + 2F for the true one. So half the budget
    # goes to the eigensolve and a layer is certified only where 2F fits in the other half
    # (κ = ‖B‖‖A‖/‖ΔW‖ ≤ u_in/(4R·u₆₄): ~1.4·10⁵ for float32 at R = 1000).
    formed = 2 * B.shape[-1] * _U64 * torch.linalg.matrix_norm(B) * torch.linalg.matrix_norm(A)
    budget = unit_roundoff * fro2.sqrt()
    delta, tol = 2 * m * _U64 * fro2, 0.5 * budget
    top = top_eigh(G, k, delta, tol, oblique=False)
    # on the CPU the certificate is read at no cost: without it, the full eigh of the same G,
    # certified with no gap (elsewhere the caller redoes the layer after its one host round trip)
    if G.device.type == "cpu" and not bool(top.certified.all()):
        top = full_top_eigh(G, k, delta, tol)
    W = top.vectors
    Y = torch.where(finite.reshape(*finite.shape, 1, 1), X @ W, 0.0)  # (…, m, k)
    U_y, S, Zh = torch.linalg.svd(Y, full_matrices=False)  # Y = U_y S Zh
    if left:  # W Wᵀ ΔW = W (ΔWᵀ W)ᵀ = (W Zhᵀ) S U_yᵀ
        U, Vh = W @ Zh.mT, U_y.mT
    else:  # ΔW W Wᵀ = U_y S (W Zhᵀ)ᵀ
        U, Vh = U_y, Zh @ W.mT
    eye = torch.eye(k, dtype=S.dtype, device=S.device).expand(*S.shape, k)
    certified = top.certified & finite & (formed <= 0.5 * budget)
    return TopSVD(FactoredSVD(S, U, eye, eye, Vh), certified, finite)


def pad(x: Tensor, dim: int, size: int) -> Tensor:
    """``x`` with zeros appended along ``dim`` up to ``size`` (as is when already that long)."""
    missing = size - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


class SplitCores(NamedTuple):
    """The small factors of :func:`split`: ``B = left @ b_core`` (b_core R × k) and
    ``A = a_core @ right`` (a_core k × R), k = min(rank, number of triplets)."""

    b_core: Tensor
    a_core: Tensor


def split_cores(
    S: Tensor, U_core: Tensor, Vh_core: Tensor, rank: int, left_power: float
) -> SplitCores:
    """``(U_core S^p, S^{1−p} Vh_core)`` for the top ``k = min(rank, m)`` triplets (see
    :func:`split`)."""
    k = min(rank, S.shape[-1])
    Sk = S[..., :k]
    return SplitCores(
        U_core[..., :k] * Sk.pow(left_power).unsqueeze(-2),
        Sk.pow(1.0 - left_power).unsqueeze(-1) * Vh_core[..., :k, :],
    )


def split(svd: FactoredSVD, rank: int, left_power: float) -> tuple[Tensor, Tensor]:
    """``(B, A) = (U_k S_k^p, S_k^{1−p} Vh_k)`` for the top ``k = min(rank, m)`` triplets.

    Zero-padded to ``rank`` columns / rows; ``B @ A`` is the best rank-``rank`` approximation.
    Only the kept columns are formed: one (d × R)(R × k) product per factor.
    """
    cores = split_cores(svd.S, svd.U_core, svd.Vh_core, rank, left_power)
    # B as (Mᵀ leftᵀ)ᵀ: BLAS runs the tall-skinny product faster with the long dimension last
    # (the result is a transposed view; callers make their output contiguous)
    B = (cores.b_core.mT @ svd.left.mT).mT
    A = cores.a_core @ svd.right
    return pad(B, -1, rank), pad(A, -2, rank)


def top(svd: FactoredSVD, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``U`` (…, d_out, rank), ``S`` (…, rank), ``Vh`` (…, rank, d_in): the top triplets, padded."""
    k = min(rank, svd.S.shape[-1])
    U = svd.left @ svd.U_core[..., :k]
    Vh = svd.Vh_core[..., :k, :] @ svd.right
    return pad(U, -1, rank), pad(svd.S[..., :k], -1, rank), pad(Vh, -2, rank)


def truncated_svd(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD ``U S Vᵀ`` of ``B @ A`` without forming it (the QR route)."""
    return top(qr_svd(B, A), rank)
