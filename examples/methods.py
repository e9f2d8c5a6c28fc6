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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from examples.lora import get_factors, lora_layers, merge_updates, reinit_lora, set_factors
from lorafair.aggregate import fedit, ffa_lora, flexlora, flora, lora_fair
from lorafair.metrics import lora_fair_report
from lorafair.types import LoRAFactors

__all__ = [
    "METHODS",
    "ClientUpload",
    "GlobalState",
    "Method",
    "RoundResult",
    "client_start",
    "server_step",
    "trainable_parameters",
]

Method = Literal["fedit", "ffa_lora", "flora", "flexlora", "lora_fair"]
METHODS: tuple[Method, ...] = get_args(Method)
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


def _head_state(head: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def initial_state(model: nn.Module, head: nn.Module) -> GlobalState:
    """The round-0 state: the model's (shared) LoRA initialisation and its fresh head."""
    return GlobalState(get_factors(model), _head_state(head))


def client_start(
    method: Method, model: nn.Module, head: nn.Module, state: GlobalState, *, seed: int
) -> None:
    """Put client-side round-start parameters into ``model`` (in place).

    FLoRA: fresh LoRA (A random from ``seed``, B = 0) on the already-merged base; FFA-LoRA:
    the shared frozen ``A`` and ``B̄``; all others: the downloaded factors. The head is always
    the averaged one.
    """
    if method == "flora":
        reinit_lora(model, torch.Generator().manual_seed(seed))
    else:
        set_factors(model, state.factors)
    head.load_state_dict(state.head)


def trainable_parameters(method: Method, model: nn.Module, head: nn.Module) -> list[nn.Parameter]:
    """LoRA ``A`` and ``B`` plus the head; FFA-LoRA trains only ``B`` (and the head)."""
    params: list[nn.Parameter] = []
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(method != "ffa_lora")
        layer.lora_B.requires_grad_(True)
        if method != "ffa_lora":
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
    """Aggregate ``uploads`` with ``lorafair.aggregate`` and return the next global state.

    FLoRA also merges the stacked update into ``model``'s frozen base weights (the clients'
    merge; the base is shared, so doing it once is the same as every client doing it).
    ``bytes_up`` / ``bytes_down`` sum over the participating clients (LoRA factors only;
    the head, identical for every method, is not counted).
    """
    total_n = sum(u.n for u in uploads)
    p = [u.n / total_n for u in uploads]
    facs = [u.factors for u in uploads]
    head = _average_heads([u.head for u in uploads], p)
    k = len(uploads)
    up = sum(_numel_bytes(f, only_b=method == "ffa_lora") for f in facs)
    diag: dict[str, float] = {}
    if method == "fedit":
        out = fedit(facs, p)
    elif method == "ffa_lora":
        out = ffa_lora(facs, p)
    elif method == "flexlora":
        out = flexlora(facs, p, rank=rank, split=flexlora_split)
    elif method == "lora_fair":
        out = lora_fair(facs, p, lam=lam, residual_on=residual_on)
        if diagnostics:
            diag = _fair_diagnostics(facs, out, p)
    elif method == "flora":
        stacked = flora(facs, p)
        merge_updates(model, stacked)
        down = k * _numel_bytes(stacked, only_b=False)
        # The global model after the merge: base + 0 (fresh B = 0; A is irrelevant).
        zero = {n: LoRAFactors(A, torch.zeros_like(B)) for n, (A, B) in facs[0].items()}
        return RoundResult(GlobalState(zero, head), up, down, diag)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    down = k * _numel_bytes(out, only_b=method == "ffa_lora")
    return RoundResult(GlobalState(out, head), up, down, diag)
