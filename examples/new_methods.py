"""Client sides of issue 16's methods, one class per method, and a loop that runs them.

========== ======================================= ============================ ================
method     client starts the round from             trains                        down / up
========== ======================================= ============================ ================
fedex_lora ``(Ā, B̄)``, residual folded into W0     A and B                       A+B+residual / A+B
fedsa_lora the shared ``Ā`` and its own local B_k   A and B (evaluated per client) A / A
rolora     the shared factors                       B in even rounds, A in odd     the trained one
hetlora    ``Ā[:r_k], B̄[:, :r_k]``, r_k ∈ {r/4, r/2, r} A and B at rank r_k        r_k (A+B) each
fedsvd     ``(A', B')``, A' orthonormal             B only (A' frozen)             A+B / B
========== ======================================= ============================ ================

Every factor here is the effective ``(A, s·B)`` of :mod:`examples.lora`. Each method is a
:class:`ClientSide` (round start, what is trained, what is uploaded, the server step, how the
model is evaluated); :data:`CLIENT_SIDES` maps the method name to it, and :func:`run_new_method`
runs the same rounds, seeds and data order as :func:`examples.loop.run_method`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol, get_args

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from examples.data import ClientData
from examples.loop import FedConfig, MethodResult, evaluate, local_train
from examples.lora import get_factors, lora_layers, merge_updates, set_factors
from examples.methods import _average_heads
from lorafair.aggregate import (
    fedex_lora,
    fedsa_lora,
    fedsvd,
    hetlora,
    hetlora_truncate,
    rolora,
    rolora_trained,
)
from lorafair.types import LoRAFactors

__all__ = ["CLIENT_SIDES", "NEW_METHODS", "ClientSide", "NewMethod", "run_new_method"]

log = logging.getLogger("examples.federated")

NewMethod = Literal["fedex_lora", "fedsa_lora", "rolora", "hetlora", "fedsvd"]
NEW_METHODS: tuple[NewMethod, ...] = get_args(NewMethod)
Factors = dict[str, LoRAFactors]
Tests = Mapping[str, Dataset[tuple[Tensor, Tensor]]]


def _bytes(factors: Mapping[str, LoRAFactors], *, A: bool = True, B: bool = True) -> int:
    return sum(
        (a.numel() * a.element_size() if A else 0) + (b.numel() * b.element_size() if B else 0)
        for a, b in factors.values()
    )


def _eval_global(model: nn.Module, tests: Tests, cfg: FedConfig) -> dict[str, float]:
    return evaluate(
        model, tests, device=cfg.device, batch_size=cfg.eval_batch_size, workers=cfg.workers
    )


class ClientSide(Protocol):
    """One method's client and server behaviour inside :func:`run_new_method`."""

    def start(self, model: nn.Module, k: int, t: int) -> None:
        """Load client ``k``'s round-``t`` starting factors into ``model``."""

    def trains(self, t: int) -> tuple[bool, bool]:
        """Whether ``A`` and ``B`` are trained in round ``t``."""

    def upload(self, factors: Factors, k: int) -> Factors:
        """What client ``k`` sends, from its trained effective factors."""

    def server(
        self, model: nn.Module, uploads: Sequence[Factors], chosen: Sequence[int], p: list[float]
    ) -> tuple[int, int]:
        """Aggregate (may change ``model``'s base weights); returns (bytes up, bytes down)."""

    def evaluate(
        self, model: nn.Module, tests: Tests, clients: Sequence[ClientData], cfg: FedConfig
    ) -> dict[str, float]:
        """Accuracy (%) per domain and ``"avg"`` after the round."""


class FedExClientSide:
    """FedEx-LoRA: load ``(Ā, B̄)``; the residual ``ΔW − B̄Ā`` is folded into the frozen base.

    The base is shared by every client, so folding it once into the server's model is what
    every client does on download. The global model's update is then exactly ``ΔW``.
    """

    def __init__(self, initial: Factors) -> None:
        self.factors = initial

    def start(self, model: nn.Module, k: int, t: int) -> None:
        set_factors(model, self.factors)

    def trains(self, t: int) -> tuple[bool, bool]:
        return True, True

    def upload(self, factors: Factors, k: int) -> Factors:
        return factors

    def server(
        self, model: nn.Module, uploads: Sequence[Factors], chosen: Sequence[int], p: list[float]
    ) -> tuple[int, int]:
        out = fedex_lora(uploads, p)
        merge_updates(model, out.residual)  # W0 ← W0 + (ΔW − B̄Ā)
        self.factors = out.adapters
        down = _bytes(out.adapters) + _bytes(out.residual)
        return sum(_bytes(f) for f in uploads), len(uploads) * down

    def evaluate(
        self, model: nn.Module, tests: Tests, clients: Sequence[ClientData], cfg: FedConfig
    ) -> dict[str, float]:
        set_factors(model, self.factors)
        return _eval_global(model, tests, cfg)


