"""Tiny Llama clients saved by real peft, read back by peft alone (no lorafair code here).

A 2-layer Llama of hidden size 32 from ``transformers.LlamaConfig`` (no download). Each client
is ``get_peft_model(base, LoraConfig(...)).save_pretrained(folder)`` with random A and B
(``init_lora_weights=False``); :class:`Client` keeps what peft itself holds: the raw factors and
each LoRA layer's ``scaling``, so tests can build dense float64 references independently of
lorafair's reader.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# transformers 5 deprecates an attribute that peft reads; unrelated to adapters or keys.
IGNORE_TRANSFORMERS_DEPRECATION = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"

TARGETS = ("q_proj", "v_proj")


class Client(NamedTuple):
    path: str
    factors: dict[str, tuple[Tensor, Tensor]]  # layer -> (A, B), float64, as peft holds them
    scalings: dict[str, float]  # layer -> peft's own LoraLayer.scaling["default"]

    def applied(self) -> dict[str, tuple[Tensor, Tensor]]:
        """(A, s·B) in float64: B @ A is the update the client's model applies."""
        return {n: (A, self.scalings[n] * B) for n, (A, B) in self.factors.items()}


def tiny_base(dtype: torch.dtype = torch.float32) -> Any:
    torch.manual_seed(1234)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    return transformers.LlamaForCausalLM(config).to(dtype)


def lora_layers(model: Any) -> dict[str, Any]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


def save_client(
    base: Any,
    folder: str | os.PathLike[str],
    *,
    seed: int,
    shared_A: Mapping[str, Tensor] | None = None,
    **lora: Any,
) -> Client:
    """One client: a peft LoRA model on a copy of ``base``, random factors, saved to ``folder``."""
    torch.manual_seed(seed)
    options: dict[str, Any] = {"target_modules": list(TARGETS), "init_lora_weights": False}
    options.update(lora)
    # autocast_adapter_dtype=False: a bf16 base gets a bf16 adapter (peft upcasts by default)
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(**options), autocast_adapter_dtype=False
    )
    layers = lora_layers(model)
    with torch.no_grad():
        for name, module in layers.items():
            # peft's default init gives B tiny; scale it up so that updates are well resolved.
            module.lora_B["default"].weight.normal_(0.0, 0.5)
            if shared_A is not None:
                module.lora_A["default"].weight.copy_(shared_A[name])
    model.save_pretrained(os.fspath(folder))
    factors = {
        name: (
            module.lora_A["default"].weight.detach().to(torch.float64).clone(),
            module.lora_B["default"].weight.detach().to(torch.float64).clone(),
        )
        for name, module in layers.items()
    }
    scalings = {name: float(module.scaling["default"]) for name, module in layers.items()}
    return Client(os.fspath(folder), factors, scalings)


def merged_deltas(base: Any, folder: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Load ``folder`` on a copy of ``base`` with peft, merge, return W_merged − W0 (float64)."""
    before = {n: p.detach().to(torch.float64).clone() for n, p in base.state_dict().items()}
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.fspath(folder))
    merged = model.merge_and_unload()
    out: dict[str, Tensor] = {}
    for name, tensor in merged.state_dict().items():
        if name.endswith(".weight") and name.split(".")[-2] in TARGETS:
            layer = "base_model.model." + name[: -len(".weight")]
            out[layer] = tensor.detach().to(torch.float64) - before[name]
    return out


def dense(factors: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
    return {n: f[1].to(torch.float64) @ f[0].to(torch.float64) for n, f in factors.items()}
