"""Real peft models: train clients a step, aggregate with every method, load back, merge.

The merged weights are checked against ``W0 + ΔW_method`` computed here in dense float64 from
the clients' raw peft tensors and peft's scaling rule (``alpha / r``, ``alpha / √r`` for rsLoRA).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

peft = pytest.importorskip("peft")

from lorafair import aggregate  # noqa: E402
from lorafair.interop.peft import (  # noqa: E402
    fedavg_others,
    fold_scaling,
    from_peft_state_dict,
    scalings_of,
    to_peft_state_dict,
    unfold_scaling,
)

LoraConfig = peft.LoraConfig
get_peft_model = peft.get_peft_model
get_sd = peft.get_peft_model_state_dict
set_sd = peft.set_peft_model_state_dict


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class Block(nn.Module):
    """A transformers-free pre-norm ViT block (timm's names: attn.qkv, attn.proj, mlp.fc1/fc2)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 2 * dim)
        self.mlp.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, -1).unbind(2)
        att = torch.softmax(torch.einsum("nthd,nshd->nhts", q, k) / math.sqrt(d // self.heads), -1)
        y = torch.einsum("nhts,nshd->nthd", att, v).reshape(n, t, d)
        x = x + self.attn.proj(y)
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=4, stride=4)
        self.blocks = nn.ModuleList([Block(dim, 2) for _ in range(depth)])
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            t = blk(t)
        return self.head(t.mean(1))


MODELS: dict[str, tuple[Callable[[], nn.Module], list[str], Callable[[torch.Generator], Tensor]]]
MODELS = {
    "mlp": (MLP, ["fc1", "fc2"], lambda g: torch.randn(16, 8, generator=g)),
    "vit": (
        TinyViT,
        [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.attn\.proj", r"blocks\.\d+\.mlp\.fc2"],
        lambda g: torch.randn(16, 1, 8, 8, generator=g),
    ),
}


def _targets(spec: list[str]) -> Any:
    return spec if not spec[0].startswith("blocks") else "|".join(f"({s})" for s in spec)


def _peft(base: nn.Module, spec: list[str], r: int, alpha: float, rslora: bool, seed: int) -> Any:
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=_targets(spec),
        modules_to_save=["head"],
    )
    return get_peft_model(copy.deepcopy(base), config)


def _train(model: Any, make_x: Callable[[torch.Generator], Tensor], seed: int, steps: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        x = make_x(g)
        y = torch.randint(0, 3, (x.shape[0],), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _svd_rank(M: Tensor, rank: int) -> Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def _module(model: nn.Module, layer: str) -> Any:
    return model.get_submodule(layer.removeprefix("base_model.model."))


def _cos(X: Tensor, Y: Tensor) -> float:
    return float((X * Y).sum() / (X.norm() * Y.norm()))


HOMOGENEOUS = [(3, 4.0, False), (3, 6.0, True), (3, 8.0, False)]  # equal ranks, scalings differ
HETEROGENEOUS = [(2, 4.0, False), (3, 3.0, True), (4, 8.0, False)]
WEIGHTS = [1.0, 2.0, 3.0]
METHODS = ["fedit", "ffa_lora", "flora", "flexlora", "lora_fair"]


@pytest.mark.parametrize("model_name", ["mlp", "vit"])
@pytest.mark.parametrize("method", METHODS)
def test_aggregate_load_merge_matches_math(model_name: str, method: str) -> None:
    fn = getattr(aggregate, method, None)
    if fn is None:
        pytest.skip(f"lorafair.aggregate.{method} is not available in this build")
    make, spec, make_x = MODELS[model_name]
    torch.manual_seed(0)
    base = make()
    specs = HETEROGENEOUS if method in ("flora", "flexlora") else HOMOGENEOUS
    clients = []
    for k, (r, alpha, rslora) in enumerate(specs):
        seed = 0 if method == "ffa_lora" else k + 1  # FFA-LoRA: one shared A initialisation
        model = _peft(base, spec, r, alpha, rslora, seed)
        if method == "ffa_lora":
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
        _train(model, make_x, k, steps=2)
        clients.append(model)

    uploads = [get_sd(m) for m in clients]
    splits = [from_peft_state_dict(sd) for sd in uploads]
    layers = list(splits[0].factors)
    assert len(layers) == (2 if model_name == "mlp" else 6)
    effective = [
        fold_scaling(s.factors, scalings_of(m)) for s, m in zip(splits, clients, strict=True)
    ]
    options: dict[str, Any] = {"rank": 3} if method == "flexlora" else {}
    agg = fn(effective, WEIGHTS, **options)
    out_rank = {"flora": sum(r for r, _, _ in specs), "flexlora": 3}.get(method, 3)
    assert all(agg[n].A.shape[0] == out_rank for n in layers)

    receiver = _peft(base, spec, out_rank, 5.0, True, seed=99)
    others = fedavg_others([s.others for s in splits], WEIGHTS)
    payload = to_peft_state_dict(
        unfold_scaling(agg, scalings_of(receiver)), like=get_sd(receiver), others=others
    )
    result = set_sd(receiver, payload)
    assert not result.unexpected_keys
    merged = receiver.merge_and_unload()

    p = [w / sum(WEIGHTS) for w in WEIGHTS]
    for layer in layers:
        W0 = _module(base, layer).weight.detach().double()
        As, Bs = [], []
        for up, (r, alpha, rslora) in zip(uploads, specs, strict=True):
            As.append(up[f"{layer}.lora_A.weight"].detach().double())
            Bs.append(_scale(r, alpha, rslora) * up[f"{layer}.lora_B.weight"].detach().double())
        ideal = sum(pk * (B @ A) for pk, A, B in zip(p, As, Bs, strict=True))
        if method in ("fedit", "lora_fair"):  # equal ranks
            A_bar = sum(pk * A for pk, A in zip(p, As, strict=True))
            B_bar = sum(pk * B for pk, B in zip(p, Bs, strict=True))
        if method == "fedit":
            expected = B_bar @ A_bar
        elif method in ("ffa_lora", "flora"):
            expected = ideal
        elif method == "flexlora":
            expected = _svd_rank(ideal, 3)
        else:  # lora_fair: no closed form; the load must be exact and never worse than FedIT
            expected = agg[layer].B.double() @ agg[layer].A.double()
            assert _cos(expected, ideal) >= _cos(B_bar @ A_bar, ideal) - 1e-6
        got = _module(merged, layer).weight.detach().double()
        torch.testing.assert_close(got, W0 + expected, rtol=1e-5, atol=1e-6)
        if method == "ffa_lora":
            assert not torch.allclose(Bs[0], Bs[1])  # B really trained, differently per client

    heads = [sd["base_model.model.head.weight"].detach().double() for sd in uploads]
    expected_head = sum(pk * h for pk, h in zip(p, heads, strict=True))
    torch.testing.assert_close(
        merged.head.weight.detach().double(), expected_head, rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("fmt", ["saved", "module"])
def test_round_trip_through_a_live_model_is_exact(fmt: str) -> None:
    torch.manual_seed(0)
    base = MLP()
    model = _peft(base, ["fc1", "fc2"], 2, 4.0, False, seed=1)
    _train(model, MODELS["mlp"][2], 0, steps=2)
    sd = get_sd(model) if fmt == "saved" else model.state_dict()
    split = from_peft_state_dict(sd)
    assert (split.adapter_name is None) == (fmt == "saved")
    target = _peft(base, ["fc1", "fc2"], 2, 4.0, False, seed=7)
    payload = to_peft_state_dict(split.factors, like=sd, others=split.others)
    if fmt == "saved":
        result = set_sd(target, payload)
        assert not result.unexpected_keys
    else:
        target.load_state_dict(payload, strict=True)
    for key, value in get_sd(target).items():
        assert torch.equal(value, get_sd(model)[key]), key


def test_rank_pattern_and_rslora_scalings_are_peft_s() -> None:
    torch.manual_seed(0)
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["fc1", "fc2"],
        rank_pattern={"fc2": 3},
        alpha_pattern={"fc2": 9},
    )
    model = get_peft_model(MLP(), config)
    s = scalings_of(model)
    assert s == {
        "base_model.model.fc1": pytest.approx(4 / math.sqrt(2), rel=1e-15),
        "base_model.model.fc2": pytest.approx(9 / math.sqrt(3), rel=1e-15),
    }
    # The folded product is the update peft applies: the merged delta.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    split = from_peft_state_dict(get_sd(model))
    folded = fold_scaling(split.factors, s)
    W0 = {n: model.get_submodule(n).base_layer.weight.detach().clone() for n in split.factors}
    merged = model.merge_and_unload()
    for name, (A, B) in folded.items():
        got = merged.get_submodule(name.removeprefix("base_model.model.")).weight.detach()
        torch.testing.assert_close(got, W0[name] + B @ A, rtol=1e-5, atol=1e-6)