class FedSAClientSide:
    """FedSA-LoRA: A is averaged and shared; every client keeps its own B across rounds.

    Evaluated per client: client k's adapter ``(Ā, B_k)`` on its own domain's test set; a
    domain's accuracy is the mean over its clients, ``"avg"`` the mean over domains.
    """

    def __init__(self, initial: Factors, n_clients: int) -> None:
        self.shared_A = {n: f.A for n, f in initial.items()}
        self.local_B = [{n: f.B for n, f in initial.items()} for _ in range(n_clients)]

    def _adapter(self, k: int) -> Factors:
        return {n: LoRAFactors(A, self.local_B[k][n]) for n, A in self.shared_A.items()}

    def start(self, model: nn.Module, k: int, t: int) -> None:
        set_factors(model, self._adapter(k))

    def trains(self, t: int) -> tuple[bool, bool]:
        return True, True

    def upload(self, factors: Factors, k: int) -> Factors:
        self.local_B[k] = {n: f.B for n, f in factors.items()}  # B never leaves the client
        return factors

    def server(
        self, model: nn.Module, uploads: Sequence[Factors], chosen: Sequence[int], p: list[float]
    ) -> tuple[int, int]:
        out = fedsa_lora(uploads, p)
        self.shared_A = out.shared_A
        up = sum(_bytes(f, B=False) for f in uploads)
        return up, len(uploads) * sum(a.numel() * a.element_size() for a in out.shared_A.values())

    def evaluate(
        self, model: nn.Module, tests: Tests, clients: Sequence[ClientData], cfg: FedConfig
    ) -> dict[str, float]:
        per_domain: dict[str, list[float]] = {}
        for k, client in enumerate(clients):
            set_factors(model, self._adapter(k))
            acc = evaluate(
                model,
                {client.domain: tests[client.domain]},
                device=cfg.device,
                batch_size=cfg.eval_batch_size,
                workers=cfg.workers,
            )
            per_domain.setdefault(client.domain, []).append(acc[client.domain])
        out = {d: float(np.mean(v)) for d, v in per_domain.items()}
        out["avg"] = float(np.mean(list(out.values())))
        return out


class RoLoRAClientSide:
    """RoLoRA: round t trains :func:`~lorafair.aggregate.rolora_trained` (B first), the other
    factor stays frozen at the shared value; only the trained factor goes up and down."""

    def __init__(self, initial: Factors) -> None:
        self.factors = initial
        self.round = 0

    def start(self, model: nn.Module, k: int, t: int) -> None:
        self.round = t
        set_factors(model, self.factors)

    def trains(self, t: int) -> tuple[bool, bool]:
        trained = rolora_trained(t)
        return trained == "A", trained == "B"

    def upload(self, factors: Factors, k: int) -> Factors:
        return factors

    def server(
        self, model: nn.Module, uploads: Sequence[Factors], chosen: Sequence[int], p: list[float]
    ) -> tuple[int, int]:
        trained = rolora_trained(self.round)
        self.factors = rolora(uploads, p, trained=trained)
        A, B = trained == "A", trained == "B"
        up = sum(_bytes(f, A=A, B=B) for f in uploads)
        return up, len(uploads) * _bytes(self.factors, A=A, B=B)

    def evaluate(
        self, model: nn.Module, tests: Tests, clients: Sequence[ClientData], cfg: FedConfig
    ) -> dict[str, float]:
        set_factors(model, self.factors)
        return _eval_global(model, tests, cfg)


