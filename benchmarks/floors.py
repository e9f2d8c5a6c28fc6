"""What the hardware allows: each aggregator's time against two floors measured in the same run.

- **memory floor** ``= in_bytes / BW_read + out_bytes / BW_write``: one read of every input byte
  and one write of the output. ``BW_read`` and ``BW_write`` come from two probes timed in the
  cell's round-robin: ``buf.sum()`` over one contiguous buffer as large as the input, and
  ``buf.fill_(0)`` of one as large (one kernel each: no per-tensor overhead, so a true floor).
- **compute floor**: the method's essential flops at the GEMM rate measured in the same run, in
  its accumulation dtype. For the averaging methods (FedIT, FFA-LoRA, FLoRA) that is
  ``2·n_in`` flops (one multiply-add per input element) at the rate of a 512³ GEMM in float32
  (float64 for float64 inputs); it is far below the memory floor. For the Gram methods
  (``lora_fair``, ``flexlora``) it is the two float64 R × R Grams per layer, ``A_s A_sᵀ`` and
  ``B_sᵀ B_s`` with R = K·r, ``Σ_layers 2 (d_in + d_out) R²`` flops, *timed* on float64 stacks of
  the cell's own shapes (batched per shape, at most 256 MiB of stacks at a time, scaled by the
  number of layers of that shape): the GEMM rate on exactly these shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.cells import Inputs
from lorafair.registry import Floor
from lorafair.types import LoRAFactors

__all__ = ["Floors", "Probes", "factor_bytes", "make_probes"]

_BUDGET = 1 << 28


def factor_bytes(clients: list[dict[str, LoRAFactors]] | dict[str, LoRAFactors]) -> int:
    """Bytes of every factor of ``clients`` (a list of clients, or one result)."""
    items = clients if isinstance(clients, list) else [clients]
    return sum(t.numel() * t.element_size() for c in items for f in c.values() for t in f)


@dataclass
class Probes:
    """The timed probes of one cell (call each once per round of the round-robin)."""

    in_bytes: int
    calls: dict[str, Callable[[], object]]
    gram_flops: float
    gram_scale: float  # the Gram probe covers 1/gram_scale of the layers
    gemm_flops: float


@dataclass
class Floors:
    """Median probe times of one cell and the floors they give."""

    probes: Probes
    times: dict[str, float]

    def memory(self, in_bytes: int, out_bytes: int) -> float:
        t = self.times
        return (t["read"] * in_bytes + t["write"] * out_bytes) / self.probes.in_bytes

    def compute(self, floor: Floor, in_elements: int) -> float:
        if floor == "gram":
            return self.times["gram"] * self.probes.gram_scale
        return 2.0 * in_elements / self.gemm_rate

    @property
    def gemm_rate(self) -> float:
        return self.probes.gemm_flops / self.times["gemm"]

    @property
    def gram_rate(self) -> float:
        if "gram" not in self.times:
            return float("nan")
        return self.probes.gram_flops / (self.times["gram"] * self.probes.gram_scale)


def make_probes(inputs: Inputs, *, gram: bool) -> Probes:
    """Buffers for the read/write/GEMM probes and, if ``gram``, float64 stacks for the Grams."""
    clients = inputs.free or inputs.shared
    in_bytes = factor_bytes(clients)
    dev, dt = inputs.device, inputs.dtype
    n = in_bytes // torch.empty((), dtype=dt).element_size()
    read = torch.ones(n, dtype=dt, device=dev)
    write = torch.empty(n, dtype=dt, device=dev)
    acc = torch.float64 if dt == torch.float64 else torch.float32
    a = torch.randn(512, 512, dtype=acc, device=dev)
    calls: dict[str, Callable[[], object]] = {
        "read": read.sum,
        "write": lambda: write.fill_(0),
        "gemm": lambda: a @ a,
    }
    gram_flops, scale = 0.0, 1.0
    if gram:
        stacks, covered, total = [], 0, 0
        shapes: dict[tuple[int, int], list[str]] = {}
        for s in inputs.layers:
            shapes.setdefault((s.d_out, s.d_in), []).append(s.name)
        K = len(clients)
        for (d_out, d_in), names in shapes.items():
            R = sum(int(c[names[0]].A.shape[0]) for c in clients)
            per = 8 * (d_out + d_in) * R
            take = names[: max(1, _BUDGET // max(1, per * len(shapes)))]
            A_s = torch.stack([torch.cat([c[n].A for c in clients]).double() / K for n in take])
            B_s = torch.stack([torch.cat([c[n].B for c in clients], dim=1).double() for n in take])
            stacks.append((A_s, B_s))
            flops = 2.0 * (d_in + d_out) * R * R
            gram_flops += flops * len(names)
            covered += flops * len(take)
            total += flops * len(names)
        scale = total / covered

        def grams() -> object:
            return [(A @ A.mT, B.mT @ B) for A, B in stacks]

        calls["gram"] = grams
    return Probes(in_bytes, calls, gram_flops, scale, 2.0 * 512**3)
