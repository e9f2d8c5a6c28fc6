"""timm models: the paper's ViT-B/16 and Mixer-B/16 from local weights, and small offline ones.

This is the only module of the example that imports timm (and through it torchvision).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from examples.data import ArrayDataset
from examples.lora import MIXER_TARGETS, VIT_TARGETS, inject_lora

__all__ = [
    "PAPER_MODELS",
    "Arch",
    "build_offline",
    "build_pretrained",
    "data_config",
    "pretrain",
    "with_lora",
]

log = logging.getLogger("examples.federated")

Arch = Literal["vit", "mixer"]
PAPER_MODELS: dict[Arch, str] = {
    "vit": "vit_base_patch16_224.augreg_in21k",
    "mixer": "mixer_b16_224.goog_in21k",
}
TARGETS: dict[Arch, tuple[str, ...]] = {"vit": VIT_TARGETS, "mixer": MIXER_TARGETS}


def build_offline(
    arch: Arch, *, num_classes: int, img_size: int = 16, in_chans: int = 1, seed: int = 0
) -> nn.Module:
    """Small timm models of the paper's classes: 4 blocks, width 64, 4×4 patches."""
    from timm.models.mlp_mixer import MlpMixer
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model: nn.Module
    if arch == "vit":
        model = VisionTransformer(
            img_size=img_size,
            patch_size=4,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=64,
            depth=4,
            num_heads=4,
            mlp_ratio=2.0,
        )
    else:
        model = MlpMixer(
            img_size=img_size,
            patch_size=4,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=64,
            num_blocks=4,
            mlp_ratio=(1.0, 2.0),
        )
    return model


def build_pretrained(
    name: str, *, num_classes: int, weights: str | Path | None = None, **kwargs: object
) -> nn.Module:
    """``timm.create_model(name, pretrained=True)`` from a local file or the local cache.

    With ``weights``, timm reads that file (``pretrained_cfg_overlay=dict(file=...)``: a
    ``.safetensors``, ``.pth`` or ``.bin`` state dict); without it, the Hugging Face cache must
    already hold the weights (set ``HF_HUB_OFFLINE=1`` to forbid downloads). The classifier is
    re-created with ``num_classes`` outputs.
    """
    import timm

    overlay = None
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--weights: no such file {path}")
        overlay = {"file": str(path)}
    model: nn.Module = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs
    )
    return model


def data_config(model: nn.Module) -> tuple[int, Sequence[float], Sequence[float]]:
    """Input size and normalisation mean/std the model's weights expect."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"])


def pretrain(
    model: nn.Module,
    data: ArrayDataset,
    *,
    epochs: int,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
) -> float:
    """Full training of ``model`` on the source task with AdamW; returns train accuracy (%)."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * -(-len(data) // batch_size)
    )
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=g)
        for i in range(0, len(data), batch_size):
            idx = order[i : i + batch_size]
            x, y = data.x[idx].to(device), data.y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat(
            [
                model(data.x[i : i + 512].to(device)).argmax(-1).cpu()
                for i in range(0, len(data), 512)
            ]
        )
    return 100.0 * float((pred == data.y).float().mean())


def with_lora(
    base: nn.Module,
    arch: Arch,
    *,
    num_classes: int,
    rank: int,
    alpha: float,
    seed: int,
    merge_when_training: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """A copy of ``base`` with a fresh seeded head and LoRA on :data:`TARGETS` ``[arch]``.

    ``merge_when_training``: see :class:`examples.lora.LoRALinear` (a speed choice only).

    Returns ``(model, head)``; every parameter except LoRA and the head is frozen.
    """
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    model.reset_classifier(num_classes)  # type: ignore[operator]
    inject_lora(
        model,
        TARGETS[arch],
        rank=rank,
        alpha=alpha,
        seed=seed,
        merge_when_training=merge_when_training,
    )
    head = model.get_classifier()  # type: ignore[operator]
    if not isinstance(head, nn.Module):
        raise TypeError(f"unexpected classifier {type(head).__name__}")
    for p in head.parameters():
        p.requires_grad_(True)
    return model, head
