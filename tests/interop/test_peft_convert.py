"""lorafair.interop.peft on hand-built state dicts (no peft needed)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lorafair.errors import (
    AdapterFolderError,
    AdapterFormatError,
    DtypeMismatchError,
    EmptyClientsError,
    InvalidWeightsError,
    LayerKeyError,
    LoRAFairError,
    LoRAShapeError,
    NonFiniteError,
)
from lorafair.interop.peft import (
    PeftAdapter,
    PeftSplit,
    fedavg_others,
    fold_scaling,
    from_peft_state_dict,
    lora_scaling,
    to_peft_state_dict,
    unfold_scaling,
)
from lorafair.interop.peft_aggregate import aggregate_adapters
from lorafair.types import LoRAFactors

P = "base_model.model."


def _saved(seed: int = 0, r: int = 2) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{P}enc.fc1.lora_A.weight": torch.randn(r, 6, generator=g),
        f"{P}enc.fc1.lora_B.weight": torch.randn(5, r, generator=g),
        f"{P}head.weight": torch.randn(2, 3, generator=g),
        f"{P}enc.fc2.lora_A.weight": torch.randn(r, 5, generator=g),
        f"{P}enc.fc2.lora_B.weight": torch.randn(3, r, generator=g),
        f"{P}head.bias": torch.randn(2, generator=g),
    }


def _module_format(sd: dict[str, Tensor], adapter: str) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        if ".lora_" in k:
            stem, _, last = k.rpartition(".")
            out[f"{stem}.{adapter}.{last}"] = v
        else:
            out[k] = v
    return out


def test_saved_format_split_and_exact_round_trip() -> None:
    sd = _saved()
    split = from_peft_state_dict(sd)
    assert split.adapter_name is None
    assert list(split.factors) == [f"{P}enc.fc1", f"{P}enc.fc2"]
    assert list(split.others) == [f"{P}head.weight", f"{P}head.bias"]
    A, B = split.factors[f"{P}enc.fc1"]
    assert A is sd[f"{P}enc.fc1.lora_A.weight"]
    assert B is sd[f"{P}enc.fc1.lora_B.weight"]
    back = to_peft_state_dict(split.factors, like=sd, others=split.others)
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)


def test_module_format_keeps_other_adapters_and_base_weights_in_others() -> None:
    sd = _module_format(_saved(), "default")
    sd[f"{P}enc.fc1.base_layer.weight"] = torch.randn(5, 6)
    sd[f"{P}enc.fc1.lora_A.other.weight"] = torch.randn(4, 6)
    sd[f"{P}enc.fc1.lora_B.other.weight"] = torch.randn(5, 4)
    split = from_peft_state_dict(sd)
    assert split.adapter_name == "default"
    assert list(split.factors) == [f"{P}enc.fc1", f"{P}enc.fc2"]
    assert set(split.others) == {
        f"{P}head.weight",
        f"{P}head.bias",
        f"{P}enc.fc1.base_layer.weight",
        f"{P}enc.fc1.lora_A.other.weight",
        f"{P}enc.fc1.lora_B.other.weight",
    }
    back = to_peft_state_dict(split.factors, like=sd, others=split.others)
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)
    other = from_peft_state_dict(sd, adapter_name="other")
    assert other.adapter_name == "other"
    assert other.factors[f"{P}enc.fc1"].A.shape == (4, 6)
    assert f"{P}enc.fc1.lora_A.default.weight" in other.others


def test_same_layer_names_in_both_formats() -> None:
    sd = _saved()
    a = from_peft_state_dict(sd)
    b = from_peft_state_dict(_module_format(sd, "default"))
    assert list(a.factors) == list(b.factors)
    for name in a.factors:
        assert a.factors[name].A is b.factors[name].A


def test_module_format_output_from_split_like() -> None:
    sd = _module_format(_saved(), "default")
    split = from_peft_state_dict(sd)
    new = {n: (2 * A, 3 * B) for n, (A, B) in split.factors.items()}
    out = to_peft_state_dict(new, like=split)
    assert set(out) == {k for k in sd if ".lora_" in k}
    torch.testing.assert_close(
        out[f"{P}enc.fc2.lora_B.default.weight"], 3 * sd[f"{P}enc.fc2.lora_B.default.weight"]
    )


def test_other_rank_is_written_and_new_others_appended() -> None:
    sd = _saved(r=2)
    split = from_peft_state_dict(sd)
    stacked = {
        n: (torch.zeros(6, A.shape[1]), torch.zeros(B.shape[0], 6))
        for n, (A, B) in split.factors.items()
    }
    extra = dict(split.others, **{"new.bias": torch.ones(1)})
    out = to_peft_state_dict(stacked, like=sd, others=extra)
    assert list(out) == [*sd, "new.bias"]
    assert out[f"{P}enc.fc1.lora_A.weight"].shape == (6, 6)


def test_parse_errors_name_the_layer() -> None:
    sd = _saved()
    del sd[f"{P}enc.fc2.lora_B.weight"]
    with pytest.raises(LayerKeyError, match=r"enc\.fc2.*lora_A but no lora_B"):
        from_peft_state_dict(sd)
    sd = _saved()
    sd[f"{P}enc.fc1.lora_A.weight"] = torch.zeros(2, 6, 1, 1)
    with pytest.raises(LoRAShapeError, match=r"enc\.fc1"):
        from_peft_state_dict(sd)
    sd = _saved()
    sd[f"{P}enc.fc1.lora_B.weight"] = torch.zeros(5, 3)
    with pytest.raises(LoRAShapeError, match=r"enc\.fc1"):
        from_peft_state_dict(sd)
    mixed = dict(_saved())
    mixed[f"{P}x.lora_A.default.weight"] = torch.zeros(1, 2)
    mixed[f"{P}x.lora_B.default.weight"] = torch.zeros(2, 1)
    with pytest.raises(LayerKeyError, match="mixes key formats"):
        from_peft_state_dict(mixed)
    with pytest.raises(LayerKeyError, match="no lora_A/lora_B"):
        from_peft_state_dict({"head.weight": torch.zeros(1)})
    with pytest.raises(LayerKeyError, match="no lora_A/lora_B"):
        from_peft_state_dict(_module_format(_saved(), "default"), adapter_name="nope")


def test_to_peft_layer_mismatch_errors() -> None:
    sd = _saved()
    split = from_peft_state_dict(sd)
    partial = dict(split.factors)
    partial.pop(f"{P}enc.fc2")
    with pytest.raises(LayerKeyError, match=r"lack layer .*enc\.fc2"):
        to_peft_state_dict(partial, like=sd)
    more = dict(split.factors, extra=split.factors[f"{P}enc.fc2"])
    with pytest.raises(LayerKeyError, match="'extra'"):
        to_peft_state_dict(more, like=sd)
    with pytest.raises(LayerKeyError, match="collides"):
        to_peft_state_dict(
            split.factors, like=split, others={f"{P}enc.fc1.lora_A.weight": torch.zeros(1)}
        )


_VARIANT_KEYS = [
    f"{P}enc.fc1.lora_magnitude_vector",  # DoRA, saved format
    f"{P}emb.lora_embedding_A",  # embedding LoRA, saved format
    f"{P}emb.lora_embedding_B",
    f"{P}enc.fc1.lora_B.bias",  # LoRA bias, saved format
]


def _variant(sd: dict[str, Tensor], key: str) -> dict[str, Tensor]:
    return dict(sd, **{key: torch.ones(5)})


@pytest.mark.parametrize("key", _VARIANT_KEYS)
def test_from_peft_refuses_lora_variants_by_name(key: str) -> None:
    with pytest.raises(AdapterFormatError, match=rf"^key '{key}' is "):
        from_peft_state_dict(_variant(_saved(), key))
    with pytest.raises(AdapterFormatError, match=rf"^client 2: key '{key}' is "):
        from_peft_state_dict(_variant(_saved(), key), client=2)


@pytest.mark.parametrize(
    "key",
    [
        f"{P}enc.fc1.lora_magnitude_vector.default.weight",
        f"{P}emb.lora_embedding_A.default",
        f"{P}enc.fc1.lora_A.default.bias",
        f"{P}enc.fc1.lora_magnitude_vector.other.weight",  # another adapter's DoRA too
    ],
)
def test_from_peft_refuses_lora_variants_in_module_format(key: str) -> None:
    sd = _variant(_module_format(_saved(), "default"), key)
    with pytest.raises(AdapterFormatError, match=rf"key '{key}'"):
        from_peft_state_dict(sd)


@pytest.mark.parametrize("key", _VARIANT_KEYS)
def test_fedavg_others_refuses_lora_variants_naming_key_and_client(key: str) -> None:
    plain = {f"{P}head.weight": torch.ones(2)}
    odd = dict(plain, **{key: torch.ones(5)})
    with pytest.raises(AdapterFormatError, match=rf"^client 1: key '{key}' is "):
        fedavg_others([plain, odd, odd])
    with pytest.raises(AdapterFormatError, match=rf"^client 0: key '{key}' is "):
        fedavg_others([odd, odd])  # same keys everywhere: still refused, not averaged


def test_plain_others_and_other_adapters_still_split_and_averaged() -> None:
    # not refused: heads, biases of ordinary modules, other adapters' lora_A/lora_B weights
    sd = _module_format(_saved(), "default")
    sd[f"{P}enc.fc1.lora_A.other.weight"] = torch.randn(4, 6)
    sd[f"{P}enc.fc1.base_layer.bias"] = torch.randn(5)
    split = from_peft_state_dict(sd, client=0)
    out = fedavg_others([split.others, split.others])
    assert set(out) == set(split.others)


def test_to_peft_refuses_wrong_d_in_or_d_out_naming_layer_and_shapes() -> None:
    sd = _saved(r=2)
    split = from_peft_state_dict(sd)
    A, B = split.factors[f"{P}enc.fc1"]  # A (2, 6), B (5, 2)
    for bad in ((torch.zeros(2, 7), B), (A, torch.zeros(4, 2)), (A, torch.zeros(5, 3))):
        factors = dict(split.factors, **{f"{P}enc.fc1": bad})
        with pytest.raises(LoRAShapeError, match=r"layer '.*enc\.fc1'.*\(2, 6\).*\(5, 2\)"):
            to_peft_state_dict(factors, like=sd)
    for bad_pair in ((A[None], B), (A, B.flatten())):
        factors = dict(split.factors, **{f"{P}enc.fc1": bad_pair})
        with pytest.raises(LoRAShapeError, match=r"enc\.fc1.*2-D"):
            to_peft_state_dict(factors, like=split)


def test_to_peft_other_rank_allowed_unless_same_rank() -> None:
    sd = _saved(r=8)
    split = from_peft_state_dict(sd)
    rank4 = {n: LoRAFactors(A[:4], B[:, :4]) for n, (A, B) in split.factors.items()}
    out = to_peft_state_dict(rank4, like=sd)  # by design: like gives the layout, not the rank
    assert out[f"{P}enc.fc1.lora_A.weight"].shape == (4, 6)
    with pytest.raises(
        LoRAShapeError, match=r"layer '.*enc\.fc1': A \(4, 6\) and B \(5, 4\).*A \(8, 6\)"
    ):
        to_peft_state_dict(rank4, like=sd, same_rank=True)
    same = to_peft_state_dict(split.factors, like=split, same_rank=True)
    assert same[f"{P}enc.fc2.lora_B.weight"] is sd[f"{P}enc.fc2.lora_B.weight"]


def test_fedavg_others_against_plain_reference() -> None:
    g = torch.Generator().manual_seed(3)
    others = [
        {
            "w": torch.randn(3, 2, generator=g),
            "h": torch.randn(4, generator=g, dtype=torch.float64),
            "n": torch.tensor(7),
        }
        for _ in range(3)
    ]
    w = [1.0, 2.0, 5.0]
    out = fedavg_others(others, w)
    ref_w = sum(wi * o["w"].double() for wi, o in zip(w, others, strict=True)) / 8.0
    ref_h = sum(wi * o["h"] for wi, o in zip(w, others, strict=True)) / 8.0
    assert out["w"].dtype == torch.float32
    torch.testing.assert_close(out["w"], ref_w.float())
    torch.testing.assert_close(out["h"], ref_h, rtol=1e-15, atol=1e-15)
    assert torch.equal(out["n"], torch.tensor(7))
    uniform = fedavg_others(others)
    torch.testing.assert_close(uniform["w"].double(), sum(o["w"].double() for o in others) / 3)


def test_fedavg_others_errors() -> None:
    a = {"w": torch.ones(2), "n": torch.tensor(1)}
    b = {"w": torch.ones(2), "n": torch.tensor(2)}
    with pytest.raises(LoRAFairError, match=r"'n': client 1 differs"):
        fedavg_others([a, b])
    assert int(fedavg_others([a, b], nonfloat="first")["n"]) == 1
    with pytest.raises(LayerKeyError, match="client 1 is missing key 'n'"):
        fedavg_others([a, {"w": torch.ones(2)}])
    with pytest.raises(LoRAShapeError, match=r"'w': client 1 has shape \(3,\)"):
        fedavg_others([a, {"w": torch.ones(3), "n": torch.tensor(1)}])
    with pytest.raises(DtypeMismatchError, match="'w': client 1"):
        fedavg_others([a, {"w": torch.ones(2, dtype=torch.float64), "n": torch.tensor(1)}])
    with pytest.raises(NonFiniteError, match="'w': client 1"):
        fedavg_others([a, {"w": torch.tensor([1.0, math.nan]), "n": torch.tensor(1)}])
    with pytest.raises(InvalidWeightsError):
        fedavg_others([a, a], [1.0, -1.0])
    with pytest.raises(EmptyClientsError):
        fedavg_others([])


def test_lora_scaling_plain_and_rslora() -> None:
    assert lora_scaling(8, 16) == 2.0
    assert lora_scaling(16, 8, use_rslora=True) == 2.0
    assert lora_scaling(3, 4, use_rslora=True) == pytest.approx(4 / math.sqrt(3), rel=1e-15)
    with pytest.raises(LoRAFairError):
        lora_scaling(0, 1.0)


def test_fold_then_unfold_and_effective_update() -> None:
    g = torch.Generator().manual_seed(1)
    f = {
        "a": (torch.randn(2, 4, generator=g), torch.randn(3, 2, generator=g)),
        "b": (torch.randn(1, 4, generator=g), torch.randn(3, 1, generator=g)),
    }
    s = {"a": 0.5, "b": 4.0 / math.sqrt(1)}
    folded = fold_scaling(f, s)
    for n, (A, B) in f.items():
        torch.testing.assert_close(folded[n].B @ folded[n].A, s[n] * (B @ A))
        assert folded[n].A is A
    back = unfold_scaling(folded, s)
    for n, (_, B) in f.items():
        torch.testing.assert_close(back[n].B, B)
    torch.testing.assert_close(fold_scaling(f, 2.0)["b"].B, 2.0 * f["b"][1])
    with pytest.raises(LayerKeyError, match="'b'"):
        fold_scaling(f, {"a": 1.0})
    with pytest.raises(LoRAFairError, match="'a'"):
        unfold_scaling(f, 0.0)


def test_split_is_a_namedtuple() -> None:
    factors, others, adapter = from_peft_state_dict(_saved())
    assert isinstance(from_peft_state_dict(_saved()), PeftSplit)
    assert adapter is None
    assert len(factors) == 2
    assert len(others) == 2


def test_cli_check_shares_the_rule_and_names_the_client() -> None:
    def adapter(path: str, others: dict[str, Tensor]) -> PeftAdapter:
        split = from_peft_state_dict(_saved())
        scalings = dict.fromkeys(split.factors, 1.0)
        config = {"r": 2, "lora_alpha": 2, "modules_to_save": ["head"]}
        return PeftAdapter(path, config, split.factors, scalings, others, torch.float32)

    key = f"{P}enc.fc1.lora_magnitude_vector"
    clients = [adapter("c0", {}), adapter("c1", {key: torch.ones(5)})]
    with pytest.raises(AdapterFolderError, match=rf"^client 1 \(c1\): key '{key}' is DoRA"):
        aggregate_adapters(clients, method="fedit", report=False)
