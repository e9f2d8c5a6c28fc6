"""Layer shapes of real models and synthetic client factors on them.

Shapes follow ``nn.Linear`` / peft: a layer of weight (d_out, d_in) gets ``A`` (r, d_in) and
``B`` (d_out, r).

- ``vit_b16``: timm ``vit_base_patch16_224``, 12 blocks × ``attn.qkv`` (2304×768),
  ``attn.proj`` (768×768), ``mlp.fc1`` (3072×768), ``mlp.fc2`` (768×3072).
- ``mixer_b16``: timm ``mixer_b16_224`` (embed 768, 196 patches, ``mlp_ratio=(0.5, 4.0)``):
  12 blocks × token MLP ``mlp_tokens.fc1`` (384×196), ``mlp_tokens.fc2`` (196×384) and channel
  MLP ``mlp_channels.fc1`` (3072×768), ``mlp_channels.fc2`` (768×3072).
- ``llm7b_attn``: a 7B LLaMA-style model's attention, 32 layers × ``q_proj`` and ``v_proj``
  (4096×4096).
- ``square4096``: one 4096×4096 layer (the FlexLoRA dense-vs-factored target).
- ``tiny``: two small layers, for the smoke test.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lorafair.types import LoRAFactors

__all__ = ["SHAPE_SETS", "LayerShape", "factor_bytes", "make_clients"]


class LayerShape(NamedTuple):
    """One adapted linear layer: its name and weight shape (d_out, d_in)."""

    name: str
    d_out: int
    d_in: int


def _vit_b16() -> list[LayerShape]:
    out: list[LayerShape] = []
    for i in range(12):
        out += [
            LayerShape(f"blocks.{i}.attn.qkv", 2304, 768),
            LayerShape(f"blocks.{i}.attn.proj", 768, 768),
            LayerShape(f"blocks.{i}.mlp.fc1", 3072, 768),
            LayerShape(f"blocks.{i}.mlp.fc2", 768, 3072),
        ]
    return out


def _mixer_b16() -> list[LayerShape]:
    out: list[LayerShape] = []
    for i in range(12):
        out += [
            LayerShape(f"blocks.{i}.mlp_tokens.fc1", 384, 196),
            LayerShape(f"blocks.{i}.mlp_tokens.fc2", 196, 384),
            LayerShape(f"blocks.{i}.mlp_channels.fc1", 3072, 768),
            LayerShape(f"blocks.{i}.mlp_channels.fc2", 768, 3072),
        ]
    return out


def _llm7b_attn() -> list[LayerShape]:
    out: list[LayerShape] = []
    for i in range(32):
        out += [
            LayerShape(f"model.layers.{i}.self_attn.q_proj", 4096, 4096),
            LayerShape(f"model.layers.{i}.self_attn.v_proj", 4096, 4096),
        ]
    return out


SHAPE_SETS: dict[str, list[LayerShape]] = {
    "vit_b16": _vit_b16(),
    "mixer_b16": _mixer_b16(),
    "llm7b_attn": _llm7b_attn(),
    "square4096": [LayerShape("proj", 4096, 4096)],
    "tiny": [LayerShape("a.fc", 48, 32), LayerShape("b.fc", 24, 40)],
}


def make_clients(
    layers: list[LayerShape],
    n_clients: int,
    rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    shared_A: bool = False,
) -> list[dict[str, LoRAFactors]]:
    """Synthetic but realistic client adapters after a round of local training.

    ``A_k = A_0 + 0.5·E_k`` where ``A_0`` and ``E_k`` are peft's init ``U(−1/√d_in, 1/√d_in)``
    (the clients start from a shared init and drift apart), or ``A_k = A_0`` when ``shared_A``
    (FFA-LoRA's frozen A); ``B_k = C + N_k`` with ``C, N_k ~ N(0, 0.01²)`` (clients partly agree).
    Deterministic in ``seed``; generated in float32 on the CPU, then cast and moved.
    """
    g = torch.Generator().manual_seed(seed)
    clients: list[dict[str, LoRAFactors]] = [{} for _ in range(n_clients)]
    for layer in layers:
        bound = 1.0 / math.sqrt(layer.d_in)
        A0 = (torch.rand(rank, layer.d_in, generator=g) * 2 - 1) * bound
        C = torch.randn(layer.d_out, rank, generator=g) * 0.01
        for k in range(n_clients):
            if shared_A:
                A = A0.clone()
            else:
                A = A0 + 0.5 * (torch.rand(rank, layer.d_in, generator=g) * 2 - 1) * bound
            B = C + torch.randn(layer.d_out, rank, generator=g) * 0.01
            clients[k][layer.name] = LoRAFactors(
                A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)
            )
    return clients


def factor_bytes(clients: list[dict[str, LoRAFactors]]) -> int:
    """Total bytes of all clients' factors (the input size the memory ratio is measured against)."""
    return sum(
        f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size()
        for c in clients
        for f in c.values()
    )
