"""A tiny Llama causal LM built from a config (random init, no download) with peft LoRA.

FlowerTune loads a pretrained checkpoint with ``AutoModelForCausalLM.from_pretrained`` and
quantisation; here every node builds the same randomly initialised model (seed 0) so the
example runs offline. The adapters are bfloat16: peft casts adapter weights to float32 by
default (``autocast_adapter_dtype=True``), so the model is wrapped with
``autocast_adapter_dtype=False`` to keep LoRA in the base model's bf16.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from .dataset import VOCAB


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


def get_model(*, rank: int = 4, alpha: float = 8.0, dtype: torch.dtype = torch.bfloat16) -> Any:
    """The frozen base (seed 0) in ``dtype`` with LoRA on ``q_proj`` and ``v_proj``."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = LlamaForCausalLM(model_config()).to(dtype)
        lora = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            return get_peft_model(base, lora, autocast_adapter_dtype=False)


def loss_on(model: Any, ids: Tensor) -> Tensor:
    """Next-character cross-entropy, ignoring padding."""
    labels = ids.masked_fill(ids == 0, -100)
    return model(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).loss
