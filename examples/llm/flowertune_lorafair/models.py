"""flowertune-lorafair: the model (FlowerTune's ``models.py`` shape, offline).

FlowerTune loads a pretrained causal LM in bf16 (4- or 8-bit quantised with bitsandbytes) and
wraps it in peft LoRA, whose adapters peft keeps in float32. Here every node builds the same
tiny ``LlamaForCausalLM`` from a config (2 layers, hidden 64, random init, seed 0, bf16 base):
no download, no GPU. The adapters are float32, as FlowerTune's; with
``model.lora.adapter-dtype = "bfloat16"`` the clients train them in bf16
(:func:`set_adapter_dtype`) and exchange them as float32, which holds every bf16 value exactly,
so the ServerApp stays FlowerTune's (Flower's ``ArrayRecord(state_dict)`` cannot hold bf16;
:func:`lorafair.flower.to_array_record` can, at the cost of two more changed server lines).
``cosine_annealing`` is FlowerTune's learning-rate schedule over the server rounds.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from .dataset import VOCAB


def cosine_annealing(
    current_round: int,
    total_round: int,
    lrate_max: float = 0.001,
    lrate_min: float = 0.0,
) -> float:
    """``lrate_min + (lrate_max − lrate_min)(1 + cos(π t / T)) / 2`` at round ``t`` of ``T``."""
    cos_inner = math.pi * current_round / total_round
    return lrate_min + 0.5 * (lrate_max - lrate_min) * (1 + math.cos(cos_inner))


def model_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )


def get_base_model() -> LlamaForCausalLM:
    """The frozen base every node builds: random init with seed 0, bf16 (no download)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(model_config()).to(torch.bfloat16)


def get_model(model_cfg: Any) -> Any:
    """The frozen bf16 base (seed 0) with float32 peft LoRA (``model_cfg.lora``) on q_proj and
    v_proj."""
    model = get_base_model()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        peft_config = LoraConfig(
            r=int(model_cfg.lora.peft_lora_r),
            lora_alpha=float(model_cfg.lora.peft_lora_alpha),
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            return get_peft_model(model, peft_config)


def set_adapter_dtype(model: Any, name: str) -> None:
    """Cast the LoRA factors to ``name`` (``"float32"`` or ``"bfloat16"``), in place."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"model.lora.adapter-dtype must be one of {sorted(dtypes)}, got {name!r}")
    for key, param in model.named_parameters():
        if ".lora_A." in key or ".lora_B." in key:
            param.data = param.data.to(dtypes[name])


def loss_on(model: Any, ids: Tensor) -> Tensor:
    """Next-character cross-entropy, ignoring padding."""
    labels = ids.masked_fill(ids == 0, -100)
    return model(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).loss
