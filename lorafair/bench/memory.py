"""Peak memory growth of one aggregator call, measured in a fresh process.

``tracemalloc`` does not see torch's CPU allocations, so on the CPU each measurement runs in a
new Python process (``python -m lorafair.bench.memory SPEC_JSON``) that

1. imports everything and runs the aggregator once on two tiny layers (so that code pages and
   thread pools are resident before the baseline is taken),
2. builds the clients' factors, runs ``gc.collect()``, reads its resident set size ``VmRSS``
   and resets the kernel's peak-RSS counter (writes ``5`` to ``/proc/self/clear_refs``, so
   ``VmHWM`` restarts from the current RSS),
3. calls the aggregator once and keeps the result alive,
4. reads the peak resident set size ``VmHWM`` from ``/proc/self/status``.

``peak_extra = VmHWM_after − VmRSS_before``: every byte the call touched on top of its inputs at
its peak, the result included. ``ru_maxrss`` is not used where ``clear_refs`` can be written: it
cannot be reset, and a child inherits its parent's. Where it cannot, the child falls back to
``ru_maxrss`` and the figure is an upper bound, flagged ``new_peak = False`` when the call did
not set a new process peak. On CUDA: ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()``, minus ``torch.cuda.memory_allocated()`` before the call.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import resource
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from lorafair.bench.cell import Row
    from lorafair.bench.shapes import LayerShape

__all__ = ["MemorySpec", "measure", "record", "spec_for"]


class MemorySpec(TypedDict):
    """What one child process measures.

    ``layers``: the cell's ``[name, d_out, d_in]``; ``provider``: the module whose ``get(name)``
    returns the :class:`~lorafair.bench.entries.Entry` (``lorafair.bench.entries`` for the
    registry's aggregators); ``ref_layers``: the layers a reference runs on (``None``: all).
    """

    layers: list[tuple[str, int, int]]
    K: int
    r: int
    dtype: str
    device: str
    seed: int
    aggregator: str
    provider: str
    options: dict[str, Any]
    ref_layers: list[str] | None
    threads: int | None


def spec_for(
    layers: Sequence[LayerShape],
    *,
    K: int,
    r: int,
    dtype: str,
    aggregator: str,
    device: str = "cpu",
    seed: int = 0,
    provider: str = "lorafair.bench.entries",
    options: Mapping[str, Any] | None = None,
    ref_layers: list[str] | None = None,
    threads: int | None = None,
) -> MemorySpec:
    """The :class:`MemorySpec` of one call of ``aggregator`` on ``layers`` (the cell's shapes)."""
    return MemorySpec(
        layers=[(s.name, s.d_out, s.d_in) for s in layers],
        K=K,
        r=r,
        dtype=dtype,
        device=device,
        seed=seed,
        aggregator=aggregator,
        provider=provider,
        options=dict(options or {}),
        ref_layers=ref_layers,
        threads=threads,
    )


def record(row: Row, report: Mapping[str, Any], input_bytes: int) -> None:
    """Put a :func:`measure` report into ``row``: peak growth in MiB, over the input bytes."""
    row.peak_extra_mib = report["peak_extra_bytes"] / 2**20
    row.mem_ratio = report["peak_extra_bytes"] / input_bytes
    row.mem_note = report["method"] + ("" if report["new_peak"] else " (upper bound)")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(
    spec: MemorySpec, *, timeout_s: float = 3600.0, pythonpath: str | None = None
) -> dict[str, Any]:
    """Run ``spec`` in a fresh interpreter; its report ``{"peak_extra_bytes", "new_peak",
    "method"}``. ``pythonpath`` is prepended to the child's ``PYTHONPATH`` (for a provider
    outside the installed packages)."""
    env = dict(os.environ)
    if pythonpath:
        rest = env.get("PYTHONPATH")
        env["PYTHONPATH"] = pythonpath + (os.pathsep + rest if rest else "")
    proc = subprocess.run(
        [sys.executable, "-m", "lorafair.bench.memory", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def _child(spec: MemorySpec) -> dict[str, Any]:
    import torch

    from lorafair.bench.cells import make_inputs
    from lorafair.bench.shapes import LayerShape, ShapeSet, preset

    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    device = torch.device(spec["device"])
    entry = importlib.import_module(spec["provider"]).get(spec["aggregator"])
    warm = make_inputs(preset("tiny"), 2, 2, spec["dtype"], spec["device"], seed=1)
    entry.run(warm, spec["options"], None)
    del warm
    layers = tuple(LayerShape(n, int(o), int(i)) for n, o, i in spec["layers"])
    inputs = make_inputs(
        ShapeSet("cell", layers, len(layers), "memory child"),
        spec["K"],
        spec["r"],
        spec["dtype"],
        spec["device"],
        seed=spec["seed"],
        need_shared=entry.shared_A,
        need_free=not entry.shared_A,
    )
    gc.collect()
    resettable = False
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_bytes("VmRSS")
        resettable = _reset_peak()
    peak_before = _maxrss_bytes()
    result = entry.run(inputs, spec["options"], spec["ref_layers"])
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        new_peak, method = True, "cuda.max_memory_allocated"
    elif resettable:
        peak = _status_bytes("VmHWM")
        new_peak, method = True, "VmHWM - VmRSS"
    else:
        peak = _maxrss_bytes()
        new_peak, method = peak > peak_before, "ru_maxrss - VmRSS"
    del result
    return {"peak_extra_bytes": int(peak - before), "new_peak": bool(new_peak), "method": method}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