class HetLoRAClientSide:
    """HetLoRA: client k trains at rank ``ranks[k % 3]`` (``r/4, r/2, r`` for the model's r).

    The model's LoRA layers have the largest rank; a client of rank ``r_k`` loads
    ``Ā[:r_k], B̄[:, :r_k]`` and zeros beyond, whose gradients are exactly zero (both tails
    are zero), so it trains a rank-``r_k`` adapter and uploads only those components.
    """

    def __init__(self, initial: Factors, rank: int) -> None:
        self.factors = initial
        self.full = rank
        self.ranks = (max(1, rank // 4), max(1, rank // 2), rank)

    def rank_of(self, k: int) -> int:
        return self.ranks[k % len(self.ranks)]

    def start(self, model: nn.Module, k: int, t: int) -> None:
        (mine,) = hetlora_truncate(self.factors, [self.rank_of(k)])
        padded = {
            n: LoRAFactors(
                torch.nn.functional.pad(A, (0, 0, 0, self.full - A.shape[0])),
                torch.nn.functional.pad(B, (0, self.full - B.shape[1])),
            )
            for n, (A, B) in mine.items()
        }
        set_factors(model, padded)

    def trains(self, t: int) -> tuple[bool, bool]:
        return True, True

    def upload(self, factors: Factors, k: int) -> Factors:
        r = self.rank_of(k)
        return {n: LoRAFactors(A[:r].clone(), B[:, :r].clone()) for n, (A, B) in factors.items()}

    def server(
        self, model: nn.Module, uploads: Sequence[Factors], chosen: Sequence[int], p: list[float]
    ) -> tuple[int, int]:
        self.factors = hetlora(uploads, p)
        per_rank = _bytes(self.factors) / self.full
        down = sum(int(per_rank * self.rank_of(k)) for k in chosen)
        return sum(_bytes(f) for f in uploads), down

    def evaluate(
        self, model: nn.Module, tests: Tests, clients: Sequence[ClientData], cfg: FedConfig
    ) -> dict[str, float]:
        set_factors(model, self.factors)  # the global adapter at the largest rank
        return _eval_global(model, tests, cfg)


class FedSVDClientSide:
    """FedSVD: clients train only B on the shared A'; the server re-factors ``B̄A'`` as
    ``(Vᵀ, UΣ)``, so the next A' has orthonormal rows."""

    def __init__(self, initial: Factors) -> None:
        self.factors = initial

    def start(self, model: nn.Module, k: int, t: int) -> None:
        set_factors(model, self.factors)

    def trains(self, t: int) -> tuple[bool, bool]:
        return False, True

    def upload(self, factors: Factors, k: int) -> Factors:
        return factors

    def server(
        self, model: nn.Module, uploads: Sequence[Factors], chosen: Sequence[int], p: list[float]
    ) -> tuple[int, int]:
        self.factors = fedsvd(uploads, p)
        up = sum(_bytes(f, A=False) for f in uploads)
        return up, len(uploads) * _bytes(self.factors)

    def evaluate(
        self, model: nn.Module, tests: Tests, clients: Sequence[ClientData], cfg: FedConfig
    ) -> dict[str, float]:
        set_factors(model, self.factors)
        return _eval_global(model, tests, cfg)


CLIENT_SIDES: dict[NewMethod, Callable[[Factors, int, FedConfig], ClientSide]] = {
    "fedex_lora": lambda init, k, cfg: FedExClientSide(init),
    "fedsa_lora": lambda init, k, cfg: FedSAClientSide(init, k),
    "rolora": lambda init, k, cfg: RoLoRAClientSide(init),
    "hetlora": lambda init, k, cfg: HetLoRAClientSide(init, cfg.rank),
    "fedsvd": lambda init, k, cfg: FedSVDClientSide(init),
}


def _trainable(
    model: nn.Module, head: nn.Module, train_A: bool, train_B: bool
) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(train_A)
        layer.lora_B.requires_grad_(train_B)
        params += [q for q, on in ((layer.lora_A, train_A), (layer.lora_B, train_B)) if on]
    for q in head.parameters():
        q.requires_grad_(True)
        params.append(q)
    return params


def run_new_method(
    method: NewMethod,
    make_model: Callable[[], tuple[nn.Module, nn.Module]],
    clients: Sequence[ClientData],
    tests: Tests,
    cfg: FedConfig,
    *,
    label: str = "",
    on_round: Callable[[int], None] | None = None,
) -> MethodResult:
    """:func:`examples.loop.run_method` for the methods of :data:`CLIENT_SIDES`.

    Same partial-participation sample (seeded by ``(seed, t)``) and client SGD order (seeded by
    ``(seed, t, k)``) as ``run_method``, so every method sees the same data. The head is
    trained by every client and FedAvg'd, as there.
    """
    start = time.perf_counter()
    model, head = make_model()
    model.to(cfg.device)
    side = CLIENT_SIDES[method](get_factors(model), len(clients), cfg)
    head_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    result = MethodResult(method)
    per_round = len(clients) if cfg.clients_per_round is None else cfg.clients_per_round
    per_round = min(per_round, len(clients))
    for t in range(cfg.rounds):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, t])
        chosen = sorted(rng.choice(len(clients), size=per_round, replace=False).tolist())
        uploads, heads, sizes, losses = [], [], [], []
        for k in chosen:
            side.start(model, k, t)
            head.load_state_dict(head_state)
            params = _trainable(model, head, *side.trains(t))
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + t * 1009 + k)
            losses.append(local_train(model, params, clients[k].data, cfg, generator=g))
            uploads.append(side.upload(get_factors(model), k))
            heads.append({n: v.detach().clone() for n, v in head.state_dict().items()})
            sizes.append(len(clients[k]))
        p = [n / sum(sizes) for n in sizes]
        up, down = side.server(model, uploads, chosen, p)
        head_state = _average_heads(heads, p)
        head.load_state_dict(head_state)
        acc = side.evaluate(model, tests, clients, cfg)
        result.accuracy.append(acc)
        result.bytes_up.append(up)
        result.bytes_down.append(down)
        result.diagnostics.append({})
        log.info(
            "%s%s round %d/%d: avg acc %.2f%% loss %.4f up %.2f MB down %.2f MB (%.1fs)",
            label,
            method,
            t + 1,
            cfg.rounds,
            acc["avg"],
            float(np.mean(losses)),
            up / 2**20,
            down / 2**20,
            time.perf_counter() - t0,
        )
        if on_round is not None:
            on_round(t)
    result.seconds = time.perf_counter() - start
    return result
