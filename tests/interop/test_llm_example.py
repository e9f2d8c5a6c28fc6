"""examples/llm: FlowerTune's LLM template on a tiny offline Llama, aggregated by lorafair.

The ServerApp's ``main`` runs with ``examples.flower.inprocess.InProcessGrid`` (Flower's
Message API in one process, no ray) against the ClientApp, with the run config read from the
app's own ``pyproject.toml`` as Flower flattens it. Checked: a Llama built from a config with
float32 LoRA only on q_proj/v_proj (bf16 base), as FlowerTune's; a ``save_pretrained``
checkpoint ``peft_<round>`` every round that ``PeftModel.from_pretrained`` loads; the held-out
loss of the checkpoints goes down; the aggregate equals the method on the clients' uploads;
the bf16 option trains bf16 adapters whose uploads hold bf16 values exactly; Flower's own
FedAvg cannot read bf16 records (why :func:`lorafair.flower.to_array_record` exists).
"""

from __future__ import annotations

import importlib.util
import itertools
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

_MISSING = [m for m in ("flwr", "peft", "transformers") if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"needs {', '.join(_MISSING)}", allow_module_level=True)

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*click.*deprecated", category=DeprecationWarning)
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.common.config import unflatten_dict
    from flwr.serverapp.strategy import FedAvg
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import LlamaForCausalLM

    from examples.flower.inprocess import InProcessGrid, serving
    from examples.llm.flowertune_lorafair import server_app
    from examples.llm.flowertune_lorafair.client_app import app as client_app
    from examples.llm.flowertune_lorafair.dataset import (
        DictConfig,
        encode,
        load_data,
        replace_keys,
    )
    from examples.llm.flowertune_lorafair.models import get_base_model, get_model, loss_on
    from lorafair import registry
    from lorafair.flower import LoRAStrategy, from_array_record, to_array_record
    from lorafair.interop.peft import from_peft_state_dict

APP = Path(__file__).resolve().parents[2] / "examples" / "llm"
CLIENTS = 3


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_config(**overrides: Any) -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]`` (and ``.static``) flattened, as Flower reads it."""
    config = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    static = config.pop("static", {})
    return {**_flatten(config), **_flatten(static), **overrides}


def run(tmp: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> tuple[Path, Any]:
    monkeypatch.chdir(tmp)
    cfg = run_config(**overrides)
    grid = InProcessGrid(client_app, CLIENTS, run_config=cfg)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    with serving():
        server_app.main(grid, context)
    (results,) = (tmp / "results").iterdir()
    return results, grid


def model_cfg(**overrides: Any) -> Any:
    return DictConfig(replace_keys(unflatten_dict(run_config(**overrides)))).model


def test_tiny_llama_with_float32_lora_on_q_and_v_only() -> None:
    model = get_model(model_cfg())
    base = model.get_base_model()
    assert isinstance(base, LlamaForCausalLM)
    assert base.config.num_hidden_layers == 2
    assert base.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # the frozen base
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    assert all(p.dtype == torch.float32 for p in trainable.values())  # as FlowerTune's
    sd = get_peft_model_state_dict(model)
    again = get_peft_model_state_dict(get_model(model_cfg()))  # every node builds the same
    assert all(torch.equal(sd[k], again[k]) for k in sd)


def from_pretrained(folder: Path) -> Any:
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        return PeftModel.from_pretrained(get_base_model(), str(folder))


def held_out_loss(folder: Path | None) -> float:
    model = get_base_model() if folder is None else from_pretrained(folder)
    ids = torch.cat([encode(load_data(k, CLIENTS, "", train=False)["text"]) for k in range(3)])
    with torch.no_grad():
        model.eval()
        return float(loss_on(model, ids))


def test_flowertune_rounds_checkpoint_every_round_and_learn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, grid = run(tmp_path, monkeypatch)
    rounds = int(run_config()["num-server-rounds"])
    assert sorted(p.name for p in results.iterdir()) == [f"peft_{r}" for r in range(1, rounds + 1)]
    losses = [held_out_loss(None)] + [held_out_loss(results / f"peft_{r}") for r in (1, 2, 3)]
    assert losses[-1] < losses[0] - 0.05, losses  # it learns the corpus
    # The last checkpoint is LoRA-FAIR of the last round's uploads (the replies the grid saw
    # are not kept; rebuild them from the clients: training is deterministic per round).
    last = [m for m in grid.delivered if m.content.config_records["config"]["server-round"] == 3]
    replies = [client_app(m, grid.contexts[m.metadata.dst_node_id]) for m in last]
    uploads = [from_peft_state_dict(r.content["arrays"].to_torch_state_dict()) for r in replies]
    spec = registry.get(str(run_config()["strategy.aggregator"]))
    n = [float(r.content["metrics"]["num-examples"]) for r in replies]
    saved = from_pretrained(results / "peft_3")
    got = from_peft_state_dict(get_peft_model_state_dict(saved)).factors

    def equal(perm: tuple[int, ...]) -> bool:
        out = spec.fn([uploads[i].factors for i in perm], [n[i] for i in perm], **spec.defaults)
        return all(
            torch.equal(got[name].A, A) and torch.equal(got[name].B, B)
            for name, (A, B) in out.items()
        )

    # Bit for bit, in the one order of the replies the strategy aggregated in (its content
    # order, which this test does not reimplement: one of the orders must match exactly).
    assert any(equal(perm) for perm in itertools.permutations(range(len(replies))))


def test_bf16_adapters_are_an_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results, grid = run(
        tmp_path, monkeypatch, **{"model.lora.adapter-dtype": "bfloat16", "num-server-rounds": 1}
    )
    assert (results / "peft_1" / "adapter_config.json").is_file()
    (first,) = [m for m in grid.delivered][:1]
    reply = client_app(first, grid.contexts[first.metadata.dst_node_id])
    sd = reply.content["arrays"].to_torch_state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values())  # FlowerTune's wire format
    assert all(torch.equal(v, v.bfloat16().float()) for v in sd.values())  # bf16 values


def test_flower_fedavg_cannot_read_bf16_records() -> None:
    sd = {k: v.bfloat16() for k, v in get_peft_model_state_dict(get_model(model_cfg())).items()}
    with serving():
        replies = []
        for _ in range(2):
            content = RecordDict(
                {"arrays": to_array_record(sd), "metrics": MetricRecord({"num-examples": 64})}
            )
            msg = Message(content=content, dst_node_id=1, message_type="train")
            replies.append(Message(content=content, reply_to=msg))
    with pytest.raises(TypeError, match=r"[Uu]nsupported serialization type"):
        FedAvg().aggregate_train(1, replies)
    arrays, _ = LoRAStrategy("lora_fair").aggregate_train(1, replies)
    assert arrays is not None
    assert all(v.dtype == torch.bfloat16 for v in from_array_record(arrays).values())
