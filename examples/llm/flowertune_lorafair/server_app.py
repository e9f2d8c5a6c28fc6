"""flowertune-lorafair: the ServerApp, step for step as FlowerTune's LLM template.

1. a results folder per run (``results/<timestamp>`` under the working directory);
2. the nested run config (``model.*``, ``train.*``, ``strategy.*``) as attributes;
3. the initial adapter: ``get_peft_model_state_dict`` of ``get_model(cfg.model)`` (float32);
4. the strategy (the one step that differs: ``FlowerTuneLlm`` here is a
   :class:`lorafair.flower.LoRAStrategy` running ``strategy.aggregator``, where FlowerTune's is
   Flower's ``FedAvg``);
5. ``strategy.start`` with ``{"save_path": ...}`` as the train config;
6. ``evaluate_fn``: a ``save_pretrained`` checkpoint ``peft_<round>`` every
   ``train.save-every-round`` rounds and after the last.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.config import unflatten_dict
from flwr.serverapp import Grid, ServerApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from .dataset import DictConfig, replace_keys
from .models import get_model
from .strategy import FlowerTuneLlm

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds; checkpoints go to ``results/<timestamp>/peft_<t>``."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    save_path = os.path.join(os.getcwd(), "results", stamp)
    os.makedirs(save_path, exist_ok=True)

    num_rounds = int(context.run_config["num-server-rounds"])  # type: ignore[arg-type]
    cfg = DictConfig(replace_keys(unflatten_dict(context.run_config)))

    initial = ArrayRecord(get_peft_model_state_dict(get_model(cfg.model)))

    strategy = FlowerTuneLlm(
        cfg.strategy.aggregator,
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
    )

    strategy.start(
        grid=grid,
        initial_arrays=initial,
        train_config=ConfigRecord({"save_path": save_path}),
        num_rounds=num_rounds,
        evaluate_fn=get_evaluate_fn(cfg.model, cfg.train.save_every_round, num_rounds, save_path),
    )


def get_evaluate_fn(
    model_cfg: Any, save_every_round: int, total_round: int, save_path: str
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """The server-side ``evaluate_fn``: it saves the global adapter, as FlowerTune's does."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        due = server_round == total_round or server_round % int(save_every_round) == 0
        if server_round > 0 and due:
            model = get_model(model_cfg)
            set_peft_model_state_dict(model, arrays.to_torch_state_dict())
            model.save_pretrained(os.path.join(save_path, f"peft_{server_round}"))
        return MetricRecord()

    return evaluate
