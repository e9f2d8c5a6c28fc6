"""The ServerApp: a :class:`lorafair.flower.LoRAStrategy` driving a few rounds."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from examples.flower.task import client_data, download, evaluate, lora_model, upload
from lorafair import aggregate
from lorafair.flower import LoRAStrategy

METHODS = ("fedit", "ffa_lora", "flexlora", "lora_fair")


def _global_rank(method: str) -> int:
    return 8 if method == "flexlora" else 4


def run_strategy(
    grid: Grid,
    *,
    method: str,
    rounds: int,
    num_clients: int,
    local_steps: int = 5,
    lr: float = 0.1,
) -> Result:
    """Run ``rounds`` rounds of ``method`` on ``grid``; returns Flower's ``Result``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    aggregator = getattr(aggregate, method, None)
    if aggregator is None:
        raise ValueError(f"lorafair.aggregate.{method} is not available in this build")
    rank = _global_rank(method)
    options: dict[str, Any] = {"rank": rank} if method == "flexlora" else {}
    strategy = LoRAStrategy(
        aggregator,
        options=options,
        min_train_nodes=num_clients,
        min_evaluate_nodes=num_clients,
        min_available_nodes=num_clients,
    )
    initial = lora_model(rank, 8.0)  # B = 0: the round-0 adapter is the base model itself
    xs, ys = zip(*(client_data(k, train=False) for k in range(num_clients)), strict=True)
    x_test, y_test = torch.cat(xs), torch.cat(ys)

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = lora_model(rank, 8.0)
        download(model, arrays.to_torch_state_dict())
        loss, acc = evaluate(model, x_test, y_test)
        return MetricRecord({"loss": loss, "accuracy": acc})

    config = ConfigRecord({"method": method, "local-steps": local_steps, "lr": lr})
    return strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(upload(initial)),
        num_rounds=rounds,
        train_config=config,
        evaluate_config=ConfigRecord(dict(config)),
        evaluate_fn=central_eval,
    )


def make_server_app(
    *,
    method: str = "fedit",
    rounds: int = 3,
    num_clients: int = 3,
    results: list[Result] | None = None,
) -> ServerApp:
    """A ServerApp running :func:`run_strategy`; ``results`` (if given) receives the Result.

    Values in the run config (``flwr run``: ``method``, ``num-server-rounds``,
    ``num-clients``) override the arguments.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = context.run_config
        result = run_strategy(
            grid,
            method=str(cfg.get("method", method)),
            rounds=int(cfg.get("num-server-rounds", rounds)),
            num_clients=int(cfg.get("num-clients", num_clients)),
        )
        if results is not None:
            results.append(result)

    return app


app = make_server_app()
