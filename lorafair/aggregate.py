"""Server-side aggregators for federated LoRA.

Every aggregator takes the K clients' adapters ``clients[k][layer] = (A_k, B_k)`` with ``A_k`` of
shape (r_k, d_in) and ``B_k`` of shape (d_out, r_k), optional non-negative ``weights`` (normalised
to ``p_k = w_k / Σ w_j``; ``None`` means ``p_k = 1/K``), keyword-only options, and returns a new
``dict[str, LoRAFactors]`` in the first client's layer order, on the inputs' device and dtype
(except :func:`fedex_lora`, which returns a :class:`FedExResult` with the residual for the
frozen weights, and the personalised :func:`fedsa_lora`, which returns a :class:`FedSAResult`
with one adapter per client). Inputs are validated once (see :mod:`lorafair.errors`) and never
mutated; a result that does not fit the output dtype raises
:class:`~lorafair.errors.DtypeOverflowError` (one rule for every method, ``lorafair._fit``).
A rank above both ``d_in`` and ``d_out`` is rejected as a likely A/B swap (A must be
(r, d_in), B (d_out, r)); every aggregator takes ``allow_excess_rank=True`` to accept such a
rank on purpose. Every aggregator runs its call with torch's intra-op pool pinned to one thread
(restored after), except the compute-bound NumPy products (the float64 Grams' ``syrk`` and
LoRA-FAIR's ``P_u coef``) to which the thread policy gives more (one rule,
:func:`lorafair._threads.threads_for`: a thread per 2²⁵ flops of one kernel, at most the
process's pool and the cores free for it; results are the same to the bit on any number of
threads; :mod:`lorafair._threads` says why and what it costs).

The ideal global update of a layer is ``ΔW = Σ_k p_k B_k A_k``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from lorafair import _average, _heap, _linalg, _stacks
from lorafair._exact import fedex_lora, fedsvd
from lorafair._fair import (
    AdaptersAndSolutions,
    ResidualSolution,
    lora_fair,
    lora_fair_solved,
    solve_residual,
)
from lorafair._fit import fits_dtype
from lorafair._frozen import check_factor, check_tolerances, same_bits, shared_factor
from lorafair._hetero import hetlora, hetlora_truncate
from lorafair._personal import fedsa_lora
from lorafair._rank import EnergyThreshold, check_policy, choose_rank, energy_kept
from lorafair._threads import (
    single_threaded,
    split_map,
    torch_pool_for,
    torch_single_threaded,
)
from lorafair._validate import (
    Layer,
    chunked,
    group_by_shape,
    packed,
    prepare,
    raise_if_nonfinite,
    stacked_batch,
)
from lorafair.errors import LoRAFairError
from lorafair.types import FedExResult, FedSAResult, FlexLoRAReport, LoRAFactors, RankChoice

__all__ = [
    "AdaptersAndSolutions",
    "EnergyThreshold",
    "FedExResult",
    "FedSAResult",
    "FlexLoRAReport",
    "RankChoice",
    "ResidualSolution",
    "fedex_lora",
    "fedit",
    "fedsa_lora",
    "fedsvd",
    "ffa_lora",
    "flexlora",
    "flexlora_report",
    "flora",
    "hetlora",
    "hetlora_truncate",
    "lora_fair",
    "lora_fair_solved",
    "rolora",
    "rolora_trained",
    "solve_residual",
]

_Clients = Sequence[Mapping[str, "LoRAFactors | tuple[Tensor, Tensor]"]]

# Working-set budget of one batched solve: large enough to amortise per-call overhead over
# many layers, small enough that peak memory does not scale with the number of layers.
_BATCH_BYTES = 1 << 28


@torch_single_threaded
@fits_dtype(bounded=True)
def fedit(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
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
    prep = prepare(
        clients,
        weights,
        equal_ranks=True,
        check_finite=False,
        allow_excess_rank=allow_excess_rank,
    )
    layers = list(prep.layers.values())
    sums = _average.weighted_sums([la.As for la in layers] + [la.Bs for la in layers], prep.weights)
    _average.check(_average.nonfinite_flag(sums), prep.layers)
    n = len(layers)
    return {la.name: LoRAFactors(sums[i], sums[n + i]) for i, la in enumerate(layers)}


def _max_drift(copies: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Per client k ≥ 1: ``max |X_k − X_0|`` of every layer's frozen factor X, two list-wide calls.

    A drift ≤ ``atol`` passes ``torch.allclose`` whatever ``rtol``; only layers above it (rare:
    FFA-LoRA's clients share the frozen factor bit for bit) need the exact test. NaN propagates.
    """
    X0s = [xs[0] for xs in copies]
    out = []
    for k in range(1, len(copies[0])):
        diff = torch._foreach_sub([xs[k] for xs in copies], X0s)
        out.append(torch.stack(list(torch._foreach_norm(diff, float("inf")))))
    return out


