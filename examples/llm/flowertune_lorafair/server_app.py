"""flowertune-lorafair: the ServerApp. FlowerTune's, with one line changed: the strategy.

FlowerTune aggregates with ``FedAvg``: A and B averaged separately (FedIT), whose product is
not the average update. Here ``LoRAStrategy(lora_fair)`` corrects it (LoRA-FAIR).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from lorafair.aggregate import lora_fair
from lorafair.flower import LoRAStrategy, from_array_record, to_array_record

from .dataset import client_data
from .models import get_model, loss_on

app = ServerApp()


def run(grid: Grid, cfg: dict[str, Any]) -> Result:
    """Run the configured rounds; the global bf16 adapter is evaluated on held-out text."""
    model = get_model()
    test_ids = torch.cat([client_data(k, train=False) for k in range(3)])

    @torch.no_grad()
    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_peft_model_state_dict(model, from_array_record(arrays))
        model.eval()
        return MetricRecord({"loss": float(loss_on(model, test_ids))})

    n = int(cfg["min-nodes"])
    # FlowerTune: strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=n, ...), i.e. FedIT.
    # Flower's FedAvg cannot read bf16 ArrayRecords (NumPy has no bfloat16); LoRAStrategy can.
    strategy = LoRAStrategy(
        lora_fair,
        options={"lam": float(cfg["lam"])},
        fraction_evaluate=0.0,
        min_train_nodes=n,
        min_available_nodes=n,
    )
    initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return strategy.start(
        grid=grid,
        initial_arrays=to_array_record(initial),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(cfg["lr"]), "local-steps": int(cfg["local-steps"])}),
        evaluate_fn=evaluate,
    )


DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    "min-nodes": 3,
    "lam": 0.01,
    "lr": 3e-3,
    "local-steps": 4,
    "result-path": "",
}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = {**DEFAULTS, **context.run_config}
    result = run(grid, cfg)
    if cfg["result-path"]:
        out = {
            "central": {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
            "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        }
        Path(str(cfg["result-path"])).write_text(json.dumps(out, indent=1))
