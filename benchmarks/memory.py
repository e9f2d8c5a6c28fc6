"""Peak extra memory of one aggregator call, measured in a fresh process.

``tracemalloc`` does not see torch's CPU allocations, so on the CPU each measurement runs in a
new Python process (``python -m benchmarks.memory SPEC_JSON``) that

1. imports everything and runs the aggregator once on the ``tiny`` shapes (so that code pages
   and thread pools are resident before the baseline is taken),
2. builds the clients' factors, runs ``gc.collect()``, reads its resident set size
   ``VmRSS`` and resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, so
   ``VmHWM`` restarts from the current RSS),
3. calls the aggregator once and keeps the result alive,
4. reads the peak resident set size ``VmHWM`` from ``/proc/self/status``.

``peak_extra = VmHWM_after − VmRSS_before``: every byte the call touched on top of its inputs at
its peak, the result included. Where ``clear_refs`` cannot be written, the child falls back to
``ru_maxrss`` (not resettable): then the figure is an upper bound, flagged ``new_peak = False``
when the call did not set a new process peak. On CUDA the child uses
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
``torch.cuda.memory_allocated()`` before the call.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from typing import Any, TypedDict

__all__ = ["MemorySpec", "measure"]


class MemorySpec(TypedDict):
    """What one child process measures: a cell (as :func:`benchmarks.cells.make_inputs` takes
    it), the aggregator's name in :mod:`benchmarks.entries`, its options, the reference layers
    (dense references only) and the torch thread count."""

    shape_set: str
    max_layers: int | None
    K: int
    r: int
    dtype: str
    device: str
    seed: int
    aggregator: str
    options: dict[str, Any]
    ref_layers: list[str] | None
    threads: int | None


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
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(spec: MemorySpec, *, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run ``spec`` (a :class:`MemorySpec`) in a fresh interpreter; return its report."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
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

    from benchmarks import entries
    from benchmarks.cells import layers_for, make_inputs

    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    device = torch.device(spec["device"])
    entry = entries.get(spec["aggregator"])
    warm = make_inputs("tiny", None, 2, 2, spec["dtype"], spec["device"], seed=1)
    entry.run(warm, spec["options"], None)
    del warm
    inputs = make_inputs(
        spec["shape_set"],
        spec["max_layers"],
        spec["K"],
        spec["r"],
        spec["dtype"],
        spec["device"],
        seed=spec["seed"],
        need_shared=entry.shared_A,
        need_free=not entry.shared_A,
    )
    ref_layers = spec["ref_layers"]
    if ref_layers is not None:
        ref_layers = [
            n for n in layers_for(spec["shape_set"], spec["max_layers"]) if n in ref_layers
        ]
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
    result = entry.run(inputs, spec["options"], ref_layers)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        new_peak = True
        method = "cuda.max_memory_allocated"
    elif resettable:
        peak = _status_bytes("VmHWM")
        new_peak = True
        method = "VmHWM - VmRSS"
    else:
        peak = _maxrss_bytes()
        new_peak = peak > peak_before
        method = "ru_maxrss - VmRSS"
    del result
    return {"peak_extra_bytes": int(peak - before), "new_peak": bool(new_peak), "method": method}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
