"""Every round's checkpoint (a peft adapter folder, the exact arrays, the round, the strategy's
state), and a run stopped after round 2 of 4 that resumes from it to the same final adapter,
bit for bit (the example's training is deterministic), in process (``InProcessGrid``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*click.*deprecated", category=DeprecationWarning)
    pytest.importorskip("flwr")
    peft = pytest.importorskip("peft")
    from flwr.serverapp.strategy import Result

    from examples.flower.inprocess import InProcessGrid, serving
    from examples.flower.lorafair_app import client_app as example_client
    from examples.flower.lorafair_app.server_app import run_strategy
    from examples.flower.lorafair_app.task import base_model, lora_model
    from lorafair.flower import LoRAStrategy, from_array_record, latest_checkpoint

from safetensors.torch import load_file

from lorafair.interop.peft import from_peft_state_dict, read_adapter

CLIENTS, ROUNDS = 3, 4


def run(method: str, folder: Path | None, rounds: int = ROUNDS, **kw: object) -> Result:
    grid = InProcessGrid(example_client.app, CLIENTS)  # fresh nodes: a new run, empty state
    with serving():
        return run_strategy(
            grid,
            method=method,
            rounds=rounds,
            min_nodes=CLIENTS,
            fraction_evaluate=0.0,
            checkpoint_dir=str(folder or ""),
            **kw,  # type: ignore[arg-type]
        )


@pytest.mark.parametrize("method", ["fedit", "rolora", "fedex_lora"])
def test_stopped_after_round_2_of_4_resumes_to_the_same_adapter(
    method: str, tmp_path: Path
) -> None:
    whole = run(method, tmp_path / "whole")
    first = run(method, tmp_path / "cut", stop_after=2)
    assert latest_checkpoint(tmp_path / "cut") == str(tmp_path / "cut" / "round-2")
    rest = run(method, tmp_path / "cut", resume=True)
    assert sorted(first.train_metrics_clientapp) == [1, 2]
    assert sorted(rest.train_metrics_clientapp) == [3, 4]  # continues at the next round
    want, got = from_array_record(whole.arrays), from_array_record(rest.arrays)
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    for r in (3, 4):  # the same rounds, the same clients' metrics
        assert dict(rest.train_metrics_clientapp[r]) == dict(whole.train_metrics_clientapp[r])
    assert dict(rest.evaluate_metrics_serverapp[4]) == dict(whole.evaluate_metrics_serverapp[4])


def test_each_round_is_a_peft_folder_that_peft_loads(tmp_path: Path) -> None:
    result = run("flora", tmp_path, rounds=2)  # FLoRA: the rank changes every round (8, 24)
    for r in (1, 2):
        folder = tmp_path / f"round-{r}"
        state = json.loads((folder / "state.json").read_text())
        assert state["round"] == r
        assert state["method"] == "flora"
    # Round 1's folder applies exactly round 1's global update (scaling folded in).
    final = from_peft_state_dict(load_file(tmp_path / "round-1" / "arrays.safetensors"))
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    model = peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "round-1" / "adapter"))
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x)
        base = base_model()
        h = x
        for name, layer in (("fc1", base.fc1), ("fc2", base.fc2)):
            A, B = final.factors[f"base_model.model.{name}"]
            h = torch.relu(layer(h) + h @ (B.double() @ A.double()).float().T)
        head = final.others["base_model.model.head.weight"]
        bias = final.others["base_model.model.head.bias"]
        want = h @ head.T + bias
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert read_adapter(tmp_path / "round-1" / "adapter").config["r"] == CLIENTS * 8


def test_restore_refuses_another_method(tmp_path: Path) -> None:
    run("fedit", tmp_path, stop_after=1)
    like = read_adapter(tmp_path / "initial")
    strategy = LoRAStrategy("lora_fair", checkpoint_dir=tmp_path, checkpoint_like=like)
    with pytest.raises(ValueError, match="'fedit', not 'lora_fair'"):
        strategy.restore(tmp_path / "round-1")
    with pytest.raises(ValueError, match="go together"):
        LoRAStrategy("fedit", checkpoint_dir=tmp_path)
    assert lora_model(4, 8.0) is not None
