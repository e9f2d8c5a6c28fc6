"""Every method's client side, in terms of a model carrying :class:`LoRALinear`.

What each method trains and sends, and how its clients start a round (``p_k`` = client k's
share of the data; ``r_k`` = HetLoRA client k's rank, ``r/4, r/2, r`` in turn):

========== ========================================= ================== =====================
method     client starts the round from               trains             per client down / up
========== ========================================= ================== =====================
fedit      ``(Ā, B̄)``                                A and B            A+B / A+B
ffa_lora   frozen shared ``A``, ``B̄``                 B                  B / B
flora      merged base, fresh LoRA                    A and B            K·(A+B) / A+B
flexlora   SVD factors of ``ΔW``                      A and B            A+B / A+B
lora_fair  ``(Ā, B̄ + ΔB*)``                          A and B            A+B / A+B
fedex_lora ``(Ā, B̄)``, residual folded into W0        A and B            A+B+residual / A+B
fedsa_lora the shared ``Ā`` and its own ``B_k``        A and B            A / A
rolora     the shared factors                         B (even rounds),   the trained one
                                                      A (odd rounds)
hetlora    ``Ā[:r_k], B̄[:, :r_k]``                    A and B at r_k     r_k (A+B) each
fedsvd     ``(A', B')``, A' orthonormal               B                  A+B / B
========== ========================================= ================== =====================

Factors on the wire are the effective ``(A, s·B)`` (see :mod:`examples.lora`), so every
aggregator sees the true update ``ΔW_k = s B_k A_k`` whatever ``alpha`` is.

The server step of every method is ``lorafair.registry.get(name).fn``; what differs per method
on the client side is one row of :data:`SIDES` (name → :class:`ClientSide`). A new method is
one registry entry in lorafair and one ``ClientSide`` here; :func:`examples.loop.run_method`
runs every method the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from examples.lora import get_factors, lora_layers, merge_updates, reinit_lora, set_factors
from lorafair import registry
from lorafair.aggregate import hetlora_truncate, rolora_trained
from lorafair.metrics import aggregation_bias, lora_fair_report
from lorafair.types import FedExResult, FedSAResult, LoRAFactors

__all__ = [
    "METHODS",
    "SIDES",
    "Aggregate",
    "ClientSide",
    "ClientUpload",
    "Finished",
    "GlobalState",
    "Method",
    "Parts",
    "RoundResult",
    "ServerOptions",
    "average_heads",
    "client_start",
    "client_upload",
    "factor_bytes",
    "initial_state",
    "server_step",
    "trainable_parameters",
]

Method = str
"""A key of :data:`SIDES` (``fedit``, ``ffa_lora``, ``flora``, ``flexlora``, ``lora_fair``, ...)."""
Factors = dict[str, LoRAFactors]
Parts = Literal["AB", "A", "B"]
"""Which factors a client trains, or which travel: both, ``A`` only, ``B`` only."""


@dataclass(frozen=True)
class GlobalState:
    """What the server holds between rounds (the base weights live in the model itself).

    ``factors``: the global adapter, the effective ``(A, B_eff)`` clients start from and the
    model that is evaluated (FLoRA's clients start from fresh LoRA on top of the merged base
    instead); ``head``: the FedAvg'd head; ``personal``: client k's own adapter, for methods
    whose clients keep one (FedSA-LoRA), else empty.
    """

    factors: Factors
    head: dict[str, Tensor]
    personal: Mapping[int, Factors] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpload:
    """One client's reply: its effective factors (as it sends them), head and data size."""

    factors: Factors
    head: dict[str, Tensor]
    n: int


@dataclass(frozen=True)
class RoundResult:
    """The server's output for one round."""

    state: GlobalState
    bytes_up: int
    bytes_down: int
    diagnostics: dict[str, float]


class ServerOptions(NamedTuple):
    """The run's server-side knobs; each method's ``options`` picks the ones it takes."""

    rank: int
    lam: float = 0.01
    residual_on: Literal["A", "B"] = "B"
    flexlora_split: Literal["balanced", "left"] = "balanced"
    round_index: int = 0


class Aggregate(NamedTuple):
    """One round's aggregate as ``finish`` sees it.

    ``result``: what the registry's ``fn`` returned; ``update``: the registry's
    ``update_factors`` of it (factors whose ``B @ A`` the clients apply; ``None`` for a
    personalised method); ``uploads`` and ``clients``: who sent what, in the same order.
    """

    result: Any
    update: Factors | None
    uploads: Sequence[ClientUpload]
    clients: Sequence[int]


class Finished(NamedTuple):
    """What becomes of an aggregate: the next global adapter, each participating client's
    download (in the order of the uploads) and the clients' own adapters."""

    factors: Factors
    downloads: list[Factors]
    personal: Mapping[int, Factors]


