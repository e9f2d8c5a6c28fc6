"""What the hardware allows: each aggregator's time against two floors measured in the same run.

- **memory floor** ``= in_bytes / BW_read + out_bytes / BW_write``: one read of every input byte
  and one write of the output. ``BW_read`` comes from the faster of two probes over one
  contiguous float32 buffer of the input's bytes (at most 1 GiB, the time scaled linearly
  beyond), ``buf.sum()`` and a BLAS ``gemv`` with a vector of ones (the faster pure read here),
  ``BW_write`` from ``buf.fill_(0)`` of one as large; all timed in the cell's round-robin (one
  kernel each: no per-tensor overhead, so a true floor).
  A third probe, not a floor, reads the same bytes one ``sum`` per input tensor: what any eager
  torch code that touches every input tensor once pays on top (per-kernel start-up).
- **compute floor**: the method's essential flops at the GEMM rate measured in the same run, in
  its accumulation dtype. For the averaging methods (``floor == "memory"``) that is
  ``2·n_in`` flops (one multiply-add per input element) at the rate of a 512³ GEMM in float32
  (float64 for float64 inputs); it is far below the memory floor. For the Gram methods
  (``floor == "gram"``) it is, per shape, the cheaper of two routes on float64 stacks of the
  cell's own shapes, at the dgemm rate measured on exactly those shapes (torch's general
  product, on all of torch's threads):

  - the two R × R Grams per layer, ``A_s A_sᵀ`` and ``B_sᵀ B_s`` with R = K·r. Their essential
    work is ``(d_in + d_out) R²`` flops, the symmetric products they are (one triangle each,
    a multiply-add counted as 2 flops); the probe times the general products,
    ``2 (d_in + d_out) R²`` flops, which gives the dgemm rate, and the floor is the essential
    flops at that rate, half the probe's time (batched per shape, at most 256 MiB of stacks at
    a time, scaled by the number of layers of that shape);
  - forming ``ΔW = B_s A_s`` densely, ``2 d_in d_out R`` flops, timed (one layer per shape,
    scaled likewise; probed only where its flops are within 4× of the Grams', i.e. large K).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafair.bench.cells import Inputs
from lorafair.bench.shapes import factor_bytes
from lorafair.registry import Floor

__all__ = ["Floors", "Probes", "make_probes"]

_BUDGET = 1 << 28
_SYMMETRIC = 0.5
"""A Gram's essential flops over the general product's the probe runs (one triangle)."""
_PROBE_BYTES = 1 << 30
"""The read and write probes use a buffer of at most this many bytes; their times are scaled
linearly to the input's bytes (bandwidth is flat far beyond the caches)."""


@dataclass
class Probes:
    """The timed probes of one cell (call each once per round of the round-robin)."""

    in_bytes: int
    """Bytes of the read and write probes' buffers (the input's, capped at 1 GiB)."""
    calls: dict[str, Callable[[], object]]
    gram_flops: float
    scales: dict[str, float]
    """Per ``gram:…`` / ``dense:…`` probe: the layers of its shape over the layers it covers."""
    gemm_flops: float


@dataclass
class Floors:
    """Median probe times of one cell and the floors they give.

    ``times`` gets the derived entries ``read`` (the faster read probe), ``gram`` (every layer's
    Grams as general products, the probe), ``gram_floor`` (their essential symmetric flops at
    the probe's rate: half of ``gram``), ``dense`` (every layer's dense product, where probed)
    and ``route`` (per shape the cheaper of ``gram_floor`` and ``dense``: the Gram methods'
    compute floor)."""

    probes: Probes
    times: dict[str, float]

    def __post_init__(self) -> None:
        t, sc = self.times, self.probes.scales
        t["read"] = min(t["read_sum"], t["read_gemv"])
        shapes = [k[5:] for k in t if k.startswith("gram:")]
        if shapes:
            gram = {s: t["gram:" + s] * sc["gram:" + s] for s in shapes}
            dense = {s: t["dense:" + s] * sc["dense:" + s] for s in shapes if "dense:" + s in t}
            # the probe runs 2 (d_in + d_out) R² flops; the essential symmetric work is half
            essential = {s: g * _SYMMETRIC for s, g in gram.items()}
            t["gram"] = sum(gram.values())
            t["gram_floor"] = sum(essential.values())
            if dense:
                t["dense"] = sum(dense.values())
            t["route"] = sum(min(g, dense.get(s, g)) for s, g in essential.items())

    def memory(self, in_bytes: int, out_bytes: int) -> float:
        t = self.times
        return (t["read"] * in_bytes + t["write"] * out_bytes) / self.probes.in_bytes

    def compute(self, floor: Floor, in_elements: int) -> float:
        if floor == "gram":
            return self.times["route"]
        return 2.0 * in_elements / self.gemm_rate

    @property
    def gemm_rate(self) -> float:
        return self.probes.gemm_flops / self.times["gemm"]

    @property
    def gram_rate(self) -> float:
        if "gram" not in self.times:
            return float("nan")
        return self.probes.gram_flops / self.times["gram"]


def _grams(A: torch.Tensor, B: torch.Tensor) -> Callable[[], object]:
    return lambda: (A @ A.mT, B.mT @ B)


def _dense(A: torch.Tensor, B: torch.Tensor) -> Callable[[], object]:
    return lambda: B @ A


def make_probes(inputs: Inputs, *, gram: bool) -> Probes:
    """Buffers for the read/write/GEMM probes and, if ``gram``, float64 stacks for the Grams
    (and the dense products, where they may be the cheaper route)."""
    clients = inputs.free or inputs.shared
    in_bytes = min(factor_bytes(clients), _PROBE_BYTES)
    dev, dt = inputs.device, inputs.dtype
    # bandwidth is bytes per second whatever they hold: the probes read float32 (float64 for
    # float64 inputs), which every backend sums at full speed; a bfloat16 sum on a CPU converts
    # each element and would measure the conversion, not the memory
    acc = torch.float64 if dt == torch.float64 else torch.float32
    n = in_bytes // torch.empty((), dtype=acc).element_size()
    read = torch.ones(n, dtype=acc, device=dev)
    cols = 4096
    rows = read[: n // cols * cols].view(-1, cols)
    tail = read[n // cols * cols :]
    ones = torch.ones(cols, dtype=acc, device=dev)
    write = torch.empty(n, dtype=acc, device=dev)
    a = torch.randn(512, 512, dtype=acc, device=dev)
    tensors = [t for c in clients for f in c.values() for t in f]
    calls: dict[str, Callable[[], object]] = {
        "read_sum": read.sum,
        # not a floor: every input byte read one kernel per input tensor, as eager torch must
        "read_per_tensor": lambda: [t.sum() for t in tensors],
        "read_gemv": lambda: (rows @ ones, tail.sum()),
        "write": lambda: write.fill_(0),
        "gemm": lambda: a @ a,
    }
    gram_flops = 0.0
    scales: dict[str, float] = {}
    if gram:
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
            key = f"{d_out}x{d_in}"
            calls["gram:" + key] = _grams(A_s, B_s)
            scales["gram:" + key] = len(names) / len(take)
            flops = 2.0 * (d_in + d_out) * R * R
            gram_flops += flops * len(names)
            if 2.0 * d_in * d_out * R <= 4 * flops:  # the dense route may be the cheaper one
                calls["dense:" + key] = _dense(A_s[0], B_s[0])
                scales["dense:" + key] = float(len(names))
    return Probes(in_bytes, calls, gram_flops, scales, 2.0 * 512**3)
