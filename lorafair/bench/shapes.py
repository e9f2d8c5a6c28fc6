"""Layer shapes to benchmark, and synthetic client factors on them.

Shapes follow ``nn.Linear`` / peft: a layer of weight (d_out, d_in) gets ``A`` (r, d_in) and
``B`` (d_out, r). They come from three places:

- :func:`preset`: shapes of real models, written out from their public configs
  (:data:`PRESETS`): ViT-B/16, Mixer-B/16, a 7B LLaMA's attention, Llama-3-8B and Llama-3-70B
  with LoRA on all seven linears of every block, a single 4096² layer and a tiny smoke set.
- :func:`from_adapter`: a peft adapter folder (``adapter_config.json`` and the header of
  ``adapter_model.safetensors``; no tensor is read).
- :func:`from_config`: a transformers config plus target modules, the model built on the
  ``meta`` device (no weights, no memory).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from lorafair.types import LoRAFactors

__all__ = [
    "PRESETS",
    "LayerShape",
    "ShapeSet",
    "factor_bytes",
    "from_adapter",
    "from_config",
    "make_clients",
    "preset",
]


class LayerShape(NamedTuple):
    """One adapted linear layer: its name and weight shape (d_out, d_in)."""

    name: str
    d_out: int
    d_in: int


class ShapeSet(NamedTuple):
    """The layers one benchmark cell runs on, and the model they stand for.

    ``full_layers`` is the number of layers of the whole model when ``layers`` is a subset of its
    (identical) blocks, so that a time measured on ``layers`` extrapolates to the model by the
    factor ``full_layers / len(layers)``; it equals ``len(layers)`` otherwise.
    """

    name: str
    layers: tuple[LayerShape, ...]
    full_layers: int
    source: str
    """Where the shapes come from (a preset's model, a folder or a config), for the report."""


class _Llama(NamedTuple):
    hidden: int
    intermediate: int
    blocks: int
    heads: int
    kv_heads: int


def _llama_block(i: int, c: _Llama) -> list[LayerShape]:
    kv = c.hidden // c.heads * c.kv_heads
    p = f"model.layers.{i}."
    return [
        LayerShape(p + "self_attn.q_proj", c.hidden, c.hidden),
        LayerShape(p + "self_attn.k_proj", kv, c.hidden),
        LayerShape(p + "self_attn.v_proj", kv, c.hidden),
        LayerShape(p + "self_attn.o_proj", c.hidden, c.hidden),
        LayerShape(p + "mlp.gate_proj", c.intermediate, c.hidden),
        LayerShape(p + "mlp.up_proj", c.intermediate, c.hidden),
        LayerShape(p + "mlp.down_proj", c.hidden, c.intermediate),
    ]


# Public config.json numbers of meta-llama/Meta-Llama-3-8B and Meta-Llama-3-70B.
_LLAMA3_8B = _Llama(hidden=4096, intermediate=14336, blocks=32, heads=32, kv_heads=8)
_LLAMA3_70B = _Llama(hidden=8192, intermediate=28672, blocks=80, heads=64, kv_heads=8)


def _llama(c: _Llama) -> Callable[[int], list[LayerShape]]:
    return lambda blocks: [s for i in range(min(blocks, c.blocks)) for s in _llama_block(i, c)]


def _vit_b16(blocks: int) -> list[LayerShape]:
    out: list[LayerShape] = []
    for i in range(min(blocks, 12)):
        out += [
            LayerShape(f"blocks.{i}.attn.qkv", 2304, 768),
            LayerShape(f"blocks.{i}.attn.proj", 768, 768),
            LayerShape(f"blocks.{i}.mlp.fc1", 3072, 768),
            LayerShape(f"blocks.{i}.mlp.fc2", 768, 3072),
        ]
    return out


def _mixer_b16(blocks: int) -> list[LayerShape]:
    out: list[LayerShape] = []
    for i in range(min(blocks, 12)):
        out += [
            LayerShape(f"blocks.{i}.mlp_tokens.fc1", 384, 196),
            LayerShape(f"blocks.{i}.mlp_tokens.fc2", 196, 384),
            LayerShape(f"blocks.{i}.mlp_channels.fc1", 3072, 768),
            LayerShape(f"blocks.{i}.mlp_channels.fc2", 768, 3072),
        ]
    return out


def _llm7b_attn(blocks: int) -> list[LayerShape]:
    out: list[LayerShape] = []
    for i in range(min(blocks, 32)):
        out += [
            LayerShape(f"model.layers.{i}.self_attn.q_proj", 4096, 4096),
            LayerShape(f"model.layers.{i}.self_attn.v_proj", 4096, 4096),
        ]
    return out


class _Preset(NamedTuple):
    blocks: int
    layers: Callable[[int], list[LayerShape]]
    source: str


PRESETS: dict[str, _Preset] = {
    "vit_b16": _Preset(
        12,
        _vit_b16,
        "timm vit_base_patch16_224: 12 blocks × attn.qkv 2304×768, attn.proj 768², "
        "mlp.fc1 3072×768, mlp.fc2 768×3072",
    ),
    "mixer_b16": _Preset(
        12,
        _mixer_b16,
        "timm mixer_b16_224: 12 blocks × token MLP 384×196, 196×384 and channel MLP "
        "3072×768, 768×3072",
    ),
    "llm7b_attn": _Preset(32, _llm7b_attn, "a 7B LLaMA's q_proj and v_proj, 32 × 2 × 4096²"),
    "llama3_8b": _Preset(
        _LLAMA3_8B.blocks,
        _llama(_LLAMA3_8B),
        "Llama-3-8B, all 7 linears of 32 blocks (hidden 4096, intermediate 14336, "
        "32 heads, 8 kv heads)",
    ),
    "llama3_70b": _Preset(
        _LLAMA3_70B.blocks,
        _llama(_LLAMA3_70B),
        "Llama-3-70B, all 7 linears of 80 blocks (hidden 8192, intermediate 28672, "
        "64 heads, 8 kv heads)",
    ),
    "square4096": _Preset(1, lambda b: [LayerShape("proj", 4096, 4096)], "one 4096² layer"),
    "tiny": _Preset(
        1, lambda b: [LayerShape("a.fc", 48, 32), LayerShape("b.fc", 24, 40)], "smoke shapes"
    ),
}
"""Shape sets of real models by name; each is a number of identical blocks (see :func:`preset`)."""


def preset(name: str, *, blocks: int | None = None) -> ShapeSet:
    """The shapes of preset ``name``; with ``blocks``, only its first ``blocks`` blocks, the
    full model's layer count kept in :attr:`ShapeSet.full_layers` for extrapolation."""
    try:
        p = PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown shape preset {name!r}; choose from {', '.join(PRESETS)}"
        ) from None
    if blocks is not None and blocks < 1:
        raise ValueError(f"blocks must be at least 1, got {blocks}")
    full = p.layers(p.blocks)
    layers = p.layers(p.blocks if blocks is None else blocks)
    return ShapeSet(name, tuple(layers), len(full), p.source)


