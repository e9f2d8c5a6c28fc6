"""The five methods' client and server sides, in terms of a model carrying :class:`LoRALinear`.

What each method sends and how clients start a round (``p_k`` = client k's share of the data):

========== ============================ ================================ =====================
method     client starts the round from server step (``lorafair``)        per client down/up
========== ============================ ================================ =====================
fedit      ``(Ā, B̄)``                  ``fedit``: ``Σ p_k A_k, Σ p_k B_k``  A+B / A+B
ffa_lora   frozen shared ``A``, ``B̄``   ``ffa_lora``: ``(A, Σ p_k B_k)``     B / B
flora      merged base, fresh LoRA      ``flora``: stacked, merged into W0   K·(A+B) / A+B
flexlora   SVD factors of ``ΔW``        ``flexlora``: rank-r truncated SVD   A+B / A+B
lora_fair  ``(Ā, B̄ + ΔB*)``            ``lora_fair`` (Eq. 8)                A+B / A+B
========== ============================ ================================ =====================

Factors on the wire are the effective ``(A, s·B)`` (see :mod:`examples.lora`), so every
aggregator sees the true update ``ΔW_k = s B_k A_k`` whatever ``alpha`` is.

The server step of every method is ``lorafair.registry.get(aggregator).fn``; what differs per
method on the client side lives in one table, :data:`SIDES` (name → :class:`MethodSide`). A new
method is one registry entry in lorafair and one ``MethodSide`` here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from examples.lora import get_factors, lora_layers, merge_updates, reinit_lora, set_factors
from lorafair import registry
from lorafair.metrics import aggregation_bias, lora_fair_report
from lorafair.types import LoRAFactors

__all__ = [
    "METHODS",
    "SIDES",
    "ClientUpload",
    "GlobalState",
    "Method",
    "MethodSide",
    "RoundResult",
    "ServerOptions",
    "client_start",
    "initial_state",
    "server_step",
    "trainable_parameters",
]

Method = str
"""A key of :data:`SIDES` (``fedit``, ``ffa_lora``, ``flora``, ``flexlora``, ``lora_fair``, ...)."""
Factors = dict[str, LoRAFactors]


@dataclass
class GlobalState:
    """What the server holds between rounds (the base weights live in the model itself).

    ``factors``: the effective ``(A, B_eff)`` every client starts from (unused by FLoRA, whose
    clients start from fresh LoRA on top of the merged base); ``head``: the FedAvg'd head.
    """

    factors: Factors
    head: dict[str, Tensor]


@dataclass
class ClientUpload:
    """One client's reply: its effective factors, head and data size."""

    factors: Factors
    head: dict[str, Tensor]
    n: int


@dataclass
class RoundResult:
    """The server's output for one round."""

    state: GlobalState
    bytes_up: int
    bytes_down: int
    diagnostics: dict[str, float] = field(default_factory=dict)


class ServerOptions(NamedTuple):
    """The run's server-side knobs; each method's ``options`` picks the ones it takes."""

    rank: int
    lam: float = 0.01
    residual_on: Literal["A", "B"] = "B"
    flexlora_split: Literal["balanced", "left"] = "balanced"


StartFn = Callable[[nn.Module, GlobalState, int, int], None]
"""``start(model, state, client, seed)``: put the round-start LoRA factors into ``model``."""
FinishFn = Callable[[nn.Module, Factors, Factors], tuple[Factors, Factors]]
"""``finish(model, aggregated, template)`` → ``(next state's factors, each client's download)``."""


def _start_from_download(model: nn.Module, state: GlobalState, client: int, seed: int) -> None:
    set_factors(model, state.factors)


def _start_fresh(model: nn.Module, state: GlobalState, client: int, seed: int) -> None:
    reinit_lora(model, torch.Generator().manual_seed(seed))


def _keep(model: nn.Module, out: Factors, template: Factors) -> tuple[Factors, Factors]:
    return out, out


def _merge_into_base(model: nn.Module, out: Factors, template: Factors) -> tuple[Factors, Factors]:
    # FLoRA: every client merges the stacked update into its frozen base (the base is shared,
    # so merging once is the same); the global model is then base + 0 (fresh B = 0).
    merge_updates(model, out)
    zero = {n: LoRAFactors(A, torch.zeros_like(B)) for n, (A, B) in template.items()}
    return zero, out


def _no_options(o: ServerOptions) -> dict[str, object]:
    return {}


@dataclass(frozen=True)
class MethodSide:
    """One method in the loop: its lorafair aggregator and what its clients do.

    ``aggregator``: the :mod:`lorafair.registry` name run on the server; ``options``: the
    keyword options it takes from the run's :class:`ServerOptions`; ``start``: how a client's
    round begins; ``trains_a``: whether clients train ``A`` (FFA-LoRA freezes it);
    ``b_only``: only ``B`` travels (up and down); ``finish``: what becomes of the aggregate.
    """

    aggregator: str
    options: Callable[[ServerOptions], dict[str, object]] = _no_options
    start: StartFn = _start_from_download
    trains_a: bool = True
    b_only: bool = False
    finish: FinishFn = _keep


