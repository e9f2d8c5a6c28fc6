"""The ServerApp: a :class:`lorafair.flower.LoRAStrategy` driving a few rounds.

Every option comes from the run config (``[tool.flwr.app.config]`` in ``pyproject.toml``,
overridden with ``flwr run . --run-config "method='fedit' num-server-rounds=2"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

from lorafair import registry
from lorafair.flower import LoRAStrategy, latest_checkpoint
from lorafair.interop.peft import PeftAdapter, from_peft_state_dict, read_adapter

from .task import HETERO, add_to_base, client_data, download, evaluate, lora_model, upload

METHODS = registry.names()


def _global_rank(method: str) -> int:
    return 8 if method in HETERO else 4


def _options(method: str, lam: float) -> dict[str, Any]:
    """This example's options per method (the registry's defaults fill the rest)."""
    return {
        "flexlora": {"rank": 8},
        "lora_fair": {"lam": lam},
        "flora": {"allow_excess_rank": True},  # the rank grows K-fold per round here
    }.get(method, {})


def _counting(
    average: Callable[[list[RecordDict], str], MetricRecord],
) -> Callable[[list[RecordDict], str], MetricRecord]:
    """FedAvg's metric ``average``, plus ``num-replies``: how many replies the round aggregated."""

    def counted(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        metrics = average(records, weighted_by_key)
        metrics["num-replies"] = len(records)
        return metrics

    return counted


def run_strategy(
    grid: Grid,
    *,
    method: str,
    rounds: int,
    min_nodes: int,
    lam: float = 0.01,
    local_steps: int = 5,
    lr: float = 0.1,
    fraction_evaluate: float = 1.0,
    round_timeout: float = 3600.0,
    wrap: Callable[[LoRAStrategy], Strategy] | None = None,
    checkpoint_dir: str = "",
    resume: bool = False,
    stop_after: int = 0,
) -> Result:
    """Run ``rounds`` rounds of ``method`` on ``grid``; returns Flower's ``Result``.

    Every connected node trains each round (``fraction_train = 1``), once at least
    ``min_nodes`` are connected; a round whose replies have not all arrived after
    ``round_timeout`` seconds is aggregated from those that have (Flower's FedAvg behaviour).
    ``wrap`` (optional) wraps the strategy, e.g. in Flower's
    ``DifferentialPrivacyServerSideFixedClipping``.

    ``checkpoint_dir`` (if not empty): the initial adapter is saved there with
    ``save_pretrained`` (``initial/``) and every round's checkpoint as ``round-<t>/``
    (:meth:`lorafair.flower.LoRAStrategy.save_checkpoint`); with ``resume`` the run continues
    from the latest one at the next round. ``stop_after`` (if > 0) ends the run after that
    round, as a crash would (for tests of the resume).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rank = _global_rank(method)
    initial = lora_model(rank, 8.0)  # B = 0: the round-0 adapter is the base model itself
    strategy = LoRAStrategy(
        method,  # FlowerTune's server would say FedAvg(...) here
        options=_options(method, lam),
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
        checkpoint_dir=checkpoint_dir or None,
        checkpoint_like=_like(checkpoint_dir, initial) if checkpoint_dir else None,
        scaling_folded=True,  # the clients upload with peft's scaling folded into B
    )
    strategy.train_metrics_aggr_fn = _counting(strategy.train_metrics_aggr_fn)
    xs, ys = zip(*(client_data(k, train=False) for k in range(3)), strict=True)
    x_test, y_test = torch.cat(xs), torch.cat(ys)

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if strategy.spec.personalised:  # no global model: the clients evaluate their own
            return None
        sd = arrays.to_torch_state_dict()
        ranks = {name: A.shape[0] for name, (A, _) in from_peft_state_dict(sd).factors.items()}
        model = lora_model(rank, 8.0, ranks=ranks)
        download(model, sd)
        add_to_base(model, {n: B @ A for n, (A, B) in strategy.residual_total.items()})
        loss, acc = evaluate(model, x_test, y_test)
        return MetricRecord({"loss": loss, "accuracy": acc})

    config = ConfigRecord({"method": method, "local-steps": local_steps, "lr": lr})
    arrays, first = ArrayRecord(upload(initial)), 1
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir and resume else None
    if latest is not None:
        restored = strategy.restore(latest)
        arrays, first = restored.arrays, restored.round + 1
    last = min(rounds, stop_after) if stop_after > 0 else rounds
    if wrap is not None:
        return wrap(strategy).start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=last,
            timeout=round_timeout,
            train_config=config,
            evaluate_config=ConfigRecord(dict(config)),
            evaluate_fn=central_eval,
        )
    return strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=last,
        timeout=round_timeout,
        train_config=config,
        evaluate_config=ConfigRecord(dict(config)),
        evaluate_fn=central_eval,
        first_round=first,
    )


def _like(checkpoint_dir: str, initial: Any) -> PeftAdapter:
    """The initial adapter saved with ``save_pretrained`` in ``checkpoint_dir/initial``, read
    back: the config every round's checkpoint follows."""
    folder = os.path.join(checkpoint_dir, "initial")
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        initial.save_pretrained(folder)
    return read_adapter(folder)


def summary(result: Result, *, method: str, seconds: float) -> dict[str, Any]:
    """The Result as JSON-ready dicts: per round, the central and the clients' train metrics."""
    return {
        "method": method,
        "seconds": seconds,
        "central": {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
        "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "arrays-sha256": arrays_digest(result.arrays),
    }


def arrays_digest(arrays: ArrayRecord) -> str:
    """SHA-256 of the arrays' keys, dtypes, shapes and bytes, in order: equal iff bit-equal."""
    h = hashlib.sha256()
    for key, array in arrays.items():
        h.update(f"{key}|{array.dtype}|{tuple(array.shape)}|".encode())
        h.update(array.data)
    return h.hexdigest()


def make_server_app(
    defaults: Mapping[str, Any] | None = None, results: list[Result] | None = None
) -> ServerApp:
    """A ServerApp running :func:`run_strategy` from the run config.

    Run config keys: ``method``, ``num-server-rounds``, ``min-nodes``, ``lam``,
    ``local-steps``, ``lr``, ``fraction-evaluate``, ``round-timeout``, ``checkpoint-dir``,
    ``resume``, ``stop-after`` (see :func:`run_strategy`) and ``result-path`` (if not empty,
    the per-round metrics and the final arrays' SHA-256 are written there as JSON when the run
    ends).
    ``defaults`` fills keys the run config lacks (``run_simulation`` passes none); ``results``
    (if given) receives the Result, for in-process simulations.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = {**(defaults or {}), **context.run_config}
        method = str(cfg.get("method", "lora_fair"))
        start = time.perf_counter()
        result = run_strategy(
            grid,
            method=method,
            rounds=int(cfg.get("num-server-rounds", 3)),
            min_nodes=int(cfg.get("min-nodes", 2)),
            lam=float(cfg.get("lam", 0.01)),
            local_steps=int(cfg.get("local-steps", 5)),
            lr=float(cfg.get("lr", 0.1)),
            fraction_evaluate=float(cfg.get("fraction-evaluate", 1.0)),
            round_timeout=float(cfg.get("round-timeout", 3600.0)),
            checkpoint_dir=str(cfg.get("checkpoint-dir", "")),
            resume=bool(cfg.get("resume", False)),
            stop_after=int(cfg.get("stop-after", 0)),
        )
        if results is not None:
            results.append(result)
        path = str(cfg.get("result-path", ""))
        if path:
            out = summary(result, method=method, seconds=time.perf_counter() - start)
            Path(path).write_text(json.dumps(out, indent=1))

    return app


app = make_server_app()