@torch_single_threaded
@fits_dtype(bounded=True)
def ffa_lora(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    frozen: Literal["A", "B"] = "A",
    rtol: float = 1e-5,
    atol: float = 1e-8,
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """FFA-LoRA: one factor is frozen and shared by every client; only the other is averaged.

    With ``frozen="A"`` (FFA-LoRA, the default) returns ``(A, Σ p_k B_k)`` where ``A`` is the
    common ``A_k`` (client 0's, copied), so ``B̄ A = Σ p_k B_k A = ΔW`` exactly. With
    ``frozen="B"`` returns ``(Σ p_k A_k, B)``, and ``B Ā = ΔW`` exactly too. Raises
    :class:`FrozenAMismatchError` (``FrozenBMismatchError`` for ``frozen="B"``) naming the layer
    and client when some client's frozen factor differs from client 0's beyond
    ``|X_k − X_0| ≤ atol + rtol·|X_0|`` elementwise.

    Cost: O(K r (d_in + d_out)) flops (the check reads every frozen factor once), one host
    synchronisation per call. Download: the averaged factor only, r·d_out (``frozen="A"``) or
    r·d_in (``frozen="B"``) per layer; clients keep their copy of the frozen one.
    """
    prep = prepare(
        clients,
        weights,
        equal_ranks=True,
        check_finite=False,
        allow_excess_rank=allow_excess_rank,
    )
    check_tolerances(rtol, atol)
    which = check_factor(frozen)
    layers = list(prep.layers.values())
    copies = [la.As if which == "A" else la.Bs for la in layers]
    averaged = _average.weighted_sums(
        [la.Bs if which == "A" else la.As for la in layers], prep.weights
    )
    kept = [xs[0].clone() for xs in copies]
    # the layers whose frozen copies may differ (or hold NaN); the exact test (shared_factor,
    # torch.allclose) then decides for those layers only. On the CPU, same_bits compares each
    # copy's bytes with client 0's (one memcmp) and answers on the host at no cost: bit-equal
    # copies (FFA-LoRA's normal case) pass whatever the tolerances. Elsewhere the drift
    # ``max |X_k − X_0|`` of all layers comes back with the call's single host check; a drift
    # ≤ atol passes.
    on_cpu = all(la.device.type == "cpu" for la in layers)
    suspects: list[int] = []
    if on_cpu:
        suspects = [
            j for j, xs in enumerate(copies) if not all(same_bits(x, xs[0]) for x in xs[1:])
        ]
    drift = _max_drift(copies) if len(prep.weights) > 1 and not on_cpu else []
    beyond = [~(d <= atol) for d in drift]
    host = _average.check(
        _average.nonfinite_flag(averaged + kept),
        prep.layers,
        torch.stack(beyond) if beyond else None,
    )
    suspects += [j % len(layers) for j, bad in enumerate(host) if bad]
    if suspects:  # a NaN/Inf copy also differs: name it as non-finite before any mismatch
        raise_if_nonfinite(prep.layers)
        for j in sorted(set(suspects)):
            shared_factor(layers[j], which, rtol=rtol, atol=atol, method="FFA-LoRA/RoLoRA")
    return {
        la.name: LoRAFactors(X, Y) if which == "A" else LoRAFactors(Y, X)
        for la, X, Y in zip(layers, kept, averaged, strict=True)
    }


def rolora_trained(round_index: int) -> Literal["A", "B"]:
    """RoLoRA's schedule: the factor clients train in round ``round_index`` (0-based).

    Even rounds train ``B`` (A frozen), odd rounds train ``A`` (B frozen). ``B`` comes first
    because peft initialises ``B = 0``, where the gradient of ``A`` vanishes.
    """
    if isinstance(round_index, bool) or not isinstance(round_index, int) or round_index < 0:
        raise LoRAFairError(f"round_index must be an int >= 0, got {round_index!r}")
    return "B" if round_index % 2 == 0 else "A"


@torch_single_threaded
@fits_dtype(bounded=True)
def rolora(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    trained: Literal["A", "B"] = "B",
    rtol: float = 1e-5,
    atol: float = 1e-8,
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """RoLoRA: alternating rounds; average the factor trained this round, keep the shared other.

    In a round where clients train ``B`` on a shared frozen ``A`` (``trained="B"``) returns
    ``(A, Σ p_k B_k)``; in a round where they train ``A`` on a shared frozen ``B``
    (``trained="A"``) returns ``(Σ p_k A_k, B)``. Either way ``B @ A = ΔW`` exactly, because the
    frozen factor is common. This is :func:`ffa_lora` with ``frozen`` the other factor;
    :func:`rolora_trained` gives the schedule (B in even rounds, A in odd ones). Raises
    ``FrozenAMismatchError`` / ``FrozenBMismatchError`` when the frozen factor differs between
    clients (tolerances as in :func:`ffa_lora`).

    Cost: O(K r (d_in + d_out)) flops. Download: only the trained factor, r·d_out (B rounds)
    or r·d_in (A rounds) per layer. Clients load it, keep their frozen factor, and train the
    other factor next round.
    """
    which = check_factor(trained)
    return ffa_lora(
        clients,
        weights,
        frozen="A" if which == "B" else "B",
        rtol=rtol,
        atol=atol,
        allow_excess_rank=allow_excess_rank,
    )


@torch_single_threaded
@fits_dtype(copies=True)
def flora(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """FLoRA: stack all clients' factors along the rank axis.

    Returns ``A = cat_k(p_k A_k)`` of shape (Σ r_k, d_in) and ``B = cat_k(B_k)`` of shape
    (d_out, Σ r_k), so ``B @ A = Σ p_k B_k A_k = ΔW`` exactly (up to rounding of ``p_k A_k``).
    Ranks may differ between clients. Clients merge ``B @ A`` into their frozen weights and
    re-initialise their LoRA factors.

    Cost: O(K r d_in) flops plus copies: one read of the input, one write of the output (which is
    as large), a read of each layer's output while it is in cache for the NaN/Inf flag, one host
    synchronisation per call.
    Download Σ r_k (d_in + d_out) per layer (K× FedIT's).
    """
    prep = prepare(
        clients,
        weights,
        equal_ranks=False,
        check_finite=False,
        allow_excess_rank=allow_excess_rank,
    )
    p = prep.weights

    out: dict[str, LoRAFactors] = {}
    sums: list[Tensor] = []
    for name, layer in prep.layers.items():
        with torch_pool_for(_layer_bytes(layer)):  # the thread policy: the layer's bytes its work
            A_s = torch.empty(sum(layer.ranks), layer.d_in, dtype=layer.dtype, device=layer.device)
            start = 0
            for A, w in zip(layer.As, p, strict=True):
                torch.mul(A, w, out=A_s[start : start + A.shape[0]])
                start += A.shape[0]
            B_s = torch.cat(layer.Bs, dim=1)
            # the NaN/Inf flag reads each output while it is still in cache, not in a pass after
            sums += [A_s.sum(), B_s.sum()]
        out[name] = LoRAFactors(A_s, B_s)
    _average.check(_average.nonfinite_flag(sums), prep.layers)
    return out


Route = Literal["gram", "qr", "dense", "dense_top"]

# The cost model's constants, measured on the 2-core CPU of benchmarks/README.md (one thread, one
# ViT-B/16 layer, K·r = 480, 960, 1600): the Gram route's two R × R eigensolves (R³) overtake the
# QR route's thin QRs (whose cost stops growing at R = d) past R ≈ 512, and forming ΔW densely
# and taking its full SVD wins only from about twice the flop crossover d_in d_out / (d_in + d_out).
_GRAM_MAX_R = 512
_DENSE_OVER_CROSSOVER = 2.0
_LARGE_CORE = 8.0
"""Beyond R = 512, the Gram route's R³ term's weight in the cost model (see :func:`_route`;
measured with ``python docs/scripts/flexlora_routes.py crossover``)."""


_RETAINED = 0.5
"""On the Gram route, the call's resident growth, in input bytes, beyond which the memory freed
by earlier chunks is handed back where the cores change thread (:mod:`lorafair._heap`). On one
Llama-3-8B block, bf16, K = 50, r = 16 (every layer on the Gram route, the cores of the
1024 × 4096 layers on the workers and the others alone on the caller's thread), ``python -m
lorafair.bench --preset llama3_8b --blocks 1 -K 50 -r 16 --dtype bfloat16 --methods flexlora
--memory`` gave a peak growth of 0.53–0.79× the input in three fresh-process runs; without
the hand-back (this constant set to infinity), 1.32 and 1.39× in two. A larger share comes
too late: the chunk of the two 1024 × 4096 layers adds about half the input on
top of what the earlier chunks left."""


def _layer_bytes(layer: Layer) -> int:
    """The input bytes of one layer: every client's ``A_k`` and ``B_k``."""
    return _average.item_bytes(layer.As) + _average.item_bytes(layer.Bs)


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


def _dense_top_flops(d_out: int, d_in: int, R: int, rank: int) -> float:
    """:func:`_linalg.dense_top_svd`'s flops: form ΔW, the smaller Gram (syrk), the iteration and
    the certificate's Cholesky."""
    n, m = min(d_out, d_in), max(d_out, d_in)
    p = _linalg.top_block(rank)
    return (
        2.0 * d_in * d_out * R
        + n * n * m
        + 2.0 * (_linalg._TOP_ITERATIONS + 2) * n * n * p
        + n**3 / 3
    )


def _route(d_out: int, d_in: int, R: int, dtype: torch.dtype, rank: int | None) -> Route:
    """Cost model: the Gram, QR, dense or dense_top route of one shape (see :func:`flexlora`).

    ``rank`` is the fixed number of triplets kept, or ``None`` when every σ is needed (an
    :class:`EnergyThreshold` rank or :func:`flexlora_report`). Flops: Gram
    ``(d_in + d_out)R²`` (two ``syrk`` Grams) ``+ O(R³)`` (the R × R core), QR
    ``O((d_in + d_out) R min(d, R))`` (thin QRs, then an R × R core SVD), dense
    ``2 d_in d_out R + O(d_in d_out min(d_in, d_out))`` (form ΔW, then its full SVD), dense_top
    :func:`_dense_top_flops` (form ΔW, its n × n Gram, a few (n × n)(n × p) products, one n × n
    Cholesky; n = min(d_in, d_out), p = 2·rank + 8). Rule:

    - for a fixed rank, narrow dtypes (float32/float16/bfloat16: dense_top's certificate
      cannot hold for float64) and ``p ≤ n/2``: dense_top when its flops are below the Gram
      route's ``(d_in + d_out)R² + c R³``, else Gram when ``R > 512``. Up to R = 512,
      ``c = 13/3`` (the core ``PᵀG_bP``, two R³ products, and the Cholesky of G_a; consistent
      with the measured times at R = 288 and 480 on ViT-B/16 shapes, where the Gram route is
      2–4× faster); beyond, ``c = 8`` (the large core's eigensolves run below the GEMM rate),
      which picks the faster of the two routes at each of 24 measured points (Llama-3-8B's
      1024 × 4096 and three ViT-B/16 shapes, R = 480–1600, ranks 16 and 64; the one tie,
      1024 × 4096 at R = 1024, 181 against 182 ms, it gives to dense_top): ``python
      docs/scripts/flexlora_routes.py crossover``. ``c = 18``, calibrated when the core ran
      full eigensolves, sent the 1024 × 4096 layers to dense_top at R = 800 (171 ms against
      92 on the Gram route), and the 2304 × 768 and 3072 × 768 layers at R = 640 (86 and 91
      against 60); ``c = 13/3`` sent 1024 × 4096 at R = 1280, rank 64, and those two at
      R = 800 to the Gram route (349 against 241; 154 and 160 against 84 and 111 ms).
      Before, every R > 512 took dense_top: on Llama-3-8B's 14336 × 4096 layers at
      R = 800 that formed ΔW and its 4096² Gram, 24× the Gram route's flops (one block at
      K = 50, r = 16, bfloat16: ``python -m lorafair.bench --preset llama3_8b --blocks 1
      -K 50 -r 16 --dtype bfloat16 --methods flexlora``, 14× faster than before);
    - otherwise dense once ``R ≥ 2 · d_in d_out / (d_in + d_out)`` (1152 for a 2304 × 768 layer,
      768 for 768 × 768); Gram for narrow dtypes while ``R ≤ 512``; otherwise QR (always for
      float64, whose Gram route would not be as accurate as the input).
    """
    narrow = dtype != torch.float64
    if narrow and rank is not None and 2 * _linalg.top_block(rank) <= min(d_out, d_in):
        core = 13 / 3 if R <= _GRAM_MAX_R else _LARGE_CORE
        gram = (d_in + d_out) * R * R + core * float(R) ** 3
        if _dense_top_flops(d_out, d_in, R, rank) < gram:
            return "dense_top"
        if R > _GRAM_MAX_R:
            return "gram"  # long layers: the Grams beat forming d_out × d_in
    crossover = d_in * d_out / (d_in + d_out)
    if R / crossover >= _DENSE_OVER_CROSSOVER:
        return "dense"
    if narrow and R <= _GRAM_MAX_R:
        return "gram"
    return "qr"


class _Pending(NamedTuple):
    """One batch whose result waits for the call's single host check: per layer ``A[j]`` and
    ``B[j]`` (one batched float64 tensor, or, from :func:`_gram_route_host`, a list already in
    the layer's dtype) and, where every σ was computed, its singular values ``S[j]`` (for
    :func:`flexlora_report`)."""

    layers: list[Layer]
    A: Tensor | list[Tensor]
    B: Tensor | list[Tensor]
    route: Route
    ok: Tensor | None  # per layer: the route's own check passed (None: a route without one)
    bad: Tensor  # per layer: a non-finite input
    S: Tensor | None = None


def _row_weights(p: Sequence[float], layer: Layer) -> Tensor:
    """``d`` (R,) float64: ``p_k`` repeated ``r_k`` times, so ``A_s = diag(d) Â``."""
    return torch.tensor(
        [w for w, r in zip(p, layer.ranks, strict=True) for _ in range(r)],
        dtype=torch.float64,
        device=layer.device,
    )


class _GramSolved(NamedTuple):
    """The Gram route's result for one batch: the core (``Vh_core`` already times ``D``, so
    ``Vh = Vh_core Â``), per-layer non-finite flags, and the route's own check per layer."""

    core: _linalg.GramCore
    bad: Tensor
    ok: Tensor


def _gram_route(
    batch: list[Layer], p: Sequence[float], M_a: Tensor, G_b: Tensor, rank: int
) -> _GramSolved:
    """The Gram route from the unweighted ``M_a = Â Âᵀ`` and ``G_b = B_sᵀ B_s``: the weights
    ``p_k`` enter through the R × R Gram, ``A_s = D Â`` with ``D = diag(d)``:
    ``G_a = D M_a D``. NaN/Inf are read off the traces; the check is κ within the route's limit
    (and the top triplets' certificate where only ``rank`` > 0 are computed). No host sync.
    Overwrites ``M_a`` (with ``G_a``) and ``G_b``: the caller's fresh Grams, so that a layer's
    R × R work holds two fewer R × R matrices (at K = 20, r = 64, 13 MB each)."""
    first = batch[0]
    d = _row_weights(p, first)
    G_a = M_a.mul_(d.unsqueeze(-1)).mul_(d.unsqueeze(-2))
    tr_a = G_a.diagonal(dim1=-2, dim2=-1).sum(-1)
    tr_b = G_b.diagonal(dim1=-2, dim2=-1).sum(-1)
    # ‖A_s‖²·‖B_s‖² is non-finite iff some input is (no overflow: inputs ≤ 3.4e38 here)
    bad = ~torch.isfinite(tr_a * tr_b)
    keep = (~bad).to(G_a.dtype).reshape(-1, 1, 1)
    G_a, G_b = G_a.nan_to_num_().mul_(keep), G_b.nan_to_num_().mul_(keep)
    dw2 = (G_a * G_b).sum(dim=(-2, -1))  # ‖ΔW‖_F² = tr(G_a G_b)
    limit = _gram_kappa_limit(first.dtype, first.d_out, first.d_in, sum(first.ranks))
    gram_ok = tr_a * tr_b <= limit * limit * dw2
    core = _linalg.gram_core(G_a, G_b, rank, _unit_roundoff(first.dtype))
    if core.certified is not None:
        gram_ok = gram_ok & core.certified
    return _GramSolved(core._replace(Vh_core=core.Vh_core * d), bad, gram_ok)


_CORE_BYTES = 1 << 22
"""The Grams of one :class:`_CoreJob` (4 MiB, at least one layer): a chunk's groups are cut
into jobs this size, so that the R × R work alive at once, a few times its Grams per worker,
stays a fraction of the chunk's, and the workers get several jobs even from one group."""


class _CoreJob(NamedTuple):
    """One group's R × R core on :func:`_gram_route_host`: its layers, the top triplets it
    computes (0: every one) and its Grams."""

    batch: list[Layer]
    rank: int
    M_a: Tensor
    G_b: Tensor

    @property
    def flops(self) -> float:
        """Its O(R³) work: about 30 R³ per layer (the Gram root, the top eigenpairs' subspace
        iteration and certificate, the cores' products), an estimate for the thread policy."""
        return 30.0 * len(self.batch) * float(self.M_a.shape[-1]) ** 3


class _CoreDone(NamedTuple):
    """One group's R × R core on :func:`_gram_route_host`, as the products need it: the checks
    of :class:`_GramSolved`, the singular values, and per layer the rank kept and its split
    cores (``b_core`` R × k, ``a_core`` k × R, k at most that rank)."""

    ok: Tensor
    bad: Tensor
    S: Tensor
    ranks: list[int]  # per layer: the rank kept (its result is zero-padded to it)
    cores: list[_linalg.SplitCores]


class _LayerCores(NamedTuple):
    """One layer's products on :func:`_gram_route_host`: its split cores, and the rank its
    result is zero-padded to."""

    layer: Layer
    cores: _linalg.SplitCores
    rank: int

    @property
    def nbytes(self) -> int:
        """Its float64 results: ``A`` (k × d_in) and ``Bᵀ`` (k × d_out)."""
        return 8 * int(self.cores.a_core.shape[-2]) * (self.layer.d_in + self.layer.d_out)


def _host_factors(todo: list[_LayerCores]) -> list[LoRAFactors]:
    """Per layer ``B = B_s b_core`` and ``A = a_core Â`` in the layer's dtype, padded to its
    rank, from :func:`lorafair._stacks.products`: in order, in batches of at most
    ``_stacks.GRAM_BYTES`` of float64 results (at least one layer), each batch's layers side
    by side. The bound matters where the rank kept nears R (an :class:`EnergyThreshold`): then
    the float64 results weigh as much as float64 stacks of the input. Cost ``2 k R d`` flops
    per side and layer."""
    out: list[LoRAFactors] = []
    for span in packed([t.nbytes for t in todo], _stacks.GRAM_BYTES):
        batch = todo[span.start : span.stop]
        items: list[_stacks.Product] = []
        for t in batch:
            k = t.cores.a_core.shape[-2]
            B_t = np.empty((k, t.layer.d_out))  # Bᵀ: the long dimension last
            A = np.empty((k, t.layer.d_in))
            items.append(_stacks.Product(t.layer, "B", t.cores.b_core.mT.numpy(), B_t))
            items.append(_stacks.Product(t.layer, "A", t.cores.a_core.numpy(), A))
        _stacks.products(items)
        for j, t in enumerate(batch):
            B_t, A = items[2 * j].out, items[2 * j + 1].out
            out.append(
                LoRAFactors(
                    _output(_linalg.pad(torch.from_numpy(A), -2, t.rank), t.layer.dtype),
                    _output(_linalg.pad(torch.from_numpy(B_t).mT, -1, t.rank), t.layer.dtype),
                )
            )
    return out


_KeptRank = Callable[[Layer, Tensor], int]
"""The rank kept for a layer, given its descending singular values."""


def _job_layers(R: int) -> int:
    """Layers of rank sum R in one core job of :func:`_gram_route_host` (``_CORE_BYTES`` of
    Grams, at least one)."""
    return max(1, _CORE_BYTES // (16 * R * R))


def _core_jobs(chunk: Sequence[_stacks.Slice]) -> int:
    """How many core jobs :func:`_gram_route_host` makes of ``chunk``."""
    return sum(-(-len(part.layers) // _job_layers(sum(part.layers[0].ranks))) for part in chunk)


def _gram_route_host(
    groups: list[list[Layer]],
    ranks: list[int],
    p: Sequence[float],
    left_power: float,
    kept_rank: _KeptRank,
) -> list[_Pending]:
    """The Gram route for groups of CPU layers, never stacking a layer whole: the Grams from
    :func:`lorafair._stacks.grams` (every layer of every group side by side, in column blocks),
    the R × R core as :func:`_gram_route` (the top ``ranks[g]`` triplets of group g, or every
    one for 0), then per layer the rank ``kept_rank`` keeps, ``B = B_s b_core`` and
    ``A = a_core Â`` from :func:`lorafair._stacks.products` (again all layers side by side).
    Casts each input twice (Grams, products) into small per-worker buffers, so the call holds
    no d × R float64 stack, and returns the factors in the layers' dtype (:func:`_host_factors`:
    at most 32 MiB of float64 results at a time; a layer that fails its check is redone from
    its clients). The cores run in jobs of at most ``_CORE_BYTES`` of Grams side by side. A
    layer's rank may come from its σ (:class:`EnergyThreshold`): they are on the host already,
    so it costs no round trip."""
    jobs: list[_CoreJob] = []
    for batch, rank, (M_a, G_b) in zip(groups, ranks, _stacks.grams(groups), strict=True):
        n = _job_layers(M_a.shape[-1])
        jobs += [
            _CoreJob(batch[i : i + n], rank, M_a[i : i + n], G_b[i : i + n])
            for i in range(0, len(batch), n)
        ]

    def core(_: None, job: _CoreJob) -> _CoreDone:
        sol = _gram_route(job.batch, p, job.M_a, job.G_b, job.rank)  # overwrites the Grams
        c = sol.core
        ks = [kept_rank(layer, S) for layer, S in zip(job.batch, c.S, strict=True)]
        if min(ks) == max(ks):  # one rank for the group: its cores in one batched step
            both = _linalg.split_cores(c.S, c.U_core, c.Vh_core, ks[0], left_power)
            cores = [_linalg.SplitCores(*pair) for pair in zip(*both, strict=True)]
        else:
            cores = [
                _linalg.split_cores(c.S[i], c.U_core[i], c.Vh_core[i], k, left_power)
                for i, k in enumerate(ks)
            ]
        return _CoreDone(sol.ok, sol.bad, c.S, ks, cores)  # not the core: its R × R factors go now

    # the thread policy: the jobs' R × R cores side by side (one Llama-3-8B block, bf16,
    # K = 20, r = 16, one job per group: flexlora 166-169 → 149-152 ms, `python -m
    # benchmarks.against --commit 904877c --methods flexlora`)
    work = sum(job.flops for job in jobs) / max(1, len(jobs))
    results = split_map(core, jobs, scratch=lambda: None, flops=work)
    todo = [
        _LayerCores(layer, cores, k)
        for job, done in zip(jobs, results, strict=True)
        for layer, cores, k in zip(job.batch, done.cores, done.ranks, strict=True)
    ]
    factors = iter(_host_factors(todo))
    pending = []
    for job, done in zip(jobs, results, strict=True):
        mine = [next(factors) for _ in job.batch]
        A, B = [f.A for f in mine], [f.B for f in mine]
        pending.append(_Pending(job.batch, A, B, "gram", done.ok, done.bad, done.S))
    return pending


def _flexlora_svd(
    batch: list[Layer],
    p: Sequence[float],
    route: Route,
    rank: int = 0,
    left_power: float = 0.5,
) -> tuple[_linalg.FactoredSVD, Tensor, Tensor | None]:
    """Every triplet of each layer of one same-shaped batch, by ``route`` (the top ``rank`` where
    ``rank`` > 0 on the Gram route, and always on dense_top); with per-layer non-finite flags and
    the route's own check per layer (Gram: κ within the route's limit, and the top triplets'
    certificate; dense_top: the certificate; ``None`` for the others). No host sync. The Gram
    route here is the one for accelerators and for a CPU layer redone alone; a call's CPU
    layers take :func:`_gram_route_host`, which never stacks them."""
    gram_ok = None
    if route == "gram":
        # unweighted float64 stacks (one cast-copy per factor); the weights p_k enter through the
        # R × R Gram, A_s = D Â with D = diag(p_k repeated r_k times): G_a = D (Â Âᵀ) D
        A_u, B_s = stacked_batch(batch, None, torch.float64)
        sol = _gram_route(batch, p, *_linalg.grams(B_s, A_u), rank)
        svd = _linalg.FactoredSVD(sol.core.S, B_s, sol.core.U_core, sol.core.Vh_core, A_u)
        bad, gram_ok = sol.bad, sol.ok
    elif route == "dense_top":  # non-finite inputs read off tr G (see dense_top_svd)
        A_s, B_s = stacked_batch(batch, p, torch.float64)
        top = _linalg.dense_top_svd(B_s, A_s, rank, _unit_roundoff(batch[0].dtype))
        return top.svd, ~top.finite, top.certified
    else:
        A_s, B_s = stacked_batch(batch, p, torch.float64)
        bad = ~(torch.isfinite(A_s).flatten(1).all(1) & torch.isfinite(B_s).flatten(1).all(1))
        keep = (~bad).to(A_s.dtype).reshape(-1, 1, 1)
        A_s, B_s = torch.nan_to_num(A_s) * keep, torch.nan_to_num(B_s) * keep
        ea, eb = _far_exponent(A_s), _far_exponent(B_s)
        A_s, B_s = torch.ldexp(A_s, -ea), torch.ldexp(B_s, -eb)
        svd = _linalg.qr_svd(B_s, A_s) if route == "qr" else _linalg.dense_svd(B_s, A_s)
        svd = _unscale(svd, (ea + eb).double(), left_power)
    return svd, bad, gram_ok


def _far_exponent(t: Tensor) -> Tensor:
    """Per layer of ``t`` (L, m, n): the binary exponent of its largest entry where that lies
    outside ``[2⁻¹²⁸, 2¹²⁸]`` (float64 input near its limits), else 0; shape (L, 1, 1), int.

    Scaling by ``2^-e`` (exact) keeps the QR route's core and the dense route's products within
    float64's range; inputs of float32's range are left as they are (``e = 0``), bit for bit.
    """
    e = torch.frexp(t.abs().amax(dim=(-2, -1), keepdim=True))[1]
    return torch.where(e.abs() > 128, e, torch.zeros_like(e))


def _unscale(svd: _linalg.FactoredSVD, e: Tensor, left_power: float) -> _linalg.FactoredSVD:
    """The SVD of ``2^e`` times the one given, with the scale on its outer factors, not on S:
    ``2^(e p)`` on ``left`` and ``2^(e (1 − p))`` on ``right`` for ``split``'s power ``p``, so the
    split factors are the unscaled ones and ``S`` (read only through ratios: ranks, energy) never
    overflows. ``e = 0`` returns ``svd`` unchanged."""
    x = e * left_power
    k = x.floor()
    left = torch.ldexp(svd.left, k.to(torch.int64)) * torch.exp2(x - k)
    y = e - x
    k = y.floor()
    right = torch.ldexp(svd.right, k.to(torch.int64)) * torch.exp2(y - k)
    return svd._replace(left=left, right=right)


def _output(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A result factor: ``t`` in the inputs' dtype, contiguous (``split`` may give a view)."""
    return t.to(dtype, memory_format=torch.contiguous_format)


def _layer(svd: _linalg.FactoredSVD, i: int) -> _linalg.FactoredSVD:
    return _linalg.FactoredSVD(*(t[i] for t in svd))


@fits_dtype()
def flexlora(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    rank: int | EnergyThreshold | None = None,
    split: Literal["balanced", "left"] = "balanced",
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """FlexLoRA: the best rank-``rank`` approximation of ``ΔW``, as LoRA factors.

    With the truncated SVD ``ΔW ≈ U_r S_r V_rᵀ`` (Eckart–Young optimal in Frobenius and spectral
    norm), returns for ``split="balanced"`` ``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_rᵀ`` (both
    factors of equal scale), and for ``split="left"`` FederatedScope's ``B = U_r S_r``,
    ``A = V_rᵀ``. ``B @ A`` is the same either way. ``rank`` defaults to the clients' largest
    rank; ranks may differ between clients. If ``rank`` exceeds the numerical rank of ``ΔW`` the
    extra components are zero rows/columns, so shapes are always (rank, d_in) / (d_out, rank).
    ``rank=EnergyThreshold(τ)`` keeps, per layer, the fewest components whose ``Σ σ_i²`` reaches
    ``τ ‖ΔW‖_F²`` (FLoRIST's rule), so layers may get different ranks;
    :func:`flexlora_report` returns the rank and energy each layer kept.

    With the stacked factors ``B_s`` (d_out, R), ``A_s`` (R, d_in), R = Σ r_k, ``ΔW = B_s A_s``.
    Per group of same-shaped layers a stated cost model (``_route``) picks one of:

    - **Gram** (float32/float16/bfloat16 inputs): the float64 Grams ``A_s A_sᵀ`` and ``B_sᵀ B_s``
      and two R × R eigendecompositions give every triplet; U and V then cost one
      (d × R)(R × rank) product each. For a fixed rank once R ≥ 4·(2·rank + 8) (R ≥ 160 at
      rank 16), the second, of the core, is replaced by the top ``rank`` eigenpairs from six
      steps of certified subspace iteration (``_linalg.top_eigh``, as on dense_top below); a
      layer without the certificate is redone with the full eigendecomposition. Its float64
      error, ``(d + R)·u₆₄·κ²`` relative with ``κ = ‖B_s‖_F‖A_s‖_F / ‖ΔW‖_F``, stays below the
      inputs' own rounding ``u_in·κ`` while ``κ ≤ u_in / ((d + R)·u₆₄)`` (1.7·10⁵ for float32
      ViT layers; the certified top triplets add at most ``u_in·‖ΔW‖_F``): a layer whose clients
      cancel more than that is redone by the QR route.
    - **QR** (float64 inputs, and R > 512 where every σ is needed): thin QRs of ``B_s`` and
      ``A_sᵀ`` and an R × R core SVD, accurate however much the clients cancel.
    - **dense_top** (a fixed int rank, narrow dtypes, large R: R > 512, or where its flops are
      the lower): form ``ΔW`` in float64 one layer at a time, its Gram on the smaller side
      (n × n, n = min(d_in, d_out)), and only the top ``rank`` triplets by six steps of block
      subspace iteration (block 2·rank + 8) and Rayleigh–Ritz; the result is the projection
      ``ΔW V_r V_rᵀ``. A per-layer certificate (a residual bound and an n × n Cholesky that
      proves no other eigenvalue lies above the cut; ``_linalg.dense_top_svd``) proves that
      ``‖ΔW − BA‖_F`` exceeds the optimum ``√Σ_{i>rank} σ_i²`` by at most ``u_in·‖ΔW‖_F``,
      the squaring's and the forming of ΔW's float64 rounding included (the latter certifies
      only layers with ``‖B_s‖‖A_s‖/‖ΔW‖ ≤ u_in/(4R·u₆₄)``). Without it (no gap at
      ``rank``, a spectrum too flat for six steps) the CPU takes the full ``eigh`` of the
      same Gram, certified with no gap from its residual (``_linalg.full_top_eigh``); a layer
      still uncertified (ΔW nearly of rank ≤ ``rank``; elsewhere than the CPU, any) is redone
      by the route the rule below takes when every σ is needed. Cost
      ``2 d_in d_out R + n² max(d_in, d_out) + O(n² rank + n³/3)``: one dense product plus
      about 40% of it (ViT-B/16) instead of a full SVD.
    - **dense** (large R, every σ needed or float64 inputs): form ``ΔW`` one layer at a time and
      take its SVD, once R is twice the flop crossover ``d_in d_out / (d_in + d_out)``
      (measured; 1152 for a 2304 × 768 layer). Between R = 512 and that point the QR route is
      taken (the Gram route's R × R eigensolves cost more there).

    Layers are processed in float64 batches whose working set is capped at 256 MiB
    (one layer per batch on the dense route). On the CPU the Gram route never stacks a layer:
    each worker casts a layer's factors into its own float64 buffer, a column block at a time
    for the Grams (BLAS ``syrk``) and one client's factor at a time for the output products
    (:mod:`lorafair._stacks`), and the layers go through in chunks of at most 32 MiB of Grams.
    So peak memory does not grow with the number of layers; NaN/Inf are read off the Grams'
    traces (or the stacks) and a fixed-rank call synchronises with the host once. The call runs
    on one thread of torch's and NumPy's pools, except the Gram route's cast-copies, Grams,
    R × R cores and products on the CPU, which run layers side by side on the threads the thread
    policy gives them (:mod:`lorafair._threads`: a thread per millisecond of work, e.g. at LLM
    scale; the result is the same to the bit on any number of threads). Cost:
    O((d_out + d_in) R² + R³) flops per layer on the factored routes, with O(R²) memory per
    layer on the CPU's Gram route (plus a worker's buffer) and O((d_out + d_in) R) on the
    others; O(d_out d_in (R + min(d_out, d_in))) flops and one d_out × d_in buffer (plus a few
    n × n on dense_top) on the dense ones.
    :func:`flexlora_report` and ``EnergyThreshold`` ranks need every σ and never take
    dense_top.
    Download: rank·(d_in + d_out) per layer.
    """
    return _flexlora(
        clients, weights, rank=rank, split=split, report=False, allow_excess_rank=allow_excess_rank
    ).adapters


@fits_dtype()
def flexlora_report(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    rank: int | EnergyThreshold | None = None,
    split: Literal["balanced", "left"] = "balanced",
    allow_excess_rank: bool = False,
) -> FlexLoRAReport:
    """:func:`flexlora`'s adapters plus, per layer, the rank it kept and the energy kept.

    ``ranks[name] = RankChoice(rank, energy)`` with ``energy = Σ_{i≤rank} σ_i² / ‖ΔW‖_F²``
    (1.0 for ``ΔW = 0``). Same math and options as :func:`flexlora`; with a fixed int rank it
    computes every singular vector of the R × R core (not only the kept ones) to measure the
    energy, O((d_out + d_in) R²) more flops.
    """
    return _flexlora(
        clients, weights, rank=rank, split=split, report=True, allow_excess_rank=allow_excess_rank
    )


@single_threaded()  # torch's pool and NumPy's (the Gram route's syrk)
def _flexlora(
    clients: _Clients,
    weights: Sequence[float] | None,
    *,
    rank: int | EnergyThreshold | None,
    split: Literal["balanced", "left"],
    report: bool,
    allow_excess_rank: bool,
) -> FlexLoRAReport:
    if split not in ("balanced", "left"):
        raise LoRAFairError(f"split must be 'balanced' or 'left', got {split!r}")
    check_policy(rank)
    prep = prepare(
        clients,
        weights,
        equal_ranks=False,
        check_finite=False,
        allow_excess_rank=allow_excess_rank,
    )
    p = prep.weights
    left_power = 0.5 if split == "balanced" else 1.0
    # A rank chosen per layer (energy) or reported needs every σ on the host: off the CPU's
    # Gram route (whose σ are on the host already) one round trip per batch; otherwise one for
    # the whole call.
    per_layer = report or isinstance(rank, EnergyThreshold)
    out: dict[str, LoRAFactors] = {}
    chosen: dict[str, RankChoice] = {}
    pending: list[_Pending] = []

    def fixed(layer: Layer) -> int:
        """The rank kept for ``layer`` where it does not depend on σ."""
        return rank if isinstance(rank, int) else max(layer.ranks)

    def kept_rank(layer: Layer, S: Tensor) -> int:
        """The rank kept for ``layer``, given its descending singular values ``S``."""
        return choose_rank(rank, S) if isinstance(rank, EnergyThreshold) else fixed(layer)

    def finish(layer: Layer, svd: _linalg.FactoredSVD) -> None:
        k = kept_rank(layer, svd.S)
        B, A = _linalg.split(svd, k, left_power)
        if report:
            chosen[layer.name] = RankChoice(k, energy_kept(svd.S, k))
        out[layer.name] = LoRAFactors(_output(A, layer.dtype), _output(B, layer.dtype))

    def redo(layer: Layer, route: Route, top: bool) -> _linalg.FactoredSVD:
        """An exact route for a layer that failed ``route``'s own check: for dense_top, the route
        the cost model takes where every σ is needed; for the Gram route with ``top`` triplets
        only, the full Gram route if its κ is within the limit; otherwise the QR route (accurate
        however much clients cancel)."""
        if route == "dense_top":
            route = _route(layer.d_out, layer.d_in, sum(layer.ranks), layer.dtype, None)
            if route != "gram":
                return _layer(_flexlora_svd([layer], p, route, left_power=left_power)[0], 0)
            top = True  # the full Gram route, κ permitting
        if top:
            svd, bad, ok = _flexlora_svd([layer], p, "gram")
            if ok is not None and _average.check([bad.any()], prep.layers, ok)[0]:
                return _layer(svd, 0)
        return _layer(_flexlora_svd([layer], p, "qr", left_power=left_power)[0], 0)

    def kept(layer: Layer) -> int | None:
        """The fixed number of triplets kept, or None when every σ is needed."""
        return None if per_layer else fixed(layer)

    groups = group_by_shape(list(prep.layers.values()))
    routes = [
        _route(g[0].d_out, g[0].d_in, sum(g[0].ranks), g[0].dtype, kept(g[0])) for g in groups
    ]
    # the Gram route on the CPU: all its groups side by side, chunk by chunk (at most
    # _stacks.GRAM_BYTES of Grams at a time), no float64 stacks; its checks wait for the call's
    # one host round trip below, as the fixed-rank routes' do
    host = [
        i
        for i, (g, route) in enumerate(zip(groups, routes, strict=True))
        if route == "gram" and g[0].device.type == "cpu"
    ]
    targets = [kept(groups[i][0]) or 0 for i in host]
    # the memory earlier chunks freed but their threads' allocator arenas keep (_heap) goes
    # back where the cores change thread (one job: the caller's; several: the workers'), once
    # the call has grown by _RETAINED times its input
    start = _heap.resident() if host else 0
    limit = start + _RETAINED * sum(map(_layer_bytes, prep.layers.values())) if start else 0
    alone: bool | None = None  # the previous chunk's cores ran alone on the caller's thread
    for chunk in _stacks.chunks([groups[i] for i in host]):  # bounded memory
        lone = _core_jobs(chunk) == 1
        if start and alone is not None and lone != alone:
            _heap.release_beyond(int(limit))
        alone = lone
        pending += _gram_route_host(
            [part.layers for part in chunk],
            [targets[part.group] for part in chunk],
            p,
            left_power,
            kept_rank,
        )
    groups = [g for i, g in enumerate(groups) if i not in host]
    routes = [r for i, r in enumerate(routes) if i not in host]
    if host and groups:  # the workers' freed Gram-route memory, before the stacks (_heap)
        _heap.release()
    for group, route in zip(groups, routes, strict=True):
        first = group[0]
        R = sum(first.ranks)
        # float64 stacks plus two d × R companions (QR bases, or the output products)
        dense = route in ("dense", "dense_top")
        size = _BATCH_BYTES if dense else 3 * 8 * (first.d_out + first.d_in) * R
        for batch in chunked(group, size, _BATCH_BYTES):  # dense: one layer at a time
            target = kept(first)
            svd, bad, route_ok = _flexlora_svd(batch, p, route, target or 0, left_power)
            if target is None:
                ok = _average.check([bad.any()], prep.layers, route_ok)
                for j, layer in enumerate(batch):
                    finish(layer, redo(layer, route, False) if ok and not ok[j] else _layer(svd, j))
                continue
            B, A = _linalg.split(svd, target, left_power)
            pending.append(_Pending(batch, A, B, route, route_ok, bad))
    if pending:  # the call's one host round trip: non-finite input, checks per layer
        oks = [d.ok for d in pending if d.ok is not None]
        bad_any = torch.cat([d.bad for d in pending]).any()
        ok = _average.check([bad_any], prep.layers, torch.cat(oks) if oks else None)
        i = 0
        for done in pending:
            for j, layer in enumerate(done.layers):
                if done.ok is not None and not ok[(i := i + 1) - 1]:
                    # top triplets only (a fixed rank): the full Gram route may still hold
                    finish(layer, redo(layer, done.route, kept(layer) is not None))
                    continue
                A, B = done.A[j], done.B[j]
                out[layer.name] = LoRAFactors(_output(A, layer.dtype), _output(B, layer.dtype))
                if report and done.S is not None:
                    k = A.shape[-2]
                    chosen[layer.name] = RankChoice(k, energy_kept(done.S[j], k))
    adapters = {name: out[name] for name in prep.layers}
    ranks = {name: chosen[name] for name in prep.layers} if report else {}
    return FlexLoRAReport(adapters, ranks)
