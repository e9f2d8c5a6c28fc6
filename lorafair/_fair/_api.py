"""LoRA-FAIR (Eq. 8): the server's residual correction of FedIT, solved exactly and factored.

The public entry points (:func:`lora_fair`, :func:`solve_residual`, re-exported by
:mod:`lorafair.aggregate`); their options are checked in :mod:`._options`. Each similarity is
one :class:`_Form` in ``_FORMS``; see :mod:`lorafair._fair` for the package's layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from lorafair import _stacks
from lorafair._fair._batch import _build_group, _corrected, _delta, _Group, _Residuals
from lorafair._fair._columns import solve_columns
from lorafair._fair._flat import _solve_flat
from lorafair._fair._options import Norm, ResidualOn, Similarity, _check_options, _Options
from lorafair._fair._scale import far_float64, solve_scaled
from lorafair._fit import fits_dtype
from lorafair._threads import single_threaded
from lorafair._validate import Prepared, group_by_shape, prepare
from lorafair.types import LoRAFactors

__all__ = ["ResidualSolution", "lora_fair", "solve_residual"]


_Clients = Sequence[Mapping[str, "LoRAFactors | tuple[Tensor, Tensor]"]]


class ResidualSolution(NamedTuple):
    """The solved residual of one layer.

    ``delta``: ``ΔB*`` (d_out, r) for ``residual_on="B"``, ``ΔA*`` (r, d_in) for ``"A"``, in the
    inputs' dtype. ``objective``: ``1 − cosine + λ·reg(delta)`` at ``delta`` (float64).
    ``cosine``: the similarity used (``"flat"`` or ``"columns"``) between the corrected product
    and ``ΔW``, 0.0 where either is zero. ``iterations``: solver iterations of the returned
    start (0 for closed-form cases). ``converged``: whether that start met ``tol``.
    """

    delta: Tensor
    objective: float
    cosine: float
    iterations: int
    converged: bool


class _Form(Protocol):
    """One similarity's solver: every same-shape group's residuals, in the groups' order.

    It checks the inputs for NaN/Inf itself (:func:`prepare` skips that, so the flat form can
    read it off its Grams) and returns ΔB = 0 unless beaten; ``single``: one client.
    """

    def __call__(
        self, groups: list[_Group], opts: _Options, single: bool, prep: Prepared
    ) -> list[_Residuals]: ...


_FORMS: dict[Similarity, _Form] = {"flat": _solve_flat, "columns": solve_columns}
"""The forms, by ``similarity``: :mod:`._flat` and :mod:`._columns`."""


def _run(
    clients: _Clients, weights: Sequence[float] | None, opts: _Options, allow_excess_rank: bool
) -> tuple[list[_Group], list[_Residuals]]:
    prep = prepare(
        clients, weights, equal_ranks=False, check_finite=False, allow_excess_rank=allow_excess_rank
    )
    single = prep.n_clients == 1
    groups: list[_Group] = []
    solved: list[_Residuals] = []
    # bounded memory: the layers in chunks of at most _stacks.GRAM_BYTES of Grams, each solved
    # and left with its small results (ViT-B/16 at K = 6 or one Llama-3-8B block: one chunk)
    for chunk in _stacks.chunks(group_by_shape(list(prep.layers.values()))):
        part = [_build_group(s.layers, prep.weights) for s in chunk]
        groups += part
        solved += _FORMS[opts.similarity](part, opts, single, prep)
    return groups, solved


def _unbatch(
    clients: _Clients, groups: list[_Group], solved: list[_Residuals]
) -> dict[str, tuple[_Group, _Residuals, int]]:
    where: dict[str, tuple[_Group, _Residuals, int]] = {}
    for grp, sol in zip(groups, solved, strict=True):
        for i, name in enumerate(grp.names):
            where[name] = (grp, sol, i)
    order = list(clients[0].keys())
    return {name: where[name] for name in order}


def solve_residual(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    lam: float = 0.01,
    norm: Norm = "fro",
    similarity: Similarity = "flat",
    residual_on: ResidualOn = "B",
    tol: float = 1e-8,
    max_iter: int = 500,
    allow_excess_rank: bool = False,
) -> dict[str, ResidualSolution]:
    """Solve LoRA-FAIR's residual problem (Eq. 8) per layer; see :func:`lora_fair` for the math.

    Returns, per layer, the residual ``ΔB*`` (or ``ΔA*``) with its objective, the achieved
    cosine, the iteration count and a convergence flag (one host sync for the whole call).

    >>> import torch
    >>> c0 = {"fc": (torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]]))}
    >>> c1 = {"fc": (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]]))}
    >>> sol = solve_residual([c0, c1], lam=0.0)["fc"]
    >>> round(sol.cosine, 6)  # λ = 0 reaches the projection bound ‖ΔW Ā⁺Ā‖ / ‖ΔW‖ = 1/√2
    0.707107
    """
    opts = _check_options(lam, norm, similarity, residual_on, tol, max_iter)
    with single_threaded():
        groups, solved = _run(clients, weights, opts, allow_excess_rank)
        return _solutions(clients, groups, solved, opts)


def _solutions(
    clients: _Clients, groups: list[_Group], solved: list[_Residuals], opts: _Options
) -> dict[str, ResidualSolution]:
    host = [
        (
            s.objective.cpu().tolist(),
            s.cosine.cpu().tolist(),
            s.iterations.cpu().tolist(),
            s.converged.cpu().tolist(),
        )
        for s in solved
    ]
    out: dict[str, ResidualSolution] = {}
    index = {id(s): h for s, h in zip(solved, host, strict=True)}
    deltas = {
        id(s): _delta(g, s, opts).to(g.dtype, memory_format=torch.contiguous_format)
        for g, s in zip(groups, solved, strict=True)
    }
    for name, (_, sol, i) in _unbatch(clients, groups, solved).items():
        obj, cos, it, cv = index[id(sol)]
        out[name] = ResidualSolution(
            deltas[id(sol)][i], float(obj[i]), float(cos[i]), int(it[i]), bool(cv[i])
        )
    return out


@fits_dtype()
def lora_fair(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    lam: float = 0.01,
    norm: Norm = "fro",
    similarity: Similarity = "flat",
    residual_on: ResidualOn = "B",
    tol: float = 1e-8,
    max_iter: int = 500,
    allow_excess_rank: bool = False,
) -> dict[str, LoRAFactors]:
    """LoRA-FAIR: FedIT's average with the residual correction of Eq. 8, solved to ``tol``.

    Returns ``(Ā, B̄ + ΔB*)`` per layer (``residual_on="A"``: ``(Ā + ΔA*, B̄)``), where
    ``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k``, ``ΔW = Σ p_k B_k A_k`` and

        ΔB* = argmin_ΔB  1 − S(ΔW, (B̄ + ΔB) Ā) + λ·reg(ΔB),

    ``reg = ‖ΔB‖_F`` (``norm="fro"``, the paper) or ``‖ΔB‖_F²`` (``"fro_squared"``, public
    re-implementations); ``S`` the flattened cosine (``similarity="flat"``, the paper's text)
    or the mean over the d_in columns of the per-column cosine (``"columns"``, what
    ``F.cosine_similarity(ΔW, B'Ā, dim=0).mean()`` computes). A cosine with a zero side is 0.

    Method (flat): with ``G = ĀĀᵀ = V diag(g) Vᵀ`` and ``H = ΔW Āᵀ``, every stationary point
    has ``B'V`` columns ``(a (HV)_i + (B̄V)_i)/(1 + k g_i)`` for two scalars ``a``, ``k`` per
    layer, and along that family the objective needs only ``g_i``, ``‖(HV)_i‖²``,
    ``<(HV)_i, (B̄V)_i>``, ``‖(B̄V)_i‖²``, which come from ``r × r`` Grams. All layers sharing r
    are solved at once (a grid, then damped Newton on the two unknowns with closed-form
    derivatives), each answer is certified stationary for the full problem or re-solved by a
    general ``r × 3`` Newton solver from three starts (FedIT, the λ = 0 solution, their
    midpoint), and ``ΔB = 0`` is returned unless beaten, so the result is never worse than
    FedIT on this objective; a zero residual returns FedIT's factors bit for bit. λ = 0 is
    solved in closed form (the cosine-maximising ``B'`` closest to ``B̄``, reaching the bound
    ``‖ΔW Ā⁺Ā‖/‖ΔW‖``). Where the best value is only approached as the product vanishes (the
    λ = 0 end with ``B'Ā → 0``), a fixed rule goes as close to the infimum as the output
    dtype's rounding allows. ``"columns"`` iterates in an orthonormal basis of ``span(B_s)``
    (∋ ``B̄``) plus r spare directions (≤ ``(K+1) r`` rows): multi-start Newton (four
    starts), restricted problems where columns vanish, and for ``λ > 0`` the λ = 0 problem too
    (the whole product vanishing). ``residual_on="A"`` solves the transposed problem. Clients
    of different ranks are zero-padded to the largest rank (so ``Ā``, ``B̄`` and the result have
    that rank); a rank above both ``d_in`` and ``d_out`` is rejected as a likely A/B swap unless
    ``allow_excess_rank=True``. One
    client: FedIT is exact and ``ΔB* = 0``. ``ΔW = 0``: ``ΔB* = 0``. Details:
    ``docs/lora_fair.md``.

    Cost (flat, per layer, r = rank, R = Σ r_k): O((d_out + d_in) R²) flops for two float64
    ``R × R`` Grams of the stacked factors (float64 inputs: ``H`` and ``B̄`` explicitly plus a
    thin QR for ``‖ΔW‖``), O(R² r + r³) for the small algebra, O(r) per point of the family
    solve, O(d_out R r) for the answer; memory two ``R × R`` Grams per layer and one layer's
    float64 factors at a time. Nothing of size d_out × d_in. Reductions in float64; results in
    the inputs' dtype.

    >>> import torch
    >>> c0 = {"fc": (torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]]))}
    >>> c1 = {"fc": (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]]))}
    >>> A, B = lora_fair([c0, c1])["fc"]
    >>> A.shape, B.shape
    (torch.Size([1, 2]), torch.Size([2, 1]))
    """
    opts = _check_options(lam, norm, similarity, residual_on, tol, max_iter)

    def solve(
        clients: _Clients, weights: Sequence[float] | None, opts: _Options
    ) -> dict[str, LoRAFactors]:
        groups, solved = _run(clients, weights, opts, allow_excess_rank)
        return _factors(clients, groups, solved, opts)

    with single_threaded():
        if far_float64(clients):  # float64 factors near its limits: see ._scale
            return solve_scaled(solve, clients, weights, opts, allow_excess_rank)
        return solve(clients, weights, opts)


def _factors(
    clients: _Clients, groups: list[_Group], solved: list[_Residuals], opts: _Options
) -> dict[str, LoRAFactors]:
    out: dict[str, LoRAFactors] = {}
    fixed: dict[int, Tensor] = {}
    moved: dict[int, Tensor] = {}
    for grp, sol, factor in zip(groups, solved, _corrected(groups, solved, opts), strict=True):
        moved[id(sol)] = factor
        fixed[id(sol)] = (grp.A_acc if opts.residual_on == "B" else grp.B_acc).to(grp.dtype)
    for name, (_, sol, i) in _unbatch(clients, groups, solved).items():
        if opts.residual_on == "B":
            out[name] = LoRAFactors(fixed[id(sol)][i], moved[id(sol)][i])
        else:
            out[name] = LoRAFactors(moved[id(sol)][i], fixed[id(sol)][i])
    return out


class AdaptersAndSolutions(NamedTuple):
    """:func:`lora_fair`'s output and :func:`solve_residual`'s solutions, from one solve."""

    adapters: dict[str, LoRAFactors]
    solutions: dict[str, ResidualSolution]


def lora_fair_solved(
    clients: _Clients,
    weights: Sequence[float] | None = None,
    *,
    lam: float = 0.01,
    norm: Norm = "fro",
    similarity: Similarity = "flat",
    residual_on: ResidualOn = "B",
    tol: float = 1e-8,
    max_iter: int = 500,
    allow_excess_rank: bool = False,
) -> AdaptersAndSolutions:
    """``lora_fair(...)`` and ``solve_residual(...)`` of the same call, solving the problem once.

    ``adapters`` equals :func:`lora_fair`'s result bit for bit and ``solutions`` equals
    :func:`solve_residual`'s; for callers (the Flower strategy) that need both every round.
    Cost: one solve, as :func:`lora_fair`.
    """
    opts = _check_options(lam, norm, similarity, residual_on, tol, max_iter)
    with single_threaded():
        groups, solved = _run(clients, weights, opts, allow_excess_rank)
        return AdaptersAndSolutions(
            _factors(clients, groups, solved, opts), _solutions(clients, groups, solved, opts)
        )
