"""Hypothesis strategies for property-testing federated LoRA aggregators.

Needs ``hypothesis`` (the ``test`` extra)::

    from hypothesis import given
    from lorafair.testing import strategies as lst

    @given(lst.clients_and_weights())
    def test_my_aggregator(cw):
        clients, weights = cw
        ...

Tensor entries are drawn from a seeded ``torch.Generator`` (Hypothesis draws the seed, the
shapes, ranks, scales and structure), which keeps examples fast at realistic sizes; failures
replay exactly from the printed seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from hypothesis import strategies as st

from lorafair.types import LoRAFactors

__all__ = [
    "ClientsAndWeights",
    "SeededClients",
    "clients",
    "clients_and_weights",
    "layer_shapes",
    "ranks",
    "seeded_clients",
    "weights",
]

ClientsAndWeights = tuple[list[dict[str, LoRAFactors]], "list[float] | None"]

_DEFAULT_N_CLIENTS = st.integers(1, 5)
_DEFAULT_N_LAYERS = st.integers(1, 3)


def layer_shapes(*, min_dim: int = 1, max_dim: int = 12) -> st.SearchStrategy[tuple[int, int]]:
    """``(d_out, d_in)`` pairs with both sides in ``[min_dim, max_dim]``."""
    side = st.integers(min_dim, max_dim)
    return st.tuples(side, side)


def ranks(*, min_rank: int = 1, max_rank: int = 4) -> st.SearchStrategy[int]:
    """LoRA ranks in ``[min_rank, max_rank]`` (may exceed one of a layer's dimensions)."""
    return st.integers(min_rank, max_rank)


def weights(
    n_clients: int, *, allow_zero: bool = True, max_value: float = 1000.0
) -> st.SearchStrategy[list[float]]:
    """``n_clients`` non-negative finite weights with a positive sum (zeros allowed if asked)."""
    low = 0.0 if allow_zero else 1e-3
    value = st.floats(low, max_value, allow_nan=False, allow_infinity=False)
    return st.lists(value, min_size=n_clients, max_size=n_clients).filter(lambda ws: sum(ws) > 1e-3)


class SeededClients(NamedTuple):
    """The clients :func:`seeded_clients` drew and the ``torch.Generator`` seed of their entries."""

    seed: int
    clients: list[dict[str, LoRAFactors]]


@st.composite
def seeded_clients(
    draw: st.DrawFn,
    /,
    *,
    n_clients: int | st.SearchStrategy[int] = _DEFAULT_N_CLIENTS,
    n_layers: int | st.SearchStrategy[int] = _DEFAULT_N_LAYERS,
    shapes: st.SearchStrategy[tuple[int, int]] | None = None,
    rank: st.SearchStrategy[int] | None = None,
    equal_ranks: bool = True,
    shared_A: bool = False,
    zero_B: bool = False,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    excess_rank: bool = False,
) -> SeededClients:
    """K clients' adapters with the same layer names ``"layer0"``, ``"layer1"``, ….

    Per layer: a drawn ``(d_out, d_in)`` and rank(s) (one rank for all clients when
    ``equal_ranks``, else one per client); ``shared_A`` gives every client the same ``A``
    (FFA-LoRA's frozen A); ``zero_B`` makes every ``B`` zero (peft's initialisation, ΔW = 0).
    Entries are Gaussian with a per-client scale drawn from 1e-2 … 1e2. A drawn rank above
    both ``d_in`` and ``d_out``, which aggregators reject as a likely A/B swap unless told
    ``allow_excess_rank=True``, is cut to ``max(d_in, d_out)`` unless ``excess_rank``.
    Returned with the seed of the entries, so that a failure can be reported and replayed.
    """
    k = n_clients if isinstance(n_clients, int) else draw(n_clients)
    n = n_layers if isinstance(n_layers, int) else draw(n_layers)
    shapes = shapes if shapes is not None else layer_shapes()
    rank = rank if rank is not None else ranks()
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    scales = [10.0 ** draw(st.integers(-2, 2)) for _ in range(k)]
    out: list[dict[str, LoRAFactors]] = [{} for _ in range(k)]
    for i in range(n):
        d_out, d_in = draw(shapes)
        rs: Sequence[int] = [draw(rank)] * k if equal_ranks else [draw(rank) for _ in range(k)]
        if not excess_rank:
            rs = [min(r, max(d_in, d_out)) for r in rs]
        shared = torch.randn(rs[0], d_in, generator=gen, dtype=torch.float64)
        for c in range(k):
            A = shared if shared_A else torch.randn(rs[c], d_in, generator=gen, dtype=torch.float64)
            B = torch.randn(d_out, rs[c], generator=gen, dtype=torch.float64) * scales[c]
            if zero_B:
                B = torch.zeros_like(B)
            out[c][f"layer{i}"] = LoRAFactors(
                A.to(dtype=dtype, device=device).clone(), B.to(dtype=dtype, device=device)
            )
    return SeededClients(seed, out)


def clients(
    *,
    n_clients: int | st.SearchStrategy[int] = _DEFAULT_N_CLIENTS,
    n_layers: int | st.SearchStrategy[int] = _DEFAULT_N_LAYERS,
    shapes: st.SearchStrategy[tuple[int, int]] | None = None,
    rank: st.SearchStrategy[int] | None = None,
    equal_ranks: bool = True,
    shared_A: bool = False,
    zero_B: bool = False,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    excess_rank: bool = False,
) -> st.SearchStrategy[list[dict[str, LoRAFactors]]]:
    """K clients' adapters with the same layer names ``"layer0"``, ``"layer1"``, …

    :func:`seeded_clients` without the seed (the same options, the same draws).
    """
    return seeded_clients(
        n_clients=n_clients,
        n_layers=n_layers,
        shapes=shapes,
        rank=rank,
        equal_ranks=equal_ranks,
        shared_A=shared_A,
        zero_B=zero_B,
        dtype=dtype,
        device=device,
        excess_rank=excess_rank,
    ).map(_without_seed)


def _without_seed(drawn: SeededClients) -> list[dict[str, LoRAFactors]]:
    return drawn.clients


@st.composite
def clients_and_weights(
    draw: st.DrawFn,
    /,
    *,
    allow_none: bool = True,
    n_clients: int | st.SearchStrategy[int] = _DEFAULT_N_CLIENTS,
    n_layers: int | st.SearchStrategy[int] = _DEFAULT_N_LAYERS,
    shapes: st.SearchStrategy[tuple[int, int]] | None = None,
    rank: st.SearchStrategy[int] | None = None,
    equal_ranks: bool = True,
    shared_A: bool = False,
    zero_B: bool = False,
    dtype: torch.dtype = torch.float64,
) -> ClientsAndWeights:
    """``(clients, weights)`` of matching length (options as in :func:`clients`).

    ``weights`` is ``None`` (equal weights) in some examples when ``allow_none``.
    """
    cs = draw(
        clients(
            n_clients=n_clients,
            n_layers=n_layers,
            shapes=shapes,
            rank=rank,
            equal_ranks=equal_ranks,
            shared_A=shared_A,
            zero_B=zero_B,
            dtype=dtype,
        )
    )
    if allow_none and draw(st.booleans()):
        return cs, None
    return cs, draw(weights(len(cs)))
