"""``lora_fair`` in the default thread environment against a fully pinned one, alternating.

Each measurement is a fresh interpreter (the thread variables must be set before torch and
NumPy load): the default environment (no thread variables, torch's default pool), or pinned
(``OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS=1`` and ``torch.set_num_threads(1)``);
the two alternate, ``--rounds`` times each, and each interpreter reports the median of
``--repeats`` calls. ``--rev REV`` runs ``lorafair`` as of commit ``REV`` instead of the working
tree (exported with ``git archive``; e.g. ``6334c2f~1``, before ``single_threaded``). From the
repository root::

    python docs/scripts/thread_pools.py
    python docs/scripts/thread_pools.py --rev 6334c2f~1

Inputs: ``lorafair.bench.make_clients``, K = 6, r = 16, float32: one ViT-B/16 ``attn.qkv``
layer (2304 × 768) for seeds 0–4, and the twelve ``attn.proj`` layers (768 × 768), seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PINNED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def worker(pinned: bool, repeats: int) -> None:
    """In a fresh interpreter: medians (ms) of ``lora_fair`` on each input, as JSON."""
    import torch

    from lorafair.bench import PRESETS, make_clients, preset

    SHAPE_SETS = {name: list(preset(name).layers) for name in PRESETS}
    from lorafair.aggregate import lora_fair

    if pinned:
        torch.set_num_threads(1)
    vit = SHAPE_SETS["vit_b16"]
    qkv = next(s for s in vit if s.name.endswith("attn.qkv"))
    cases = {f"qkv seed {seed}": make_clients([qkv], 6, 16, seed=seed) for seed in range(5)}
    cases["12 proj"] = make_clients([s for s in vit if s.name.endswith("attn.proj")], 6, 16)
    out = {}
    for name, clients in cases.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            lora_fair(clients)
            times.append(1000 * (time.perf_counter() - t0))
        out[name] = statistics.median(times)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", default=None, help="a commit's lorafair instead of the working tree")
    p.add_argument("--rounds", type=int, default=2, help="interpreters per environment")
    p.add_argument("--repeats", type=int, default=5, help="calls per interpreter (median)")
    p.add_argument("--worker", choices=["default", "pinned"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker == "pinned", args.repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = [str(ROOT)]
        if args.rev:
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.rev, "lorafair"],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            path.insert(0, tmp)  # its lorafair first, this tree's benchmarks after
        base = {k: v for k, v in os.environ.items() if k not in PINNED}
        base["PYTHONPATH"] = os.pathsep.join(path)
        print(f"lorafair at {args.rev or 'the working tree'}; load {os.getloadavg()[0]:.2f}")
        results: dict[str, list[dict[str, float]]] = {"default": [], "pinned": []}
        for _ in range(args.rounds):
            for env_name in ("default", "pinned"):
                env = base | (PINNED if env_name == "pinned" else {})
                cmd = [sys.executable, __file__, "--worker", env_name]
                cmd += ["--repeats", str(args.repeats)]
                run = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                results[env_name].append(json.loads(run.stdout))
        for case in results["default"][0]:
            d = [r[case] for r in results["default"]]
            q = [r[case] for r in results["pinned"]]
            print(
                f"{case:12s} default {min(d):7.1f}–{max(d):7.1f} ms  "
                f"pinned {min(q):7.1f}–{max(q):7.1f} ms  "
                f"default/pinned {statistics.median(d) / statistics.median(q):.2f}"
            )
        print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
