"""The ClientApp: load the global adapter, train locally, upload the folded adapter.

What a client does with what it receives follows the method's registry entry
(:mod:`lorafair.registry`), as :class:`lorafair.flower.LoRAStrategy` sends it:

- FLoRA (exact at a changed rank): rebuild the adapter at the global ranks
  (:data:`lorafair.flower.RANKS_KEY`) and load it exactly. The rank grows K-fold per round
  here; the paper's clients merge it into their base weights instead.
- FlexLoRA, HetLoRA, LoRA-FAIR with a larger global rank: keep the leading components at the
  client's own rank (FlexLoRA's are its top singular directions; HetLoRA's rule).
- FedEx-LoRA: add the sum of the rounds' residuals (:data:`lorafair.flower.RESIDUAL_KEY`) to
  a fresh copy of the frozen base weights.
- FedSA-LoRA: load the shared ``Ā`` and keep the client's own ``B`` in ``context.state``.
- FFA-LoRA, FedSVD (shared ``A``) and RoLoRA (``config["lorafair-trained"]``): freeze the
  factor that is not trained this round.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from lorafair import registry
from lorafair.flower import RANKS_KEY, RESIDUAL_KEY, from_array_record
from lorafair.interop.peft import from_peft_state_dict

from .task import HETERO, add_to_base, client_data, download, evaluate, lora_model, train, upload

app = ClientApp()

RANKS = (2, 4, 8)  # for HETERO methods (heterogeneous ranks); other methods use rank 4
ALPHAS = (8.0, 8.0, 16.0)
OWN_B = "lorafair-own-B"  # context.state: this client's B (FedSA-LoRA)


def _residual(msg: Message) -> dict[str, Tensor]:
    """FedEx-LoRA: the sum of every round's residual so far, dense per layer (else empty)."""
    if RESIDUAL_KEY not in msg.content.array_records:
        return {}
    residual = from_peft_state_dict(from_array_record(msg.content.array_records[RESIDUAL_KEY]))
    return {layer: (B.double() @ A.double()).float() for layer, (A, B) in residual.factors.items()}


def _model(context: Context, msg: Message) -> Any:
    partition = int(context.node_config["partition-id"])
    config = msg.content.config_records["config"]
    spec = registry.get(str(config.get("method", "fedit")))
    hetero = spec.name in HETERO
    own = RANKS[partition % len(RANKS)] if hetero else 4
    alpha = ALPHAS[partition % len(ALPHAS)]
    global_ranks = {k: int(v) for k, v in msg.content.config_records[RANKS_KEY].items()}  # type: ignore[arg-type]
    if spec.exact and not spec.equal_ranks:  # FLoRA: only the full rank is exact
        ranks = global_ranks
    else:
        ranks = {layer: min(own, r) for layer, r in global_ranks.items()}
    model = lora_model(own, alpha, use_rslora=partition % 2 == 1, ranks=ranks)
    received = msg.content.array_records["arrays"].to_torch_state_dict()
    if spec.personalised:  # FedSA-LoRA: the download holds only Ā; B is the client's own
        if OWN_B in context.state.array_records:
            received = {**from_array_record(context.state.array_records[OWN_B]), **received}
        else:
            received = {**upload(model), **received}
    download(model, received)
    add_to_base(model, _residual(msg))
    trained = config.get("lorafair-trained")
    frozen = {"A": "B", "B": "A"}[str(trained)] if trained else ("A" if spec.shared_A else None)
    if frozen is not None:
        for name, p in model.named_parameters():
            if f"lora_{frozen}" in name:
                p.requires_grad_(False)
    return model


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    model = _model(context, msg)
    x, y = client_data(int(context.node_config["partition-id"]))
    config = msg.content.config_records["config"]
    steps = int(config.get("local-steps", 5))  # type: ignore[arg-type]
    lr = float(config.get("lr", 0.1))  # type: ignore[arg-type]
    loss = train(model, x, y, steps=steps, lr=lr)
    sent = upload(model)
    if registry.get(str(config.get("method", "fedit"))).personalised:
        own_B = {k: v for k, v in sent.items() if ".lora_B." in k}
        context.state[OWN_B] = ArrayRecord(own_B)
    content = RecordDict(
        {
            "arrays": ArrayRecord(sent),
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
