"""A Flower app that fine-tunes a tiny peft LoRA model with a lorafair aggregator, offline.

Run ``python -m examples.flower.run --method lora_fair --rounds 3`` (needs the ``flower`` and
``peft`` extras). See ``examples/flower/README.md``.
"""
