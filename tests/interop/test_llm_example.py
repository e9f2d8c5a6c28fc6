"""examples/llm: a FlowerTune-shaped app with a tiny Llama and bf16 peft LoRA, offline.

The ClientApp is called as the SuperNode calls it (``app(message, context)``), the replies go
to ``LoRAStrategy(lora_fair).aggregate_train`` as the ServerApp's grid hands them over, for
three rounds, all in this process (no ray, no network). Checked: the model is a Llama built
from a config with LoRA only on q_proj/v_proj, the adapters stay bf16 through ArrayRecord, the
client and the aggregator; the aggregate equals lora_fair on the decoded factors; the
held-out loss goes down; Flower's own FedAvg cannot read bf16 records (why the codec exists).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

_MISSING = [m for m in ("flwr", "peft", "transformers") if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"needs {', '.join(_MISSING)}", allow_module_level=True)

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*click.*deprecated", category=DeprecationWarning)
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import LlamaForCausalLM

    from examples.llm.flowertune_lorafair.client_app import app as client_app
    from examples.llm.flowertune_lorafair.dataset import client_data
    from examples.llm.flowertune_lorafair.models import get_model, loss_on
    from lorafair.aggregate import lora_fair
    from lorafair.flower import BF16_STYPE, LoRAStrategy, from_array_record, to_array_record
    from lorafair.interop.peft import from_peft_state_dict


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """Flower 1.42 stamps every Message with the current task; a SuperNode sets it."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        yield
    finally:
        TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def adapter(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_tiny_llama_with_bf16_lora_on_q_and_v_only() -> None:
    model = get_model()
    base = model.get_base_model()
    assert isinstance(base, LlamaForCausalLM)
    assert base.config.num_hidden_layers == 2
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    assert all(p.dtype == torch.bfloat16 for p in trainable.values())  # not peft's fp32 upcast
    sd = adapter(model)
    assert len(sd) == 2 * 2 * 2  # layers × (q, v) × (A, B)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    again = adapter(get_model())  # every node builds the same model and LoRA initialisation
    assert all(torch.equal(sd[k], again[k]) for k in sd)


def test_three_rounds_bf16_end_to_end_with_lora_fair() -> None:
    model = get_model()
    test_ids = torch.cat([client_data(k, train=False) for k in range(3)])
    strategy = LoRAStrategy(lora_fair, options={"lam": 0.01}, fraction_evaluate=0.0)

    @torch.no_grad()
    def central_loss(sd: dict[str, torch.Tensor]) -> float:
        set_peft_model_state_dict(model, sd)
        model.eval()
        return float(loss_on(model, test_ids))

    global_sd = adapter(model)
    losses = [central_loss(global_sd)]
    config = ConfigRecord({"lr": 3e-3, "local-steps": 4})
    for rnd in (1, 2, 3):
        replies = []
        for k in range(3):
            content = RecordDict({"arrays": to_array_record(global_sd), "config": config})
            msg = Message(content=content, dst_node_id=k + 1, message_type="train")
            ctx = Context(1, k + 1, {"partition-id": k}, RecordDict(), {})
            reply = client_app(msg, ctx)
            assert not reply.has_error()
            record = reply.content["arrays"]
            assert all(record[key].stype == BF16_STYPE for key in record)  # bf16 on the wire
            replies.append(reply)
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        assert arrays is not None
        assert metrics is not None
        out = from_array_record(arrays)
        assert all(v.dtype == torch.bfloat16 for v in out.values())
        # The same aggregate as lora_fair on the clients' decoded bf16 factors.
        clients = [from_peft_state_dict(from_array_record(r.content["arrays"])) for r in replies]
        expected = lora_fair([c.factors for c in clients], [64.0] * 3, lam=0.01)
        got = from_peft_state_dict(out).factors
        for name, (A, B) in expected.items():
            A2, B2 = got[name]
            assert torch.equal(A2, A)  # Ā: the same weighted mean
            torch.testing.assert_close(B2.double(), B.double(), rtol=2e-2, atol=2e-3)
        assert metrics["solver-converged"] == 1.0
        assert 0.0 < metrics["bias-cosine-min"] <= 1.0
        global_sd = out
        losses.append(central_loss(global_sd))
    assert losses[-1] < losses[0] - 0.05, losses  # it learns the corpus


def test_flower_fedavg_cannot_read_bf16_records() -> None:
    sd = adapter(get_model())
    replies = []
    for _ in range(2):
        content = RecordDict(
            {"arrays": to_array_record(sd), "metrics": _metrics(64)},
        )
        msg = Message(content=content, dst_node_id=1, message_type="train")
        replies.append(Message(content=content, reply_to=msg))
    with pytest.raises(TypeError, match=r"[Uu]nsupported serialization type"):
        FedAvg().aggregate_train(1, replies)
    arrays, _ = LoRAStrategy(lora_fair).aggregate_train(1, replies)
    assert arrays is not None


def _metrics(n: int) -> Any:
    from flwr.app import MetricRecord

    return MetricRecord({"num-examples": n})
