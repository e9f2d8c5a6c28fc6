"""Server-side aggregators for federated LoRA.

Every aggregator takes the K clients' adapters ``clients[k][layer] = (A_k, B_k)`` with ``A_k`` of
shape (r_k, d_in) and ``B_k`` of shape (d_out, r_k), optional non-negative ``weights`` (normalised
to ``p_k = w_k / Σ w_j``; ``None`` means ``p_k = 1/K``), keyword-only options, and returns a new
``dict[str, LoRAFactors]`` in the first client's layer order, on the inputs' device and dtype.
Inputs are validated once (see :mod:`lorafair.errors`) and never mutated.

The ideal global update of a layer is ``ΔW = Σ_k p_k B_k A_k``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lorafair import _average, _linalg
from lorafair._fair import ResidualSolution, lora_fair, solve_residual
from lorafair._validate import (
    Layer,
    chunked,
    group_by_shape,
    prepare,
    raise_if_nonfinite,
    stacked_batch,
)
from lorafair.errors import FrozenAMismatchError, LoRAFairError
from lorafair.types import LoRAFactors

__all__ = [
    "ResidualSolution",
    "fedit",
    "ffa_lora",
    "flexlora",
    "flora",
    "lora_fair",
    "solve_residual",
]

_Clients = Sequence[Mapping[str, "LoRAFactors | tuple[Tensor, Tensor]"]]

# Working-set budget of one batched solve: large enough to amortise per-call overhead over
# many layers, small enough that peak memory does not scale with the number of layers.
_BATCH_BYTES = 1 << 28


def fedit(clients: _Clients, weights: Sequence[float] | None = None) -> dict[str, LoRAFactors]:
    """FedIT: average A and B separately (Eq. 5 of LoRA-FAIR).

    Returns ``(Ā, B̄)`` with ``Ā = Σ p_k A_k`` and ``B̄ = Σ p_k B_k``. Biased: in general
    ``B̄ Ā ≠ ΔW = Σ p_k B_k A_k``; exact when all ``A_k`` are equal (or all ``B_k``).
    All clients must share the rank r.

    Cost: O(K r (d_in + d_out)) flops, one read of every input and one output-sized buffer per
    factor; accumulated in float32 (float64 for float64 input). NaN/Inf are detected from the
    averages themselves (one host synchronisation per call). Download: r (d_in + d_out) numbers
    per layer.

    >>> import torch
    >>> c0 = {"fc": (torch.ones(1, 2), torch.ones(3, 1))}
    >>> c1 = {"fc": (3 * torch.ones(1, 2), torch.zeros(3, 1))}
    >>> A, B = fedit([c0, c1])["fc"]
    >>> A.tolist(), B.flatten().tolist()
    ([[2.0, 2.0]], [0.5, 0.5, 0.5])
    """
    prep = prepare(clients, weights, equal_ranks=True, check_finite=False)
    layers = list(prep.layers.values())
    sums = _average.weighted_sums([la.As for la in layers] + [la.Bs for la in layers], prep.weights)
    _average.check(_average.nonfinite_flag(sums), prep.layers)
    n = len(layers)
    return {la.name: LoRAFactors(sums[i], sums[n + i]) for i, la in enumerate(layers)}


def _max_drift(layers: Sequence[Layer]) -> list[Tensor]:
    """Per client k ≥ 1: ``max |A_k − A_0|`` of every layer (L,), in two list-wide calls.

    A drift ≤ ``atol`` passes ``torch.allclose`` whatever ``rtol``; only layers above it (rare:
    FFA-LoRA's clients share A bit for bit) need the exact test. NaN propagates.
    """
    A0s = [la.As[0] for la in layers]
    out = []
    for k in range(1, len(layers[0].As)):
        diff = torch._foreach_sub([la.As[k] for la in layers], A0s)
        out.append(torch.stack(list(torch._foreach_norm(diff, float("inf")))))
    return out


def ffa_lora(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-8,
) -> dict[str, LoRAFactors]:
    """FFA-LoRA: A is frozen at a shared initialisation; only B is averaged.

    Returns ``(A, Σ p_k B_k)`` where ``A`` is the common ``A_k`` (client 0's, copied). Since every
    client shares A, ``B̄ A = Σ p_k B_k A = ΔW`` exactly. Raises :class:`FrozenAMismatchError`
    naming the layer and client when some ``A_k`` differs from ``A_0`` beyond
    ``|A_k − A_0| ≤ atol + rtol·|A_0|`` elementwise.

    Cost: O(K r (d_in + d_out)) flops (the check reads every A once), one host synchronisation
    per call. Download: r·d_out per layer (A need not be sent again).
    """
    prep = prepare(clients, weights, equal_ranks=True, check_finite=False)
    if not (rtol >= 0 and atol >= 0):
        raise LoRAFairError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    layers = list(prep.layers.values())
    Bs = _average.weighted_sums([la.Bs for la in layers], prep.weights)
    As = [la.As[0].clone() for la in layers]
    drift = _max_drift(layers) if len(prep.weights) > 1 else []
    # per client k ≥ 1 and layer: A_k drifts beyond atol (or is NaN); then the exact test decides
    beyond = [~(d <= atol) for d in drift]
    host = _average.check(
        _average.nonfinite_flag(Bs + As), prep.layers, torch.stack(beyond) if beyond else None
    )
    n = len(layers)
    if any(host):  # a NaN/Inf A_k also drifts: name it as non-finite before any mismatch
        raise_if_nonfinite(prep.layers)
    for k, i in (divmod(j, n) for j, bad in enumerate(host) if bad):
        la = layers[i]
        A, A0 = la.As[k + 1], la.As[0]
        if not torch.allclose(A, A0, rtol=rtol, atol=atol):
            diff = (A.double() - A0.double()).abs().max().item()
            raise FrozenAMismatchError(
                f"layer {la.name!r}: client {k + 1} has A differing from client 0's by up to "
                f"{diff:.3g} (rtol={rtol}, atol={atol}); FFA-LoRA needs A frozen and "
                "shared by every client"
            )
    return {la.name: LoRAFactors(A, B) for la, A, B in zip(layers, As, Bs, strict=True)}


def flora(clients: _Clients, weights: Sequence[float] | None = None) -> dict[str, LoRAFactors]:
    """FLoRA: stack all clients' factors along the rank axis.

    Returns ``A = cat_k(p_k A_k)`` of shape (Σ r_k, d_in) and ``B = cat_k(B_k)`` of shape
    (d_out, Σ r_k), so ``B @ A = Σ p_k B_k A_k = ΔW`` exactly (up to rounding of ``p_k A_k``).
    Ranks may differ between clients. Clients merge ``B @ A`` into their frozen weights and
    re-initialise their LoRA factors.

    Cost: O(K r d_in) flops plus copies: one read of the input, one write of the output (which is
    as large), one read of the output for the NaN/Inf flag, one host synchronisation per call.
    Download Σ r_k (d_in + d_out) per layer (K× FedIT's).
    """
    prep = prepare(clients, weights, equal_ranks=False, check_finite=False)
    p = prep.weights
    out: dict[str, LoRAFactors] = {}
    for name, layer in prep.layers.items():
        A_s = torch.empty(sum(layer.ranks), layer.d_in, dtype=layer.dtype, device=layer.device)
        start = 0
        for A, w in zip(layer.As, p, strict=True):
            torch.mul(A, w, out=A_s[start : start + A.shape[0]])
            start += A.shape[0]
        out[name] = LoRAFactors(A_s, torch.cat(layer.Bs, dim=1))
    _average.check(_average.nonfinite_flag([t for f in out.values() for t in f]), prep.layers)
    return out


Route = Literal["gram", "qr", "dense"]

# Flop weights of the cost model (calibrated on the K sweep of benchmarks/README.md): LAPACK's
# eigh / SVD run well below the GEMM rate, so their O(n³) terms weigh more than a GEMM's flops.
_EIGH_WEIGHT = 30.0  # two R × R eigh with vectors plus the R × R products of gram_svd
_QR_WEIGHT = 40.0  # the R × R core SVD of qr_svd
_SVD_WEIGHT = 12.0  # per d_out·d_in·min(d_out, d_in) of a dense SVD


def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def _gram_kappa_limit(dtype: torch.dtype, d_out: int, d_in: int, R: int) -> float:
    """Largest ``κ = ‖B_s‖_F‖A_s‖_F / ‖ΔW‖_F`` for which the Gram route is as accurate as the input.

    The Gram route's float64 error is about ``(d + R)·u₆₄·κ²`` relative to ‖ΔW‖ (d the longer side,
    u the unit roundoff); the rounding already in the inputs is ``u_in·κ``. The route is taken
    while the first is at most the second: ``κ ≤ u_in / ((d + R)·u₆₄)``, about 1.7·10⁵ for float32
    ViT layers, 10¹⁰ for bfloat16, and below 1 for float64 (never).
    """
    return _unit_roundoff(dtype) / ((max(d_out, d_in) + R) * _unit_roundoff(torch.float64))


def _route(d_out: int, d_in: int, R: int, dtype: torch.dtype) -> Route:
    """Cost model: the factored route (Gram, or QR for float64) or one dense layer at a time.

    Factored: ``2(d_in + d_out)R²`` for the Grams (QR: twice that) plus ``w R³``; dense:
    ``2 d_in d_out R`` to form ΔW plus ``w' d_in d_out min(d_in, d_out)`` for its SVD. The two
    cross near ``R ≈ d_in d_out / (d_in + d_out)`` (576 for a 2304 × 768 layer).
    """
    factored: Route = "qr" if dtype == torch.float64 else "gram"
    if factored == "gram":
        cost_factored = 2.0 * (d_in + d_out) * R * R + _EIGH_WEIGHT * R**3
    else:
        cost_factored = 4.0 * (d_in + d_out) * R * R + _QR_WEIGHT * R**3
    cost_dense = 2.0 * d_in * d_out * R + _SVD_WEIGHT * d_in * d_out * min(d_in, d_out)
    return factored if cost_factored <= cost_dense else "dense"


class _Pending(NamedTuple):
    """One batch whose result waits for the call's single host check."""

    layers: list[Layer]
    A: Tensor
    B: Tensor
    gram_ok: Tensor | None  # per layer: κ within the Gram route's limit (None: not the Gram route)


def _stack64(batch: list[Layer], p: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Float64 ``Â = cat_k A_k`` (L, R, d_in), ``B_s = cat_k B_k`` (L, d_out, R), and the row
    weights ``d`` (R,) with ``A_s = diag(d) Â``: one cast-copy of each input, no scaling pass."""
    first = batch[0]
    R = sum(first.ranks)
    A = torch.empty(len(batch), R, first.d_in, dtype=torch.float64, device=first.device)
    B = torch.empty(len(batch), first.d_out, R, dtype=torch.float64, device=first.device)
    for i, layer in enumerate(batch):
        torch.cat(layer.As, dim=0, out=A[i])
        torch.cat(layer.Bs, dim=1, out=B[i])
    d = torch.tensor(
        [w for w, r in zip(p, first.ranks, strict=True) for _ in range(r)],
        dtype=torch.float64,
        device=first.device,
    )
    return A, B, d


def _flexlora_batch(
    batch: list[Layer], p: Sequence[float], route: Route, target: int, left_power: float
) -> tuple[_Pending, Tensor]:
    """Run one batch of same-shaped layers; return it and its per-layer non-finite flags."""
    gram_ok = None
    if route == "gram":
        # unweighted float64 stacks (one cast-copy per factor); the weights p_k enter through the
        # R × R Gram, A_s = D Â with D = diag(p_k repeated r_k times): G_a = D (Â Âᵀ) D
        A_s, B_s, d = _stack64(batch, p)
        G_a, G_b = _linalg.grams(B_s, A_s)
        G_a = G_a * d.unsqueeze(-1) * d.unsqueeze(-2)
        tr_a = G_a.diagonal(dim1=-2, dim2=-1).sum(-1)
        tr_b = G_b.diagonal(dim1=-2, dim2=-1).sum(-1)
        # ‖A_s‖²·‖B_s‖² is non-finite iff some input is (no overflow: inputs ≤ 3.4e38 here)
        bad = ~torch.isfinite(tr_a * tr_b)
        keep = (~bad).to(G_a.dtype).reshape(-1, 1, 1)
        G_a, G_b = torch.nan_to_num(G_a) * keep, torch.nan_to_num(G_b) * keep
        dw2 = (G_a * G_b).sum(dim=(-2, -1))  # ‖ΔW‖_F² = tr(G_a G_b)
        first = batch[0]
        limit = _gram_kappa_limit(first.dtype, first.d_out, first.d_in, sum(first.ranks))
        gram_ok = tr_a * tr_b <= limit * limit * dw2
        svd = _linalg.gram_svd(B_s, A_s, G_a, G_b)
        svd = svd._replace(Vh_core=svd.Vh_core * d)  # Vh = Vh_core D Â
    else:
        A_s, B_s = stacked_batch(batch, p, torch.float64)
        bad = ~(torch.isfinite(A_s).flatten(1).all(1) & torch.isfinite(B_s).flatten(1).all(1))
        keep = (~bad).to(A_s.dtype).reshape(-1, 1, 1)
        A_s, B_s = torch.nan_to_num(A_s) * keep, torch.nan_to_num(B_s) * keep
        svd = _linalg.qr_svd(B_s, A_s) if route == "qr" else _linalg.dense_svd(B_s, A_s)
    B, A = _linalg.split(svd, target, left_power)
    return _Pending(batch, A, B, gram_ok), bad


def flexlora(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    rank: int | None = None,
    split: Literal["balanced", "left"] = "balanced",
) -> dict[str, LoRAFactors]:
    """FlexLoRA: the best rank-``rank`` approximation of ``ΔW``, as LoRA factors.

    With the truncated SVD ``ΔW ≈ U_r S_r V_rᵀ`` (Eckart–Young optimal in Frobenius and spectral
    norm), returns for ``split="balanced"`` ``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_rᵀ`` (both
    factors of equal scale), and for ``split="left"`` FederatedScope's ``B = U_r S_r``,
    ``A = V_rᵀ``. ``B @ A`` is the same either way. ``rank`` defaults to the clients' largest
    rank; ranks may differ between clients. If ``rank`` exceeds the numerical rank of ``ΔW`` the
    extra components are zero rows/columns, so shapes are always (rank, d_in) / (d_out, rank).

    With the stacked factors ``B_s`` (d_out, R), ``A_s`` (R, d_in), R = Σ r_k, ``ΔW = B_s A_s``.
    Per group of same-shaped layers a stated cost model (``_route``) picks one of:

    - **Gram** (float32/float16/bfloat16 inputs): the float64 Grams ``A_s A_sᵀ`` and ``B_sᵀ B_s``
      and two R × R eigendecompositions give every triplet; U and V then cost one
      (d × R)(R × rank) product each. Its float64 error, ``(d + R)·u₆₄·κ²`` relative with
      ``κ = ‖B_s‖_F‖A_s‖_F / ‖ΔW‖_F``, stays below the inputs' own rounding ``u_in·κ`` while
      ``κ ≤ u_in / ((d + R)·u₆₄)`` (1.7·10⁵ for float32 ViT layers): a layer whose clients cancel
      more than that is redone by the QR route.
    - **QR** (float64 inputs): thin QRs of ``B_s`` and ``A_sᵀ`` and an R × R core SVD, accurate
      however much the clients cancel.
    - **dense** (large R): form ``ΔW`` one layer at a time and take its SVD, when
      ``2 d_in d_out R`` plus the SVD costs less than the factored route's ``(d_in + d_out) R²``
      and ``R³`` terms (about R ≳ 600 for ViT-B/16 layers).

    Layers are processed in float64 batches whose working set is capped at 256 MiB (one layer
    per batch on the dense route), so peak memory does not grow with the number of layers;
    NaN/Inf are read off the Grams' traces (or the stacks) and the whole call synchronises with
    the host once. Cost: O((d_out + d_in) R² + R³) flops and O((d_out + d_in) R) memory per layer
    on the factored routes, O(d_out d_in (R + min(d_out, d_in))) and one d_out × d_in buffer on
    the dense one. Download: rank·(d_in + d_out) per layer.
    """
    if split not in ("balanced", "left"):
        raise LoRAFairError(f"split must be 'balanced' or 'left', got {split!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LoRAFairError(f"rank must be a positive int or None, got {rank!r}")
    prep = prepare(clients, weights, equal_ranks=False, check_finite=False)
    p = prep.weights
    left_power = 0.5 if split == "balanced" else 1.0
    pending: list[_Pending] = []
    flags: list[Tensor] = []
    for group in group_by_shape(list(prep.layers.values())):
        first = group[0]
        R = sum(first.ranks)
        target = rank if rank is not None else max(first.ranks)
        route = _route(first.d_out, first.d_in, R, first.dtype)
        # float64 stacks plus two d × R companions (QR bases, or the output products)
        per_layer = 3 * 8 * (first.d_out + first.d_in) * R
        if route == "dense":
            per_layer = _BATCH_BYTES  # one layer at a time: memory bound to one dense ΔW
        for batch in chunked(group, per_layer, _BATCH_BYTES):
            done, bad = _flexlora_batch(batch, p, route, target, left_power)
            pending.append(done)
            flags.append(bad)
    gram_ok = [d.gram_ok for d in pending if d.gram_ok is not None]
    # the call's one host round trip: any non-finite input, and which layers the Gram route kept
    ok = _average.check(
        [torch.cat(flags).any()], prep.layers, torch.cat(gram_ok) if gram_ok else None
    )
    out: dict[str, LoRAFactors] = {}
    i = 0
    for done in pending:
        for j, layer in enumerate(done.layers):
            if done.gram_ok is not None:
                i, redo = i + 1, not ok[i]
            else:
                redo = False
            if redo:  # the clients cancel beyond the Gram route's bound: QR route, exact to u₆₄·κ
                again, _ = _flexlora_batch([layer], p, "qr", done.A.shape[-2], left_power)
                A, B = again.A[0], again.B[0]
            else:
                A, B = done.A[j], done.B[j]
            out[layer.name] = LoRAFactors(A.to(layer.dtype), B.to(layer.dtype))
    return {name: out[name] for name in prep.layers}