StartFn = Callable[[nn.Module, GlobalState, int, int], None]
"""``start(model, state, client, seed)``: put the round-start LoRA factors into ``model``."""
UploadFn = Callable[[Factors, int], Factors]
"""``upload(trained factors, client)`` → what the client sends."""
FinishFn = Callable[[nn.Module, Aggregate, GlobalState], Finished]
"""``finish(model, aggregate, state)`` → the next state's parts (may change the base)."""
ReportFn = Callable[[list[Factors], Factors, list[float]], dict[str, float]]
"""``report(uploads, result, p)`` → extra per-round diagnostics of one method."""


def _rank(factors: Mapping[str, LoRAFactors]) -> int:
    return next(iter(factors.values())).A.shape[0]


def _hetlora_rank(client: int, rank: int) -> int:
    """HetLoRA client k's rank: ``r/4, r/2, r`` in turn (at least 1)."""
    return (max(1, rank // 4), max(1, rank // 2), rank)[client % 3]


# ---------------------------------------------------------------------- how a round starts


def _start_from_download(model: nn.Module, state: GlobalState, client: int, seed: int) -> None:
    set_factors(model, state.factors)


def _start_fresh(model: nn.Module, state: GlobalState, client: int, seed: int) -> None:
    reinit_lora(model, torch.Generator().manual_seed(seed))


def _start_personal(model: nn.Module, state: GlobalState, client: int, seed: int) -> None:
    set_factors(model, state.personal.get(client, state.factors))


def _pad_rank(factors: LoRAFactors, rank: int) -> LoRAFactors:
    """``(A, B)`` with zero rows of ``A`` and zero columns of ``B`` appended up to ``rank``."""
    A, B = factors
    return LoRAFactors(
        nn.functional.pad(A, (0, 0, 0, rank - A.shape[0])),
        nn.functional.pad(B, (0, rank - B.shape[1])),
    )


def _start_at_own_rank(model: nn.Module, state: GlobalState, client: int, seed: int) -> None:
    # The model's LoRA layers have the largest rank r; a client of rank r_k loads Ā[:r_k],
    # B̄[:, :r_k] and zeros beyond, whose gradients are exactly zero (both tails are zero), so
    # it trains a rank-r_k adapter.
    full = _rank(state.factors)
    (mine,) = hetlora_truncate(state.factors, [_hetlora_rank(client, full)])
    set_factors(model, {n: _pad_rank(f, full) for n, f in mine.items()})


# ---------------------------------------------------------------------- what is uploaded


def _as_trained(factors: Factors, client: int) -> Factors:
    return factors


def _own_rank(factors: Factors, client: int) -> Factors:
    r = _hetlora_rank(client, _rank(factors))
    return {n: LoRAFactors(A[:r].clone(), B[:, :r].clone()) for n, (A, B) in factors.items()}


# ---------------------------------------------------------------------- what becomes of it


def _keep(model: nn.Module, agg: Aggregate, state: GlobalState) -> Finished:
    assert agg.update is not None
    return Finished(agg.update, [agg.update] * len(agg.uploads), state.personal)


def _merge_into_base(model: nn.Module, agg: Aggregate, state: GlobalState) -> Finished:
    # FLoRA: every client merges the stacked update into its frozen base (the base is shared,
    # so merging once is the same); the global model is then base + 0 (fresh B = 0).
    assert agg.update is not None
    merge_updates(model, agg.update)
    template = agg.uploads[0].factors
    zero = {n: LoRAFactors(A, torch.zeros_like(B)) for n, (A, B) in template.items()}
    return Finished(zero, [agg.update] * len(agg.uploads), state.personal)


def _fold_residual(model: nn.Module, agg: Aggregate, state: GlobalState) -> Finished:
    # FedEx-LoRA: W0 ← W0 + (ΔW − B̄Ā), once for the shared base; clients load (Ā, B̄) and
    # download the adapters and the residual (``update``: the two concatenated).
    assert agg.update is not None
    out: FedExResult = agg.result
    merge_updates(model, out.residual)
    return Finished(out.adapters, [agg.update] * len(agg.uploads), state.personal)


def _keep_personal(model: nn.Module, agg: Aggregate, state: GlobalState) -> Finished:
    # FedSA-LoRA: every client's adapter takes the new shared Ā and keeps its own B; a client
    # that has not trained yet keeps the initial B. Only Ā is downloaded.
    out: FedSAResult = agg.result

    def with_shared(own: Mapping[str, LoRAFactors]) -> Factors:
        return {n: LoRAFactors(A, own[n].B) for n, A in out.shared_A.items()}

    personal = {k: with_shared(own) for k, own in state.personal.items()}
    personal |= {k: with_shared(own) for k, own in zip(agg.clients, out.adapters, strict=True)}
    return Finished(with_shared(state.factors), list(out.adapters), personal)


def _truncate_per_client(model: nn.Module, agg: Aggregate, state: GlobalState) -> Finished:
    # HetLoRA: the global adapter at the largest rank r (zero-padded when no client of rank r
    # took part); client k downloads its leading rank-r_k block.
    assert agg.update is not None
    full = _rank(state.factors)
    padded = {n: _pad_rank(f, full) for n, f in agg.update.items()}
    downloads = [hetlora_truncate(padded, [_hetlora_rank(k, full)])[0] for k in agg.clients]
    return Finished(padded, downloads, state.personal)


# ---------------------------------------------------------------------- diagnostics


def _fair_report(uploads: list[Factors], result: Factors, p: list[float]) -> dict[str, float]:
    """Table 4's columns averaged over layers: cos(B', B̄), cos(B'Ā, ΔW), and FedIT's cos."""
    rep = lora_fair_report(uploads, result, p)
    b_cos = [r.b_cosine for r in rep.values()]
    upd = [r.update_cosine for r in rep.values()]
    fed = [r.fedit_cosine for r in rep.values()]
    n = len(b_cos)
    return {
        "cos_B_prime_B_bar": sum(b_cos) / n,
        "cos_B_prime_A_bar_dW": sum(upd) / n,
        "fedit_cos_B_bar_A_bar_dW": sum(fed) / n,
        "min_cos_B_prime_A_bar_dW": min(upd),
    }


def _both(round_index: int) -> Parts:
    return "AB"


def _b_only(round_index: int) -> Parts:
    return "B"


def _no_options(o: ServerOptions) -> dict[str, object]:
    return {}


@dataclass(frozen=True)
class ClientSide:
    """One method in the loop: its lorafair aggregator and what its clients do.

    ``aggregator``: the :mod:`lorafair.registry` name run on the server; ``options``: the
    keyword options it takes from the run's :class:`ServerOptions`; ``start``: how a client's
    round begins; ``trains``: which factors clients train in a round; ``upload``: what a
    client sends of what it trained; ``up`` / ``down``: which factors travel (``None``: those
    it trains); ``finish``: what becomes of the aggregate; ``report``: extra diagnostics.
    """

    aggregator: str
    options: Callable[[ServerOptions], dict[str, object]] = _no_options
    start: StartFn = _start_from_download
    trains: Callable[[int], Parts] = _both
    upload: UploadFn = _as_trained
    up: Parts | None = None
    down: Parts | None = "AB"
    finish: FinishFn = _keep
    report: ReportFn | None = None


SIDES: Mapping[str, ClientSide] = MappingProxyType(
    {
        "fedit": ClientSide("fedit"),
        "ffa_lora": ClientSide("ffa_lora", trains=_b_only, down="B"),
        "flora": ClientSide("flora", start=_start_fresh, finish=_merge_into_base),
        "flexlora": ClientSide(
            "flexlora", options=lambda o: {"rank": o.rank, "split": o.flexlora_split}
        ),
        "lora_fair": ClientSide(
            "lora_fair",
            options=lambda o: {"lam": o.lam, "residual_on": o.residual_on},
            report=_fair_report,
        ),
        "fedex_lora": ClientSide("fedex_lora", finish=_fold_residual),
        "fedsa_lora": ClientSide(
            "fedsa_lora", start=_start_personal, up="A", down="A", finish=_keep_personal
        ),
        "rolora": ClientSide(
            "rolora",
            options=lambda o: {"trained": rolora_trained(o.round_index)},
            trains=rolora_trained,
            down=None,
        ),
        "hetlora": ClientSide(
            "hetlora", start=_start_at_own_rank, upload=_own_rank, finish=_truncate_per_client
        ),
        "fedsvd": ClientSide("fedsvd", trains=_b_only),
    }
)
"""The dispatch table: method name → its client side and its server aggregator."""

METHODS: tuple[str, ...] = tuple(SIDES)


def _side(method: str) -> ClientSide:
    try:
        return SIDES[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(SIDES)}") from None


def _head_state(head: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def initial_state(model: nn.Module, head: nn.Module) -> GlobalState:
    """The round-0 state: the model's (shared) LoRA initialisation and its fresh head."""
    return GlobalState(get_factors(model), _head_state(head))


def client_start(
    method: Method,
    model: nn.Module,
    head: nn.Module,
    state: GlobalState,
    *,
    seed: int,
    client: int = 0,
) -> None:
    """Put client ``client``'s round-start parameters into ``model`` (in place).

    The method's ``start`` (FLoRA: fresh LoRA, A random from ``seed``, B = 0, on the
    already-merged base; FedSA-LoRA: the client's own adapter; HetLoRA: the global adapter's
    leading rank-``r_k`` block; all others: the downloaded factors). The head is always the
    averaged one.
    """
    _side(method).start(model, state, client, seed)
    head.load_state_dict(state.head)


def trainable_parameters(
    method: Method, model: nn.Module, head: nn.Module, *, round_index: int = 0
) -> list[nn.Parameter]:
    """The LoRA factors the method trains in round ``round_index``, plus the head."""
    parts = _side(method).trains(round_index)
    train_a, train_b = "A" in parts, "B" in parts
    params: list[nn.Parameter] = []
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(train_a)
        layer.lora_B.requires_grad_(train_b)
        params += [q for q, on in ((layer.lora_A, train_a), (layer.lora_B, train_b)) if on]
    for p in head.parameters():
        p.requires_grad_(True)
        params.append(p)
    return params


def client_upload(
    method: Method, model: nn.Module, head: nn.Module, *, client: int, n: int
) -> ClientUpload:
    """What client ``client`` (``n`` examples) sends after training: factors, head, size."""
    factors = _side(method).upload(get_factors(model), client)
    return ClientUpload(factors, _head_state(head), n)


def factor_bytes(factors: Mapping[str, LoRAFactors], parts: Parts = "AB") -> int:
    """Bytes of the factors in ``parts`` (``"AB"``, ``"A"``, ``"B"``) over every layer."""
    return sum(
        ("A" in parts) * A.numel() * A.element_size()
        + ("B" in parts) * B.numel() * B.element_size()
        for A, B in factors.values()
    )


def average_heads(heads: Sequence[Mapping[str, Tensor]], p: Sequence[float]) -> dict[str, Tensor]:
    """FedAvg of the heads, ``Σ p_k head_k`` per tensor, accumulated in float64."""
    out = {}
    for k in heads[0]:
        acc = heads[0][k].to(torch.float64) * p[0]
        for h, w in zip(heads[1:], p[1:], strict=True):
            acc += h[k].to(torch.float64) * w
        out[k] = acc.to(heads[0][k].dtype)
    return out


def _mean_update(adapters: Sequence[Factors], p: Sequence[float]) -> Factors:
    """``Σ p_k B_k A_k`` of per-client adapters as one factored pair (ranks concatenated)."""
    return {
        n: LoRAFactors(
            torch.cat([a[n].A for a in adapters], dim=0),
            torch.cat([w * a[n].B for a, w in zip(adapters, p, strict=True)], dim=1),
        )
        for n in adapters[0]
    }


def _bias(uploads: list[Factors], update: Factors, p: list[float]) -> dict[str, float]:
    """``cos(B A, ΔW)`` of a method's update, mean and min over layers."""
    cos = [r.cosine for r in aggregation_bias(uploads, update, p).values()]
    return {"cos_agg_dW": sum(cos) / len(cos), "min_cos_agg_dW": min(cos)}


def server_step(
    method: Method,
    model: nn.Module,
    state: GlobalState,
    uploads: Sequence[ClientUpload],
    clients: Sequence[int],
    options: ServerOptions,
) -> RoundResult:
    """Aggregate ``uploads`` (from ``clients``) with the method's registry aggregator.

    ``finish`` may change ``model``'s frozen base weights (FLoRA, FedEx-LoRA: the clients'
    merge; the base is shared, so doing it once is the same as every client doing it).
    ``bytes_up`` / ``bytes_down`` sum over the participating clients (LoRA factors only; the
    head, identical for every method, is not counted). ``diagnostics``, the same for every
    method: ``cos(BA, ΔW)`` of the update its clients apply (the registry's
    ``update_factors``; for a personalised method the data-weighted mean of its clients' next
    adapters), mean (``cos_agg_dW``) and min over layers; plus the method's ``report``.
    """
    side = _side(method)
    spec = registry.get(side.aggregator)
    total_n = sum(u.n for u in uploads)
    p = [u.n / total_n for u in uploads]
    facs = [u.factors for u in uploads]
    out = spec.fn(facs, p, **{**spec.defaults, **side.options(options)})
    update = None if spec.update_factors is None else spec.update_factors(out)
    finished = side.finish(model, Aggregate(out, update, uploads, clients), state)
    if update is None:
        update = _mean_update([finished.personal[k] for k in clients], p)
    diagnostics = _bias(facs, update, p)
    if side.report is not None:
        diagnostics |= side.report(facs, update, p)
    trained = side.trains(options.round_index)
    up = sum(factor_bytes(f, side.up or trained) for f in facs)
    down = sum(factor_bytes(f, side.down or trained) for f in finished.downloads)
    head = average_heads([u.head for u in uploads], p)
    return RoundResult(
        GlobalState(finished.factors, head, finished.personal), up, down, diagnostics
    )
