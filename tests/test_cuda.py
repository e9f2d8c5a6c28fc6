"""CUDA: every registered aggregator on GPU tensors, against its CPU result, without per-layer
host synchronisation. Runs wherever a GPU is present (skipped otherwise)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from lorafair import LoRAFactors, registry

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# every method with a global update (FedSA-LoRA's personal adapters have none)
SPECS = {s.name: s for s in registry.specs() if s.update_factors is not None}


def _clients(n_layers, *, k=4, r=4, d_out=96, d_in=64, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(n_layers)
    A0 = {f"l{i}": torch.randn(r, d_in, generator=g) for i in range(n_layers)}
    out = []
    for _ in range(k):
        c = {}
        for name, A in A0.items():
            B = torch.randn(d_out, r, generator=g)
            c[name] = LoRAFactors(A.to(device, dtype), B.to(device, dtype))
        out.append(c)
    return out


def _run(name, clients):
    spec = SPECS[name]
    assert spec.update_factors is not None
    return spec.update_factors(functools.partial(spec.fn, **spec.defaults)(clients))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(SPECS))
def test_cuda_matches_cpu(name, dtype):
    cpu = _clients(3, dtype=dtype)
    gpu = [{n: LoRAFactors(f.A.cuda(), f.B.cuda()) for n, f in c.items()} for c in cpu]
    want, got = _run(name, cpu), _run(name, gpu)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for layer, (A, B) in got.items():
        assert A.device.type == "cuda"
        assert A.dtype == dtype
        Aw, Bw = want[layer]
        dw = (Bw.double() @ Aw.double()).norm()
        assert float(
            (B.double().cpu() @ A.double().cpu() - Bw.double() @ Aw.double()).norm()
        ) <= tol * float(dw)


def _syncs(name, n_layers):
    clients = _clients(n_layers, device="cuda")
    _run(name, clients)  # warm-up: lazy CUDA/cuBLAS/cuSOLVER initialisation
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _run(name, clients)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("name", list(SPECS))
def test_host_round_trips_do_not_grow_with_the_number_of_layers(name):
    few, many = _syncs(name, 2), _syncs(name, 12)
    assert many == few, f"{name}: {few} host syncs for 2 layers, {many} for 12"
    if SPECS[name].floor == "memory":
        assert many <= 1, f"{name}: {many} host round trips per call"