_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"


_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def _tensor_shapes(
    folder: str,
) -> tuple[str, dict[str, tuple[tuple[int, ...], torch.dtype | None]]]:
    st = os.path.join(folder, "adapter_model.safetensors")
    if os.path.exists(st):
        try:
            from safetensors import safe_open
        except ImportError:
            raise ImportError(
                f"{st}: reading it needs safetensors (pip install safetensors)"
            ) from None

        try:
            with safe_open(st, framework="pt") as f:
                out = {}
                for k in f.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                    sl = f.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype()))
                return st, out
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{st}: not a readable safetensors file ({e})") from None
    binary = os.path.join(folder, "adapter_model.bin")
    if os.path.exists(binary):
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises several types for a bad pickle
            raise ValueError(f"{binary}: not a readable torch file ({e})") from None
        return binary, {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    raise FileNotFoundError(
        f"{folder}: no adapter_model.safetensors or adapter_model.bin (a peft adapter folder)"
    )


def from_adapter(folder: str) -> tuple[ShapeSet, int, torch.dtype | None]:
    """The LoRA layers of a peft adapter folder: ``(shapes, largest rank, stored dtype)``.

    Reads ``adapter_config.json`` and the tensor header only (shapes, no values). A layer is
    every ``<path>.lora_A.weight`` (r, d_in) with its ``<path>.lora_B.weight`` (d_out, r); the
    name is ``<path>`` without peft's ``base_model.model.`` prefix.
    """
    cfg_path = os.path.join(folder, "adapter_config.json")
    try:
        with open(cfg_path) as f:
            config: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{cfg_path}: missing (not a peft adapter folder)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path}: not a JSON object")
    path, shapes = _tensor_shapes(folder)
    dtype: torch.dtype | None = None
    layers: list[LayerShape] = []
    rank = 0
    for key, (shape, dt) in shapes.items():
        if not key.endswith(_LORA_A):
            continue
        stem = key[: -len(_LORA_A)]
        b = shapes.get(stem + _LORA_B, ((), None))[0] or None
        dtype = dtype or dt
        if b is None or len(shape) != 2 or len(b) != 2 or b[1] != shape[0]:
            raise ValueError(
                f"{path}: layer {stem!r}: lora_A {shape} has no matching lora_B (got {b})"
            )
        layers.append(LayerShape(stem.removeprefix("base_model.model."), b[0], shape[1]))
        rank = max(rank, shape[0])
    if not layers:
        raise ValueError(f"{path}: no '*{_LORA_A}' keys (not a LoRA adapter)")
    source = f"adapter folder {os.path.basename(os.path.normpath(folder))} "
    source += f"({config.get('base_model_name_or_path') or 'base model not named'})"
    return ShapeSet("adapter", tuple(layers), len(layers), source), rank, dtype


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def from_config(
    config: str | Any, target_modules: Sequence[str], *, blocks: int | None = None
) -> ShapeSet:
    """The linears of a transformers model that match ``target_modules``, as peft matches them
    (a module whose name is a target or ends in ``.<target>``; ``all-linear``: every linear but
    the output head). The model is built on the ``meta`` device: no weights, no memory.

    ``config``: a ``PretrainedConfig``, a folder with ``config.json`` or a ``config.json`` path.
    ``blocks`` keeps the first ``blocks`` decoder layers (``config.num_hidden_layers``), the full
    count kept for extrapolation. Needs ``transformers``.
    """
    try:
        import transformers
    except ImportError:
        raise ImportError("from_config needs transformers (pip install transformers)") from None
    if isinstance(config, str) and os.path.isfile(config):
        try:
            with open(config) as f:
                fields = json.load(f)
            cfg = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{config}: not a transformers config ({e!r})") from None
    elif isinstance(config, str):
        if not os.path.isfile(os.path.join(config, "config.json")):
            raise FileNotFoundError(f"{config}: no config.json (a transformers config folder)")
        cfg = transformers.AutoConfig.from_pretrained(config)
    else:
        cfg = config
    full_blocks = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    if blocks is not None and full_blocks:
        cfg = cfg.__class__.from_dict(
            {**cfg.to_dict(), "num_hidden_layers": min(blocks, full_blocks)}
        )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)  # type: ignore[no-untyped-call]
    all_linear = list(target_modules) == ["all-linear"]
    head = model.get_output_embeddings() if all_linear else None
    layers = [
        LayerShape(name, m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and m is not head
        and (all_linear or _matches(name, target_modules))
    ]
    if not layers:
        raise ValueError(
            f"no linear layer of {cfg.model_type!r} matches target modules {list(target_modules)}"
        )
    run_blocks = min(blocks, full_blocks) if blocks is not None and full_blocks else full_blocks
    full = len(layers) * full_blocks // run_blocks if run_blocks else len(layers)
    targets = ",".join(target_modules)
    return ShapeSet(cfg.model_type, tuple(layers), full, f"{cfg.model_type} config, {targets}")


def make_clients(
    layers: Sequence[LayerShape],
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
    Memory: the result, plus one float32 layer of one client at a time.
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


def factor_bytes(clients: Sequence[dict[str, LoRAFactors]] | dict[str, LoRAFactors]) -> int:
    """Bytes of every factor of ``clients`` (a list of clients, or one result)."""
    items = [clients] if isinstance(clients, dict) else clients
    return sum(t.numel() * t.element_size() for c in items for f in c.values() for t in f)
