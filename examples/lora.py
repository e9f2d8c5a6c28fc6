"""A minimal LoRA module wrapping ``nn.Linear``, and helpers to read and write a model's factors.

``LoRALinear`` computes ``y = W0 x + b + s · B (A x)`` with ``A`` (r, d_in), ``B`` (d_out, r),
``s = alpha / r``. The base ``W0``/``b`` are frozen. Everything that leaves a client is the
*effective* pair ``(A, s·B)``, so that the aggregators see the true weight update
``ΔW_k = (s·B_k) A_k``; everything that arrives is turned back with ``B = B_eff / s``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from lorafair.types import LoRAFactors

__all__ = [
    "MIXER_TARGETS",
    "VIT_TARGETS",
    "LoRALinear",
    "get_factors",
    "inject_lora",
    "lora_layers",
    "merge_updates",
    "reinit_lora",
    "set_factors",
]

VIT_TARGETS: tuple[str, ...] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
"""Linears of a timm ``VisionTransformer`` block that get LoRA (every block; not the head)."""

MIXER_TARGETS: tuple[str, ...] = (
    "mlp_tokens.fc1",
    "mlp_tokens.fc2",
    "mlp_channels.fc1",
    "mlp_channels.fc2",
)
"""Linears of a timm ``MlpMixer`` block that get LoRA: token- and channel-mixing MLPs."""


class LoRALinear(nn.Module):
    """``nn.Linear`` plus a trainable low-rank update ``s · B A`` (``s = alpha / rank``)."""

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, *, merge_when_training: bool = False
    ) -> None:
        super().__init__()
        self.merge_when_training = merge_when_training
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scaling = float(alpha) / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(rank, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))

    def forward(self, x: Tensor) -> Tensor:
        """``W0 x + b + s·B (A x)``, as two rank-``r`` products or as one merged GEMM.

        Both are the same function, and autograd gives ``∂L/∂A`` and ``∂L/∂B`` through
        either. Without gradients (evaluation) the merged weight ``W0 + s·B A`` is cheaper
        whenever a batch has more tokens than ``d_in d_out / (d_in + d_out)``: forming it costs
        ``d_out·r·d_in`` flops once, the rank-``r`` products ``r (d_in + d_out)`` per token at
        an inner dimension far below the GEMM kernels' speed. In training the merged form also
        computes ``∂L/∂W`` (``tokens·d_out·d_in`` flops), so it pays only for small layers:
        ``merge_when_training`` turns it on (the offline example's width-64 models, where it
        measured 1.2–1.8× faster per SGD step on one CPU thread; evaluation 1.6–1.9×).
        """
        if self.merge_when_training or not torch.is_grad_enabled():
            w = self.base.weight + self.scaling * (self.lora_B @ self.lora_A)
            return nn.functional.linear(x, w, self.base.bias)
        y: Tensor = self.base(x)
        return y + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """peft's default initialisation: ``A`` Kaiming-uniform (a = √5), ``B = 0``."""
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])  # kaiming_uniform_(a=sqrt(5)) bound
        a = torch.rand(self.lora_A.shape, generator=generator, dtype=torch.float64)
        self.lora_A.copy_((a * 2 - 1) * bound)
        self.lora_B.zero_()


def inject_lora(
    model: nn.Module,
    targets: Iterable[str],
    *,
    rank: int,
    alpha: float,
    seed: int,
    merge_when_training: bool = False,
) -> list[str]:
    """Replace every ``nn.Linear`` whose qualified name ends with one of ``targets``.

    Freezes *all* existing parameters of ``model`` first (the caller unfreezes the head), then
    initialises every LoRA layer from one generator seeded with ``seed`` (a shared init).
    Returns the names of the wrapped layers, in module order.
    """
    targets = tuple(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not names:
        raise ValueError(f"no nn.Linear in the model matches any of {targets}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(
            parent,
            child,
            LoRALinear(base, rank, alpha, merge_when_training=merge_when_training),
        )
    reinit_lora(model, torch.Generator().manual_seed(seed))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by qualified name (the keys of every factor dict)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def reinit_lora(model: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every LoRA layer (``A`` random, ``B = 0``) from ``generator``."""
    for layer in lora_layers(model).values():
        layer.reset(generator)


@torch.no_grad()
def get_factors(model: nn.Module) -> dict[str, LoRAFactors]:
    """Detached copies of the effective factors ``(A, s·B)`` of every LoRA layer."""
    return {
        n: LoRAFactors(m.lora_A.detach().clone(), m.lora_B.detach() * m.scaling)
        for n, m in lora_layers(model).items()
    }


@torch.no_grad()
def set_factors(
    model: nn.Module, factors: Mapping[str, LoRAFactors], *, only_b: bool = False
) -> None:
    """Load effective factors ``(A, B_eff)``: ``lora_A = A``, ``lora_B = B_eff / s``.

    The rank of the incoming factors must equal the layer's rank. ``only_b`` leaves ``A`` alone.
    """
    layers = lora_layers(model)
    if set(factors) != set(layers):
        missing = sorted(set(layers) - set(factors)) + sorted(set(factors) - set(layers))
        raise KeyError(f"factor keys do not match the model's LoRA layers: {missing[:3]}")
    for n, (A, B) in factors.items():
        m = layers[n]
        if tuple(A.shape) != tuple(m.lora_A.shape) or tuple(B.shape) != tuple(m.lora_B.shape):
            raise ValueError(
                f"layer {n!r}: got A {tuple(A.shape)}, B {tuple(B.shape)} for a LoRA layer with "
                f"A {tuple(m.lora_A.shape)}, B {tuple(m.lora_B.shape)}"
            )
        if not only_b:
            m.lora_A.copy_(A)
        m.lora_B.copy_(B / m.scaling)


@torch.no_grad()
def merge_updates(model: nn.Module, factors: Mapping[str, LoRAFactors]) -> None:
    """``W0 ← W0 + B A`` for each effective pair (any rank, e.g. FLoRA's stacked factors)."""
    layers = lora_layers(model)
    for n, (A, B) in factors.items():
        w = layers[n].base.weight
        w.add_((B.to(torch.float64) @ A.to(torch.float64)).to(w.dtype))
