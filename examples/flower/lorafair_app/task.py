"""Model, synthetic data and peft plumbing shared by the ServerApp and the ClientApp.

Every node builds the same frozen "pretrained" MLP (seed 0) and wraps it in peft LoRA. Client
k's data come from one teacher with a client-specific input shift (feature non-IID), so the
example runs offline. Adapters travel with peft's scaling folded into B
(:func:`lorafair.interop.peft.fold_scaling`), so clients may use different ranks and alphas.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn

from lorafair.interop.peft import (
    fold_scaling,
    from_peft_state_dict,
    scalings_of,
    to_peft_state_dict,
    unfold_scaling,
)

D_IN, HIDDEN, CLASSES = 16, 32, 4
TARGETS = ["fc1", "fc2"]
HETERO = ("flora", "flexlora", "flexlora_energy", "hetlora")
"""Methods this example runs with heterogeneous client ranks (2, 4, 8; global rank 8)."""


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def base_model() -> MLP:
    """The shared frozen base (stands in for a pretrained checkpoint)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MLP()


_BASE = base_model()


def lora_model(
    rank: int,
    alpha: float,
    *,
    seed: int = 0,
    use_rslora: bool = False,
    ranks: Mapping[str, int] | None = None,
) -> Any:
    """The base wrapped in peft LoRA on ``fc1``/``fc2``; the head is trained and averaged.

    ``ranks`` (``{layer: rank}``, layers as in the state dict, e.g. ``base_model.model.fc1``)
    overrides ``rank`` per layer: what :data:`lorafair.flower.RANKS_KEY` carries, to rebuild
    an adapter of a rank-changing method exactly.
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        target_modules=TARGETS,
        modules_to_save=["head"],
        rank_pattern={name.rsplit(".", 1)[-1]: r for name, r in (ranks or {}).items()},
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(copy.deepcopy(_BASE), config)


def upload(model: Any) -> dict[str, Tensor]:
    """The model's adapter state dict with peft's scaling folded into B (what the server sees)."""
    sd = get_peft_model_state_dict(model)
    split = from_peft_state_dict(sd)
    folded = fold_scaling(split.factors, scalings_of(model))
    return {
        k: v.detach().clone()
        for k, v in to_peft_state_dict(folded, like=sd, others=split.others).items()
    }


def download(model: Any, global_sd: dict[str, Tensor]) -> None:
    """Load a folded global adapter into ``model`` (its own rank/alpha; truncated if larger).

    A global rank above the model's (FlexLoRA's ``rank``) keeps the leading components: for
    FlexLoRA these are the top singular directions, so this is the best rank-r approximation.
    """
    split = from_peft_state_dict(global_sd)
    own = from_peft_state_dict(get_peft_model_state_dict(model)).factors
    factors = {}
    for name, (A, B) in split.factors.items():
        r = own[name].A.shape[0]
        if A.shape[0] < r:
            raise ValueError(f"layer {name!r}: global rank {A.shape[0]} < client rank {r}")
        factors[name] = (A[:r], B[:, :r])
    payload = to_peft_state_dict(
        unfold_scaling(factors, scalings_of(model)), like=split, others=split.others
    )
    result = set_peft_model_state_dict(model, payload)
    if result.unexpected_keys:
        raise RuntimeError(f"unexpected keys: {result.unexpected_keys}")


def add_to_base(model: Any, deltas: Mapping[str, Tensor]) -> None:
    """Add ``deltas[layer]`` (d_out × d_in) to the frozen base weight of each LoRA layer."""
    with torch.no_grad():
        for layer, delta in deltas.items():
            weight = model.get_submodule(layer).base_layer.weight
            weight.add_(delta.to(weight.dtype))


def _teacher() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(D_IN, HIDDEN, generator=g), torch.randn(HIDDEN, CLASSES, generator=g)


def client_data(partition: int, n: int = 256, *, train: bool = True) -> tuple[Tensor, Tensor]:
    """Partition ``partition``'s inputs (shifted per client) and the teacher's labels."""
    W1, W2 = _teacher()
    g = torch.Generator().manual_seed(10_000 * int(not train) + partition)
    shift = torch.randn(D_IN, generator=torch.Generator().manual_seed(77 + partition))
    x = torch.randn(n, D_IN, generator=g) + shift
    y = (torch.tanh(x @ W1) @ W2).argmax(1)
    return x, y


def train(model: Any, x: Tensor, y: Tensor, *, steps: int, lr: float, batch: int = 32) -> float:
    """Local SGD on the trainable parameters; returns the mean training loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    total = 0.0
    g = torch.Generator().manual_seed(int(y.sum()))
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total / steps


@torch.no_grad()
def evaluate(model: Any, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(loss, accuracy) on ``x, y``."""
    model.eval()
    logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    return loss, float((logits.argmax(1) == y).float().mean())
