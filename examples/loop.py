"""The federated loop: local SGD on each client, the server step, evaluation per domain.

Model-agnostic: it needs a ``make_model`` that returns the pre-trained model with LoRA injected
(:func:`examples.lora.inject_lora`) and a fresh head, identical on every call (seeded).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from examples.data import ArrayDataset, ClientData
from examples.lora import set_factors
from examples.methods import (
    SIDES,
    GlobalState,
    Method,
    ServerOptions,
    client_start,
    client_upload,
    initial_state,
    server_step,
    trainable_parameters,
)
from lorafair import registry

__all__ = [
    "FedConfig",
    "MethodResult",
    "batches",
    "evaluate",
    "evaluate_state",
    "local_train",
    "run_method",
]

log = logging.getLogger("examples.federated")


@dataclass(frozen=True)
class FedConfig:
    """Every knob of a federated run (defaults: the paper's feature non-IID setting)."""

    rounds: int = 50
    local_iters: int = 2
    local_unit: Literal["epochs", "steps"] = "epochs"
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    rank: int = 16
    clients_per_round: int | None = None
    lam: float = 0.01
    residual_on: Literal["A", "B"] = "B"
    flexlora_split: Literal["balanced", "left"] = "balanced"
    seed: int = 0
    device: str = "cpu"
    workers: int = 0
    eval_batch_size: int = 512


@dataclass
class MethodResult:
    """Per-round history of one method on one model."""

    method: str
    seed: int = 0
    accuracy: list[dict[str, float]] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    diagnostics: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        return self.accuracy[-1]


def batches(
    ds: Dataset[tuple[Tensor, Tensor]],
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    workers: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches; in-memory datasets are sliced directly, others go through a DataLoader."""
    if isinstance(ds, ArrayDataset):
        n = len(ds)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield ds.x[idx], ds.y[idx]
        return
    loader = DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers
    )
    yield from loader


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tests: Mapping[str, Dataset[tuple[Tensor, Tensor]]],
    *,
    device: str,
    batch_size: int = 512,
    workers: int = 0,
) -> dict[str, float]:
    """Top-1 accuracy (%) per domain and their mean under ``"avg"``."""
    model.eval()
    acc = {}
    for name, ds in tests.items():
        correct = total = 0
        for x, y in batches(ds, batch_size, shuffle=False, workers=workers):
            pred = model(x.to(device)).argmax(dim=-1).cpu()
            correct += int((pred == y).sum())
            total += int(y.numel())
        acc[name] = 100.0 * correct / max(total, 1)
    acc["avg"] = float(np.mean(list(acc.values())))
    return acc


def local_train(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    data: Dataset[tuple[Tensor, Tensor]],
    cfg: FedConfig,
    *,
    generator: torch.Generator,
) -> float:
    """``cfg.local_iters`` epochs (or SGD steps) of cross-entropy on ``data``; mean loss."""
    model.train()
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    losses: list[float] = []

    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x.to(cfg.device)), y.to(cfg.device))
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(float(loss.detach()))

    kw = {"shuffle": True, "generator": generator, "workers": cfg.workers}
    if cfg.local_unit == "epochs":
        for _ in range(cfg.local_iters):
            for x, y in batches(data, cfg.batch_size, **kw):  # type: ignore[arg-type]
                step(x, y)
    else:
        done = 0
        while done < cfg.local_iters:
            for x, y in batches(data, cfg.batch_size, **kw):  # type: ignore[arg-type]
                step(x, y)
                done += 1
                if done == cfg.local_iters:
                    break
    return float(np.mean(losses)) if losses else float("nan")


def evaluate_state(
    method: Method,
    model: nn.Module,
    head: nn.Module,
    state: GlobalState,
    tests: Mapping[str, Dataset[tuple[Tensor, Tensor]]],
    clients: Sequence[ClientData],
    cfg: FedConfig,
) -> dict[str, float]:
    """Accuracy (%) per domain and ``"avg"`` of what the clients start the next round from.

    The global adapter ``state.factors`` on every domain; for a personalised method (the
    registry's ``personalised``) client k's own adapter on its own domain instead, a domain's
    accuracy the mean over its clients and ``"avg"`` the mean over domains.
    """
    head.load_state_dict(state.head)
    kw = {"device": cfg.device, "batch_size": cfg.eval_batch_size, "workers": cfg.workers}
    if not registry.get(SIDES[method].aggregator).personalised:
        set_factors(model, state.factors)
        return evaluate(model, tests, **kw)  # type: ignore[arg-type]
    per_domain: dict[str, list[float]] = {}
    for k, client in enumerate(clients):
        set_factors(model, state.personal.get(k, state.factors))
        acc = evaluate(model, {client.domain: tests[client.domain]}, **kw)  # type: ignore[arg-type]
        per_domain.setdefault(client.domain, []).append(acc[client.domain])
    out = {d: float(np.mean(v)) for d, v in per_domain.items()}
    out["avg"] = float(np.mean(list(out.values())))
    return out


def run_method(
    method: Method,
    make_model: Callable[[], tuple[nn.Module, nn.Module]],
    clients: Sequence[ClientData],
    tests: Mapping[str, Dataset[tuple[Tensor, Tensor]]],
    cfg: FedConfig,
    *,
    label: str = "",
    on_round: Callable[[int], None] | None = None,
) -> MethodResult:
    """Run ``cfg.rounds`` federated rounds of ``method``; accuracy, bytes, diagnostics per round.

    ``make_model()`` returns ``(model, head)`` where ``head`` is the classifier submodule of
    ``model`` (trained by every client, FedAvg'd). Client ``k``'s SGD order in round ``t`` is
    seeded by ``(seed, t, k)``, the partial-participation sample by ``(seed, t)``, so all
    methods see the same data order. ``on_round(t)`` is called after every round
    (the driver's progress bar).
    """
    start = time.perf_counter()
    model, head = make_model()
    model.to(cfg.device)
    state: GlobalState = initial_state(model, head)
    result = MethodResult(method, cfg.seed)
    k_all = len(clients)
    per_round = k_all if cfg.clients_per_round is None else min(cfg.clients_per_round, k_all)
    for t in range(cfg.rounds):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, t])
        chosen = sorted(rng.choice(k_all, size=per_round, replace=False).tolist())
        uploads, losses = [], []
        for k in chosen:
            client_start(
                method, model, head, state, seed=cfg.seed * 7919 + t * 104_729 + k + 1, client=k
            )
            params = trainable_parameters(method, model, head, round_index=t)
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + t * 1009 + k)
            losses.append(local_train(model, params, clients[k].data, cfg, generator=g))
            uploads.append(client_upload(method, model, head, client=k, n=len(clients[k])))
        options = ServerOptions(cfg.rank, cfg.lam, cfg.residual_on, cfg.flexlora_split, t)
        rr = server_step(method, model, state, uploads, chosen, options)
        state = rr.state
        acc = evaluate_state(method, model, head, state, tests, clients, cfg)
        result.accuracy.append(acc)
        result.bytes_up.append(rr.bytes_up)
        result.bytes_down.append(rr.bytes_down)
        result.diagnostics.append(rr.diagnostics)
        extra = "".join(f" {k}={v:.6f}" for k, v in rr.diagnostics.items() if k.startswith("cos"))
        log.info(
            "%s%s round %d/%d: avg acc %.2f%% loss %.4f up %.2f MB down %.2f MB (%.1fs)%s",
            label,
            method,
            t + 1,
            cfg.rounds,
            acc["avg"],
            float(np.mean(losses)),
            rr.bytes_up / 2**20,
            rr.bytes_down / 2**20,
            time.perf_counter() - t0,
            extra,
        )
        if on_round is not None:
            on_round(t)
    result.seconds = time.perf_counter() - start
    return result