SIDES: Mapping[str, MethodSide] = {
    "fedit": MethodSide("fedit"),
    "ffa_lora": MethodSide("ffa_lora", trains_a=False, b_only=True),
    "flora": MethodSide("flora", start=_start_fresh, finish=_merge_into_base),
    "flexlora": MethodSide(
        "flexlora", options=lambda o: {"rank": o.rank, "split": o.flexlora_split}
    ),
    "lora_fair": MethodSide(
        "lora_fair", options=lambda o: {"lam": o.lam, "residual_on": o.residual_on}
    ),
}
"""The dispatch table: method name → its client side and its server aggregator."""

METHODS: tuple[str, ...] = tuple(SIDES)


def _side(method: str) -> MethodSide:
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
    """Put client-side round-start parameters into ``model`` (in place).

    FLoRA: fresh LoRA (A random from ``seed``, B = 0) on the already-merged base; FFA-LoRA:
    the shared frozen ``A`` and ``B̄``; all others: the downloaded factors. The head is always
    the averaged one.
    """
    _side(method).start(model, state, client, seed)
    head.load_state_dict(state.head)


def trainable_parameters(method: Method, model: nn.Module, head: nn.Module) -> list[nn.Parameter]:
    """LoRA ``A`` and ``B`` plus the head; FFA-LoRA trains only ``B`` (and the head)."""
    trains_a = _side(method).trains_a
    params: list[nn.Parameter] = []
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(trains_a)
        layer.lora_B.requires_grad_(True)
        if trains_a:
            params.append(layer.lora_A)
        params.append(layer.lora_B)
    for p in head.parameters():
        p.requires_grad_(True)
        params.append(p)
    return params


def _numel_bytes(factors: Mapping[str, LoRAFactors], *, only_b: bool) -> int:
    total = 0
    for A, B in factors.values():
        total += B.numel() * B.element_size()
        if not only_b:
            total += A.numel() * A.element_size()
    return total


def _average_heads(heads: Sequence[dict[str, Tensor]], p: Sequence[float]) -> dict[str, Tensor]:
    out = {}
    for k in heads[0]:
        acc = heads[0][k].to(torch.float64) * p[0]
        for h, w in zip(heads[1:], p[1:], strict=True):
            acc += h[k].to(torch.float64) * w
        out[k] = acc.to(heads[0][k].dtype)
    return out


def _bias_diagnostics(uploads: list[Factors], result: Factors, p: list[float]) -> dict[str, float]:
    """``cos(B A, ΔW)`` of the method's own aggregate, mean and min over layers."""
    cos = [r.cosine for r in aggregation_bias(uploads, result, p).values()]
    return {"cos_agg_dW": sum(cos) / len(cos), "min_cos_agg_dW": min(cos)}


def _fair_diagnostics(uploads: list[Factors], result: Factors, p: list[float]) -> dict[str, float]:
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


def server_step(
    method: Method,
    model: nn.Module,
    uploads: Sequence[ClientUpload],
    *,
    rank: int,
    lam: float = 0.01,
    residual_on: Literal["A", "B"] = "B",
    flexlora_split: Literal["balanced", "left"] = "balanced",
    diagnostics: bool = True,
) -> RoundResult:
    """Aggregate ``uploads`` with the method's registry aggregator; the next global state.

    FLoRA also merges the stacked update into ``model``'s frozen base weights (the clients'
    merge; the base is shared, so doing it once is the same as every client doing it).
    ``bytes_up`` / ``bytes_down`` sum over the participating clients (LoRA factors only;
    the head, identical for every method, is not counted). ``diagnostics``: every method's
    ``cos(BA, ΔW)`` of its aggregate (``cos_agg_dW``), and LoRA-FAIR's Table-4 columns.
    """
    side = _side(method)
    spec = registry.get(side.aggregator)
    total_n = sum(u.n for u in uploads)
    p = [u.n / total_n for u in uploads]
    facs = [u.factors for u in uploads]
    head = _average_heads([u.head for u in uploads], p)
    options = {
        **spec.defaults,
        **side.options(ServerOptions(rank, lam, residual_on, flexlora_split)),
    }
    out: Factors = spec.fn(facs, p, **options)
    diag: dict[str, float] = {}
    if diagnostics:
        diag = _bias_diagnostics(facs, out, p)
        if side.aggregator == "lora_fair":
            diag |= _fair_diagnostics(facs, out, p)
    state_factors, download = side.finish(model, out, facs[0])
    k = len(uploads)
    up = sum(_numel_bytes(f, only_b=side.b_only) for f in facs)
    down = k * _numel_bytes(download, only_b=side.b_only)
    return RoundResult(GlobalState(state_factors, head), up, down, diag)
