"""The ClientApp: load the global adapter, train locally, upload the folded adapter."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .task import client_data, download, evaluate, lora_model, train, upload

app = ClientApp()

RANKS = (2, 4, 8)  # used for "flexlora" (heterogeneous ranks); other methods use rank 4
ALPHAS = (8.0, 8.0, 16.0)


def _model(context: Context, msg: Message) -> object:
    partition = int(context.node_config["partition-id"])
    method = str(msg.content["config"].get("method", "fedit"))
    if method == "flexlora":
        rank, alpha = RANKS[partition % len(RANKS)], ALPHAS[partition % len(ALPHAS)]
    else:
        rank, alpha = 4, ALPHAS[partition % len(ALPHAS)]
    model = lora_model(rank, alpha, use_rslora=partition % 2 == 1)
    download(model, msg.content["arrays"].to_torch_state_dict())
    if method == "ffa_lora":  # A stays frozen at the shared initialisation
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return model


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    model = _model(context, msg)
    x, y = client_data(int(context.node_config["partition-id"]))
    steps = int(msg.content["config"].get("local-steps", 5))
    lr = float(msg.content["config"].get("lr", 0.1))
    loss = train(model, x, y, steps=steps, lr=lr)
    content = RecordDict(
        {
            "arrays": ArrayRecord(upload(model)),
            "metrics": MetricRecord({"train-loss": loss, "num-examples": int(x.shape[0])}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    model = _model(context, msg)
    x, y = client_data(int(context.node_config["partition-id"]), train=False)
    loss, acc = evaluate(model, x, y)
    metrics = MetricRecord({"eval-loss": loss, "eval-acc": acc, "num-examples": int(x.shape[0])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
