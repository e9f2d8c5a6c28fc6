"""A FlowerTune-shaped LLM example: a tiny Llama, peft LoRA on q_proj/v_proj, bf16 adapters."""
