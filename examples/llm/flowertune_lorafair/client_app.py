"""flowertune-lorafair: the ClientApp, step for step as FlowerTune's LLM template.

Reads the nested run config, loads its partition, builds the model and loads the global
adapter with ``set_peft_model_state_dict``, sets this round's learning rate by
``cosine_annealing`` over the server rounds, trains, and replies with
``get_peft_model_state_dict`` and ``{"train_loss", "num-examples"}``. FlowerTune trains with
``trl``'s ``SFTTrainer`` and ``transformers.TrainingArguments``; offline and on a CPU, a plain
AdamW loop reads the same ``train.training-arguments`` keys it needs
(``per-device-train-batch-size``, ``max-steps``).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import unflatten_dict
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from .dataset import (
    DictConfig,
    get_tokenizer_and_data_collator_and_propt_formatting,
    load_data,
    replace_keys,
)
from .models import cosine_annealing, get_model, loss_on, set_adapter_dtype

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the adapter on the local partition; reply with it (float32) and the loss."""
    partition_id = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    num_partitions = int(context.node_config["num-partitions"])  # type: ignore[arg-type]
    num_rounds = int(context.run_config["num-server-rounds"])  # type: ignore[arg-type]
    cfg = DictConfig(replace_keys(unflatten_dict(context.run_config)))
    args = cfg.train.training_arguments

    trainset = load_data(partition_id, num_partitions, cfg.dataset.name)
    tokenizer, _, formatting_prompts_func = get_tokenizer_and_data_collator_and_propt_formatting(
        cfg.model.name
    )
    ids = tokenizer(formatting_prompts_func(trainset))

    model = get_model(cfg.model)
    set_adapter_dtype(model, str(cfg.model.lora.adapter_dtype))
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())

    server_round = int(msg.content["config"]["server-round"])
    lr = cosine_annealing(
        server_round, num_rounds, cfg.train.learning_rate_max, cfg.train.learning_rate_min
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1000 * server_round + partition_id)
    model.train()
    steps, batch, total = int(args.max_steps), int(args.per_device_train_batch_size), 0.0
    for _ in range(steps):
        loss = loss_on(model, ids[torch.randint(0, ids.shape[0], (batch,), generator=g)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach())

    # float32 on the wire (Flower's ArrayRecord has no bf16; every bf16 value fits exactly).
    state = {k: v.detach().float() for k, v in get_peft_model_state_dict(model).items()}
    metrics = MetricRecord({"train_loss": total / steps, "num-examples": len(ids)})
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
    return Message(content=content, reply_to=msg)
