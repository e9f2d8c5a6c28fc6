"""read_adapter / write_adapter on folders that real peft writes and loads.

References are independent: factors and scalings as peft's own LoRA layers hold them
(tests/interop/peft_llama.py), updates formed densely in float64, and peft's
``PeftModel.from_pretrained`` + ``merge_and_unload`` as the judge of what a folder applies.
``filterwarnings = error`` turns peft's missing/unexpected-key warnings into failures.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from lorafair.errors import (
    AdapterFolderError,
    LayerKeyError,
    LoRAFairError,
    LoRAShapeError,
    NonFiniteError,
)
from lorafair.interop.peft import (
    applied_factors,
    read_adapter,
    write_adapter,
)
from tests.interop.peft_llama import (
    IGNORE_TRANSFORMERS_DEPRECATION,
    Client,
    dense,
    merged_deltas,
    save_client,
    tiny_base,
)

pytestmark = pytest.mark.filterwarnings(IGNORE_TRANSFORMERS_DEPRECATION)

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
V0 = "base_model.model.model.layers.0.self_attn.v_proj"
Q1 = "base_model.model.model.layers.1.self_attn.q_proj"
V1 = "base_model.model.model.layers.1.self_attn.v_proj"

CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {"r": 4, "lora_alpha": 8},
    "odd_alpha": {"r": 4, "lora_alpha": 5},
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True},
    "patterns": {
        "r": 4,
        "lora_alpha": 8,
        # peft matches (.*\.)?(pattern)$: a suffix, and a full module path
        "rank_pattern": {"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
        "alpha_pattern": {"layers.0.self_attn.q_proj": 3},
    },
    "rslora_patterns": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "rank_pattern": {"q_proj": 8},
    },
}


@pytest.fixture(scope="module")
def base() -> Any:
    return tiny_base()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_read_gives_peft_factors_and_scalings(base: Any, tmp_path: Path, name: str) -> None:
    client = save_client(base, tmp_path / "c", seed=1, **CONFIGS[name])
    adapter = read_adapter(client.path, client=3)
    assert adapter.path == client.path
    assert list(adapter.factors) == list(client.factors)
    assert adapter.scalings == client.scalings  # exactly peft's value, per layer
    assert adapter.dtype == torch.float32
    assert adapter.others == {}
    assert adapter.config["r"] == CONFIGS[name]["r"]
    for layer, (A, B) in client.factors.items():
        torch.testing.assert_close(adapter.factors[layer].A.double(), A, rtol=0, atol=0)
        torch.testing.assert_close(adapter.factors[layer].B.double(), B, rtol=0, atol=0)
    applied = applied_factors(adapter)
    for layer, (A, B) in client.applied().items():
        torch.testing.assert_close(dense(applied)[layer], B @ A, rtol=1e-6, atol=1e-7)


def test_read_bin_format(base: Any, tmp_path: Path) -> None:
    client = save_client(base, tmp_path / "c", seed=2, r=2, lora_alpha=4)
    folder = Path(client.path)
    from safetensors.torch import load_file

    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    adapter = read_adapter(folder)
    assert adapter.scalings == client.scalings
    for layer, (A, _) in client.factors.items():
        assert torch.equal(adapter.factors[layer].A.double(), A)


def _random_update(
    like: dict[str, tuple[Tensor, Tensor]], ranks: dict[str, int], seed: int
) -> dict[str, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer, (A, B) in like.items():
        r = ranks[layer]
        out[layer] = (
            torch.randn(r, A.shape[1], generator=g, dtype=torch.float64),
            torch.randn(B.shape[0], r, generator=g, dtype=torch.float64) * 0.3,
        )
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
    "ranks",
    [
        {Q0: 4, V0: 4, Q1: 4, V1: 4},  # one rank everywhere (FLoRA-like stacked ranks below)
        {Q0: 12, V0: 12, Q1: 12, V1: 12},
        {Q0: 3, V0: 7, Q1: 1, V1: 12},  # FlexLoRA EnergyThreshold-like per-layer ranks
    ],
    ids=["r4", "r12", "mixed"],
)
def test_written_folder_loads_and_merges_to_base_plus_update(
    base: Any, tmp_path: Path, name: str, ranks: dict[str, int]
) -> None:
    client = save_client(base, tmp_path / "c", seed=3, **CONFIGS[name])
    like = read_adapter(client.path)
    update = _random_update(client.factors, ranks, seed=4)
    write_adapter(tmp_path / "out", update, like=like)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    for key, value in like.config.items():
        if key not in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
            assert config[key] == value, key
    # every pattern key matches exactly one module under peft's rule
    modules = [layer.removeprefix("base_model.model.") for layer in client.factors]
    for pattern in list(config["rank_pattern"]) + list(config["alpha_pattern"]):
        assert sum(bool(re.match(rf"(.*\.)?({pattern})$", m)) for m in modules) == 1
    deltas = merged_deltas(base, tmp_path / "out")
    assert set(deltas) == set(update)
    for layer, want in dense(update).items():
        torch.testing.assert_close(deltas[layer], want, rtol=1e-5, atol=1e-5)
    again = read_adapter(tmp_path / "out")
    assert {n: f.A.shape[0] for n, f in again.factors.items()} == ranks
    # each layer keeps like's scaling s, so further local training steps as before
    for layer in ranks:
        assert math.isclose(again.scalings[layer], like.scalings[layer], rel_tol=1e-12)


def test_bf16_in_bf16_out(tmp_path: Path) -> None:
    base16 = tiny_base(torch.bfloat16)
    client = save_client(base16, tmp_path / "c", seed=5, r=4, lora_alpha=8)
    like = read_adapter(client.path)
    assert like.dtype == torch.bfloat16
    update = {
        n: (A.to(torch.bfloat16), B.to(torch.bfloat16))
        for n, (A, B) in _random_update(client.factors, dict.fromkeys(client.factors, 8), 6).items()
    }
    write_adapter(tmp_path / "out", update, like=like)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    # s = 8/4 = 2 is kept and is a power of two, so B / s is exact in bf16
    for layer, (A, B) in update.items():
        assert torch.equal(stored[f"{layer}.lora_A.weight"], A)
        assert torch.equal(stored[f"{layer}.lora_B.weight"].double() * 2, B.double())
    deltas = merged_deltas(base16, tmp_path / "out")
    for layer, want in dense(update).items():
        # the merged bf16 weight is W0 + ΔW rounded once: |error| ≤ 2⁻⁸ |W0 + ΔW| (|W0| < 1)
        bound = 2.0**-8 * (want.abs() + 1.0)
        assert bool(((deltas[layer] - want).abs() <= bound).all()), layer


def test_others_kept_and_written(base: Any, tmp_path: Path) -> None:
    client = save_client(
        base, tmp_path / "c", seed=7, r=2, lora_alpha=4, modules_to_save=["lm_head"]
    )
    like = read_adapter(client.path)
    assert list(like.others) == ["base_model.model.lm_head.weight"]
    head = like.others["base_model.model.lm_head.weight"]
    new_head = head + 1.0
    write_adapter(
        tmp_path / "out",
        applied_factors(like),
        like=like,
        others={"base_model.model.lm_head.weight": new_head},
    )
    model = peft_load(base, tmp_path / "out")
    got = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(got.detach(), new_head)


def peft_load(base: Any, folder: Path) -> Any:
    import copy

    import peft

    return peft.PeftModel.from_pretrained(copy.deepcopy(base), os.fspath(folder))


# ---- errors -------------------------------------------------------------------------------


@pytest.fixture
def saved(base: Any, tmp_path: Path) -> Client:
    return save_client(base, tmp_path / "c", seed=8, r=2, lora_alpha=4)


def _state(client: Client) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(client.path) / "adapter_model.safetensors")


def _save_state(client: Client, state: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(state, Path(client.path) / "adapter_model.safetensors")


def test_error_missing_folder_and_files(tmp_path: Path, saved: Client) -> None:
    with pytest.raises(AdapterFolderError, match=r"client 2 \(.*nope\): not a folder"):
        read_adapter(tmp_path / "nope", client=2)
    (Path(saved.path) / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFolderError, match=r"client 1 .*neither adapter_model.safetensors"):
        read_adapter(saved.path, client=1)
    (Path(saved.path) / "adapter_config.json").unlink()
    with pytest.raises(AdapterFolderError, match=r"client 1 .*no adapter_config.json"):
        read_adapter(saved.path, client=1)


def test_error_truncated_safetensors(saved: Client) -> None:
    file = Path(saved.path) / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-40])
    with pytest.raises(AdapterFolderError, match=r"client 0 .*adapter_model.safetensors cannot"):
        read_adapter(saved.path, client=0)


def test_error_bad_json(saved: Client) -> None:
    (Path(saved.path) / "adapter_config.json").write_text('{"r": 2,')
    with pytest.raises(AdapterFolderError, match=r"client 4 .*adapter_config.json.*JSON"):
        read_adapter(saved.path, client=4)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_error_non_finite_names_file_layer_client(saved: Client, bad: float) -> None:
    state = _state(saved)
    state[f"{V1}.lora_B.weight"][0, 0] = bad
    _save_state(saved, state)
    with pytest.raises(NonFiniteError, match=rf"client 5 .*safetensors: layer '{V1}': lora_B"):
        read_adapter(saved.path, client=5)


def test_error_rank_disagrees_with_config(saved: Client) -> None:
    state = _state(saved)
    state[f"{Q0}.lora_A.weight"] = torch.zeros(3, 32)
    state[f"{Q0}.lora_B.weight"] = torch.zeros(32, 3)
    _save_state(saved, state)
    with pytest.raises(LoRAShapeError, match=rf"layer '{Q0}': lora_A has rank 3 .* rank 2"):
        read_adapter(saved.path, client=0)


def test_error_inconsistent_factor_shapes(saved: Client) -> None:
    state = _state(saved)
    state[f"{Q0}.lora_B.weight"] = torch.zeros(32, 3)
    _save_state(saved, state)
    with pytest.raises(LoRAShapeError, match=rf"client 0 .*layer '{Q0}'"):
        read_adapter(saved.path, client=0)


def test_error_missing_factor(saved: Client) -> None:
    state = _state(saved)
    del state[f"{Q0}.lora_B.weight"]
    _save_state(saved, state)
    with pytest.raises(LayerKeyError, match=rf"client 0 .*layer '{Q0}' has lora_A but no lora_B"):
        read_adapter(saved.path, client=0)


@pytest.mark.parametrize(
    "key",
    [
        f"{Q0}.lora_magnitude_vector",
        "base_model.model.model.embed_tokens.lora_embedding_A",
        f"{Q0}.lora_B.bias",
    ],
)
def test_error_unsupported_keys_named(saved: Client, key: str) -> None:
    state = _state(saved)
    state[key] = torch.zeros(2)
    _save_state(saved, state)
    with pytest.raises(AdapterFolderError, match=rf"client 0 .*key '{key}'"):
        read_adapter(saved.path, client=0)


def test_error_dora_config(saved: Client) -> None:
    file = Path(saved.path) / "adapter_config.json"
    config = json.loads(file.read_text())
    config["use_dora"] = True
    file.write_text(json.dumps(config))
    with pytest.raises(AdapterFolderError, match=r"client 0 .*use_dora=True"):
        read_adapter(saved.path, client=0)


def test_write_refuses_non_empty_without_force(saved: Client, tmp_path: Path) -> None:
    like = read_adapter(saved.path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(AdapterFolderError, match="not empty"):
        write_adapter(out, applied_factors(like), like=like)
    assert os.listdir(out) == ["keep.txt"]
    write_adapter(out, applied_factors(like), like=like, force=True)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    write_adapter(tmp_path / "empty", applied_factors(like), like=like)  # absent: fine
    (tmp_path / "empty2").mkdir()
    write_adapter(tmp_path / "empty2", applied_factors(like), like=like)  # empty: fine


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ("nan", NonFiniteError),
        ("shape", LoRAShapeError),
        ("layer", LayerKeyError),
    ],
)
def test_write_failure_leaves_nothing(
    saved: Client, tmp_path: Path, change: str, error: type[LoRAFairError]
) -> None:
    like = read_adapter(saved.path)
    update = dict(applied_factors(like))
    A, B = update[Q0]
    if change == "nan":
        update[Q0] = (A, B.clone().fill_(math.nan))
    elif change == "shape":
        update[Q0] = (A[:, :5], B)
    else:
        del update[Q0]
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(error, match=Q0):
        write_adapter(tmp_path / "out", update, like=like)
    assert sorted(os.listdir(tmp_path)) == before  # no folder, no temporary left behind
