"""flowertune-lorafair: the ClientApp (FlowerTune's, with bf16 adapters over ArrayRecord)."""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from lorafair.flower import from_array_record, to_array_record

from .dataset import client_data
from .models import get_model, loss_on

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global adapter, train LoRA locally, reply with the adapter (bf16)."""
    partition = int(context.node_config["partition-id"])
    config = msg.content["config"]
    model = get_model()
    # FlowerTune: set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict());
    # bf16 needs lorafair's decoder, since Flower's ArrayRecord goes through NumPy.
    set_peft_model_state_dict(model, from_array_record(msg.content["arrays"]))
    ids = client_data(partition)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(config.get("lr", 3e-3)), weight_decay=0.0)
    g = torch.Generator().manual_seed(int(config.get("server-round", 0)) * 100 + partition)
    model.train()
    total = 0.0
    steps = int(config.get("local-steps", 4))
    for _ in range(steps):
        batch = ids[torch.randint(0, ids.shape[0], (16,), generator=g)]
        loss = loss_on(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach())
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    content = RecordDict(
        {
            "arrays": to_array_record(state),
            "metrics": MetricRecord({"train-loss": total / steps, "num-examples": len(ids)}),
        }
    )
    return Message(content=content, reply_to=msg)
