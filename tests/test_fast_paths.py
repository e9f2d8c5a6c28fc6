"""Issue 14's fast paths agree with the code they shortcut: validation, thread pinning, the
Gram route's batching and syrk Grams, FFA-LoRA's copy check, and the benchmark floors."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafair import LoRAFactors, _frozen, _linalg, _stacks, _threads, _validate, registry
from lorafair import aggregate as agg
from lorafair.errors import FrozenAMismatchError, LoRAFairError, NonFiniteError
from tests import reference as ref

_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64]


@settings(max_examples=300, deadline=None)
@given(
    shapes=st.lists(
        st.tuples(
            st.integers(0, 4), st.integers(1, 4), st.integers(1, 4), st.integers(0, 4)
        ),  # (r_A, d_in, d_out, r_B)
        min_size=1,
        max_size=3,
    ),
    ndim_b=st.sampled_from([1, 2, 3]),
    dtype_i=st.integers(0, len(_DTYPES) - 1),
    equal_ranks=st.booleans(),
    allow_excess_rank=st.booleans(),
)
def test_layer_fast_check_passes_only_what_the_full_check_passes(
    shapes, ndim_b, dtype_i, equal_ranks, allow_excess_rank
):
    """``_layer_ok`` may send a valid layer to the full check, never let an invalid one by."""
    As = [torch.zeros(rA, d_in) for rA, d_in, _, _ in shapes]
    Bs = [torch.zeros(d_out, rB) for _, _, d_out, rB in shapes]
    Bs[-1] = Bs[-1].reshape(-1) if ndim_b == 1 else Bs[-1]
    Bs[-1] = Bs[-1].unsqueeze(0) if ndim_b == 3 else Bs[-1]
    As[-1] = As[-1].to(_DTYPES[dtype_i])
    opts = {"equal_ranks": equal_ranks, "allow_excess_rank": allow_excess_rank}
    fast = _validate._layer_ok(As, Bs, **opts)
    try:
        _validate._check_layer("fc", As, Bs, **opts)
    except LoRAFairError:
        assert not fast
    else:
        assert fast


def test_prepare_still_names_the_client_of_a_malformed_pair():
    good = LoRAFactors(torch.zeros(2, 5), torch.zeros(4, 2))
    with pytest.raises(LoRAFairError, match="client 1 must give a pair"):
        _validate.prepare([{"fc": good}, {"fc": [good.A]}], None, equal_ranks=True)
    with pytest.raises(LoRAFairError, match="client 1 has B of type list"):
        _validate.prepare([{"fc": good}, {"fc": (good.A, [1.0])}], None, equal_ranks=True)


def test_torch_single_threaded_pins_and_restores_even_on_error():
    seen = []

    @_threads.torch_single_threaded
    def probe(fail: bool) -> int:
        seen.append(torch.get_num_threads())
        if fail:
            raise ValueError("boom")
        return 7

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert probe(False) == 7
        with pytest.raises(ValueError, match="boom"):
            probe(True)
        assert seen == [1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _blas_threads() -> list[int]:
    return [lib.num_threads for lib in _threads._blas()]


def test_thread_rule_gives_a_thread_per_2_25_flops_up_to_the_process_pool(monkeypatch):
    monkeypatch.setattr(_threads, "_free_cores", lambda: 2.0)  # an idle 2-core machine
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with _threads.single_threaded():
            assert torch.get_num_threads() == 1
            assert _threads.threads_for(0) == 1
            assert _threads.threads_for(2**26 - 1) == 1  # 2 threads need 2 · 2²⁵ flops
            assert _threads.threads_for(2**26) == 2
            assert _threads.threads_for(1e15) == 2  # never above the pool the call began with
            with _threads.pool_for(2**26) as n:
                assert n == 2
                assert torch.get_num_threads() == 1  # torch's copies stay on one thread
                assert set(_blas_threads()) == {2}
                with _threads.pool_for(10) as m:  # small work inside: stays as it is
                    assert m == 1
                    assert set(_blas_threads()) == {2}
                assert set(_blas_threads()) == {2}
            assert torch.get_num_threads() == 1
            assert set(_blas_threads()) == {1}
            with pytest.raises(ValueError, match="boom"), _threads.pool_for(2**30):
                raise ValueError("boom")
            assert torch.get_num_threads() == 1
            assert set(_blas_threads()) == {1}
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)  # a process pinned by its environment: one thread everywhere
        with _threads.single_threaded():
            assert _threads.threads_for(1e15) == 1
    finally:
        torch.set_num_threads(before)


def test_thread_rule_gives_no_more_threads_than_free_cores(monkeypatch):
    before = torch.get_num_threads()
    calls = []

    def busy() -> float:
        calls.append(1)
        return 1.4  # others keep 0.6 of a core busy: rounds to one free core

    monkeypatch.setattr(_threads, "_free_cores", busy)
    try:
        torch.set_num_threads(2)
        with _threads.single_threaded():
            assert _threads.threads_for(1e15) == 1
            assert _threads.threads_for(1e12) == 1
            assert _threads.threads_for(10) == 1
        assert calls == [1]  # estimated once per call, and only for a kernel that asks
        with _threads.single_threaded():
            assert _threads.threads_for(10) == 1
        assert calls == [1]
        monkeypatch.setattr(_threads, "_free_cores", lambda: 1.6)
        with _threads.single_threaded():
            assert _threads.threads_for(1e15) == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("layers", [9, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["lora_fair", "flexlora"])
def test_threaded_kernels_give_the_same_bits_as_one_thread(method, dtype, layers, monkeypatch):
    """With every kernel large enough for the pool (threshold 1 flop, two free cores), the
    result equals the one-thread result to the bit: the policy only threads kernels whose
    result does not depend on the thread count. Nine layers of three shapes split over the
    workers; one layer runs its R × R core alone, its products in halves on the workers."""
    monkeypatch.setattr(_threads, "_free_cores", lambda: 2.0)
    monkeypatch.setattr(_threads, "_FLOPS_PER_THREAD", 1.0)
    monkeypatch.setattr(_linalg, "_SPLIT_FLOPS", 0.0)
    g = torch.Generator().manual_seed(3)
    clients = [
        {
            f"l{i}": LoRAFactors(
                torch.randn(4, 300, generator=g).to(dtype),
                torch.randn(200 + 40 * (i % 3), 4, generator=g).to(dtype),
            )
            for i in range(layers)
        }
        for _ in range(5)
    ]
    one, two = _on_one_then_two_threads(getattr(agg, method), clients)
    _assert_same_bits(one, two)


def _on_one_then_two_threads(fn, clients, between=lambda: None):
    """``fn(clients)`` with torch's pool at one thread, then (after ``between()``) at two."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn(clients)
        torch.set_num_threads(2)
        between()
        two = fn(clients)
    finally:
        torch.set_num_threads(before)
    return one, two


def _assert_same_bits(one, two):
    for name in one:
        assert torch.equal(one[name].A, two[name].A)
        assert torch.equal(one[name].B, two[name].B)


def test_thread_rule_counts_a_memory_pass_by_its_bytes(monkeypatch):
    monkeypatch.setattr(_threads, "_free_cores", lambda: 2.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with _threads.single_threaded():
            assert _threads.threads_for(nbytes=2**21 - 1) == 1  # 2 threads need 2 · 2²⁰ bytes
            assert _threads.threads_for(nbytes=2**21) == 2
            assert _threads.threads_for(10, nbytes=10) == 1
    finally:
        torch.set_num_threads(before)


def _split_threads(monkeypatch, free: float, items: int, flops: float) -> tuple[list, set]:
    """Which threads ran ``split_map``'s items (and the results), inside a pinned call."""
    monkeypatch.setattr(_threads, "_free_cores", lambda: free)
    seen = set()
    before = torch.get_num_threads()

    def job(state: list, x: int) -> tuple[int, int]:
        seen.add(threading.get_ident())
        state.append(x)  # one scratch per worker: never shared between threads
        time.sleep(0.002)
        return x * x, torch.get_num_threads()

    try:
        torch.set_num_threads(2)
        with _threads.single_threaded():
            out = _threads.split_map(job, list(range(items)), scratch=list, flops=flops)
    finally:
        torch.set_num_threads(before)
    return out, seen


def test_split_map_runs_large_work_side_by_side_in_order(monkeypatch):
    out, seen = _split_threads(monkeypatch, free=2.0, items=12, flops=2**25)
    assert [v for v, _ in out] == [x * x for x in range(12)]
    assert all(t == 1 for _, t in out)  # each worker on one thread of torch's pool
    assert len(seen) == 2
    assert threading.get_ident() not in seen


def test_split_map_keeps_small_work_and_busy_machines_in_the_caller(monkeypatch):
    out, seen = _split_threads(monkeypatch, free=2.0, items=12, flops=10)
    assert [v for v, _ in out] == [x * x for x in range(12)]
    assert seen == {threading.get_ident()}
    _, seen = _split_threads(monkeypatch, free=1.2, items=12, flops=2**30)
    assert seen == {threading.get_ident()}


def test_split_map_gives_a_lone_large_item_the_blas_pool(monkeypatch):
    monkeypatch.setattr(_threads, "_free_cores", lambda: 2.0)
    counts = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with _threads.single_threaded():
            _threads.split_map(
                lambda _, x: counts.append(_blas_threads()), [0], scratch=lambda: None, flops=2**30
            )
            assert set(_blas_threads()) == {1}
    finally:
        torch.set_num_threads(before)
    assert counts
    assert set(counts[0]) == {2}


def test_split_map_raises_an_item_s_error(monkeypatch):
    monkeypatch.setattr(_threads, "_free_cores", lambda: 2.0)

    def job(_: None, x: int) -> int:
        if x == 5:
            raise ValueError("item 5")
        return x

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with _threads.single_threaded(), pytest.raises(ValueError, match="item 5"):
            _threads.split_map(job, list(range(9)), scratch=lambda: None, flops=2**26)
    finally:
        torch.set_num_threads(before)


def _pinned_on_two_cores(monkeypatch, fn):
    """``fn()`` inside a pinned call on an idle 2-core machine (torch's pool at two)."""
    monkeypatch.setattr(_threads, "_free_cores", lambda: 2.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with _threads.single_threaded():
            return fn()
    finally:
        torch.set_num_threads(before)


def test_split_map_inside_a_worker_runs_its_items_there(monkeypatch):
    """An item that splits its own work, run by a worker, runs the inner items itself, one at
    a time with the worker's one BLAS thread (waiting on the busy workers could deadlock); a
    lone item, run by the caller with the BLAS pool lifted, hands its inner items to the
    workers, each on one BLAS thread."""
    seen: list[tuple[int, int, list[int]]] = []

    def inner(_: None, x: int) -> int:
        seen.append((x, threading.get_ident(), _blas_threads()))
        time.sleep(0.002)
        return -x

    def outer(_: None, x: int) -> tuple[int, list[int]]:
        items = [100 * (x + 1) + i for i in range(4)]  # apart from the outer items' own
        got = _threads.split_map(inner, items, scratch=lambda: None, flops=2**30)
        seen.append((x, threading.get_ident(), _blas_threads()))
        return threading.get_ident(), got

    many = _pinned_on_two_cores(
        monkeypatch,
        lambda: _threads.split_map(outer, list(range(6)), scratch=lambda: None, flops=2**30),
    )
    by_item = {x: tid for x, tid, _ in seen}
    for x, (tid, got) in enumerate(many):
        assert got == [-(100 * (x + 1) + i) for i in range(4)]
        assert all(by_item[100 * (x + 1) + i] == tid for i in range(4))  # in the outer's worker
    assert threading.get_ident() not in by_item.values()
    assert all(set(blas) == {1} for _, _, blas in seen)

    seen.clear()
    [(tid, got)], after = _pinned_on_two_cores(
        monkeypatch,
        lambda: (
            _threads.split_map(outer, [7], scratch=lambda: None, flops=2**30),
            _blas_threads(),
        ),
    )
    assert tid == threading.get_ident()  # the lone item: in the caller
    assert got == [-(800 + i) for i in range(4)]
    inner_threads = {t for x, t, _ in seen if x >= 800}
    assert len(inner_threads) == 2
    assert tid not in inner_threads
    assert all(set(blas) == {1} for x, _, blas in seen if x >= 800)
    assert set(after) == {1}  # back to the call's pin after the lone item


@pytest.mark.parametrize(
    ("x_shape", "y_shape", "halves"),
    [
        ((3, 50, 40), (3, 40, 31), 6),
        ((50, 40), (2, 40, 31), 4),
        ((7, 5), (5, 1), 1),
        ((6, 0), (0, 4), 2),
    ],
)
def test_matmul_in_column_halves_matches_torch_s_product(x_shape, y_shape, halves, monkeypatch):
    """``_linalg.matmul`` (CPU float64: NumPy gemm in two column halves) is the product, to
    float64 rounding, on one thread and on two, where it gives the same bits; also for a
    transposed view; other dtypes are torch's own product."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=g, dtype=torch.float64)
    y = torch.randn(*y_shape, generator=g, dtype=torch.float64)
    want = x @ y
    monkeypatch.setattr(_linalg, "_SPLIT_FLOPS", 0.0)  # split these small products too
    splits = []
    inner = _linalg.split_map
    monkeypatch.setattr(
        _linalg,
        "split_map",
        lambda fn, items, **k: splits.append(len(items)) or inner(fn, items, **k),
    )
    one = _linalg.matmul(x, y)
    assert splits == [halves]  # per matrix two column halves (one for a single column)
    monkeypatch.setattr(_threads, "_FLOPS_PER_THREAD", 1.0)
    two = _pinned_on_two_cores(monkeypatch, lambda: _linalg.matmul(x, y))
    assert one.shape == two.shape == want.shape
    assert torch.allclose(one, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(one, two)
    xt = x.mT.contiguous().mT  # the same values, column-major
    assert torch.allclose(_linalg.matmul(xt, y), want, rtol=1e-12, atol=1e-12)
    assert torch.equal(_linalg.matmul(x.float(), y.float()), x.float() @ y.float())


def test_free_cores_reads_the_machine():
    free = _threads._free_cores()
    assert 0.0 <= free <= (os.cpu_count() or 1) + 1 or free == float("inf")


def test_thread_rule_keeps_vit_b_layers_on_one_thread_and_llm_grams_on_the_pool(monkeypatch):
    """The rule's two measured regimes: every ViT-B/16 Gram at K·r = 96 on one thread, every
    Llama-3-8B linear's Gram at K·r = 320 on two (the module docstring's figures)."""
    monkeypatch.setattr(_threads, "_free_cores", lambda: 2.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with _threads.single_threaded():
            for d_out, d_in in [(2304, 768), (768, 768), (3072, 768), (768, 3072)]:
                assert _threads.threads_for(min(d_out, d_in) * 96**2) == 1
            for d_out, d_in in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]:
                assert _threads.threads_for(min(d_out, d_in) * 320**2) == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: s.name)
def test_every_registered_aggregator_runs_on_one_torch_thread(spec, monkeypatch):
    """Every aggregator pins torch's pool for its call (lora_fair via single_threaded): seen from
    the input validation each one runs inside its call."""
    seen = []
    real = _validate.normalise_weights

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 6, generator=g)
    clients = [
        {"fc": LoRAFactors(A if spec.shared_A else torch.randn(2, 6, generator=g), B)}
        for B in (torch.randn(5, 2, generator=g) for _ in range(3))
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(_validate, "normalise_weights", spy)
        spec.fn(clients, **spec.defaults)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen
    assert set(seen) == {1}


def test_syrk_grams_equal_torch_products():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(3, 40, 7, generator=g, dtype=torch.float64)
    A = torch.randn(3, 7, 25, generator=g, dtype=torch.float64)
    G_a, G_b = _linalg.grams(B, A)
    torch.testing.assert_close(G_a, A @ A.mT, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(G_b, B.mT @ B, rtol=1e-13, atol=1e-13)
    assert torch.equal(G_a, G_a.mT)
    assert torch.equal(G_b, G_b.mT)
    G_a2, _ = _linalg.grams(B[0], A[0])  # one matrix
    torch.testing.assert_close(G_a2, A[0] @ A[0].mT, rtol=1e-13, atol=1e-13)


def _flex_clients(n_layers, k=4, r=3, d_out=20, d_in=12):
    g = torch.Generator().manual_seed(2)
    return [
        {
            f"l{i}": LoRAFactors(
                torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
            )
            for i in range(n_layers)
        }
        for _ in range(k)
    ]


@pytest.mark.parametrize("budget", [1, 16 * 12 * 12 * 2, 1 << 25])
def test_gram_route_chunks_give_the_optimum_whatever_the_chunk_size(budget, monkeypatch):
    """One layer per chunk of Grams, a few, or all: the same optimal factors, contiguous, for a
    fixed rank and for a rank chosen per layer from its σ."""
    clients = _flex_clients(5)
    monkeypatch.setattr(_stacks, "GRAM_BYTES", budget)
    out = agg.flexlora(clients, rank=3)
    for name, (A, B) in out.items():
        assert A.is_contiguous()
        assert B.is_contiguous()
        dw = ref.delta_w(clients, name)
        best = ref.best_rank_approx(dw, 3)
        err = float((B.double() @ A.double() - best).norm() / best.norm())
        assert err < 1e-5
    report = agg.flexlora_report(clients, rank=agg.EnergyThreshold(0.9))
    for name, (A, B) in report.adapters.items():
        k = report.ranks[name].rank
        best = ref.best_rank_approx(ref.delta_w(clients, name), k)
        assert float((B.double() @ A.double() - best).norm() / best.norm()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flexlora_cpu_gram_route_never_stacks_a_layer(dtype, monkeypatch):
    """On the CPU the Gram route, for a fixed rank and for ranks chosen per layer from σ
    (EnergyThreshold, flexlora_report), builds no float64 d × R stack: its Grams and products
    run in the per-worker column buffers of _stacks. The result is still the optimum."""

    def no_stack(*args, **kwargs):
        raise AssertionError("a float64 stack was built")

    clients = [
        {name: LoRAFactors(f.A.to(dtype), f.B.to(dtype)) for name, f in c.items()}
        for c in _flex_clients(3)
    ]
    exact = [
        {name: LoRAFactors(f.A.double(), f.B.double()) for name, f in c.items()} for c in clients
    ]
    assert agg._route(20, 12, 12, dtype, None) == "gram"
    monkeypatch.setattr(agg, "stacked_batch", no_stack)
    monkeypatch.setattr(_linalg, "grams", no_stack)  # the Grams of stacks
    fixed = agg.flexlora(clients, rank=3)
    energy = agg.flexlora_report(clients, rank=agg.EnergyThreshold(0.9))
    report = agg.flexlora_report(clients, rank=3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name in fixed:
        dw = ref.delta_w(exact, name)
        S = torch.linalg.svdvals(dw)
        for k, (A, B) in [(3, fixed[name]), (3, report.adapters[name])]:
            best = ref.best_rank_approx(dw, k)
            assert float((B.double() @ A.double() - best).norm() / best.norm()) < tol
        assert report.ranks[name].rank == 3
        want = float((S[:3] ** 2).sum() / (S**2).sum())
        assert abs(report.ranks[name].energy - want) < tol
        k = energy.ranks[name].rank
        A, B = energy.adapters[name]
        assert A.shape == (k, 12)
        assert B.shape == (20, k)
        assert float((S[: k - 1] ** 2).sum() / (S**2).sum()) < 0.9 * (1 + 1e-6)
        assert float((S[:k] ** 2).sum() / (S**2).sum()) >= 0.9 * (1 - 1e-6) - tol
        best = ref.best_rank_approx(dw, k)
        assert float((B.double() @ A.double() - best).norm() / best.norm()) < tol


def test_ffa_lora_cpu_copy_check_matches_the_tolerances():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(2, 6, generator=g)
    clients = [{"fc": LoRAFactors(A.clone(), torch.randn(5, 2, generator=g))} for _ in range(3)]
    agg.ffa_lora(clients)  # bit-equal copies
    near = A.clone()
    near[0, 0] = torch.nextafter(near[0, 0], torch.tensor(10.0))
    clients[2] = {"fc": LoRAFactors(near, clients[2]["fc"].B)}
    agg.ffa_lora(clients)  # within rtol: passes the exact test
    far = A.clone()
    far[1, 1] += 1.0
    clients[1] = {"fc": LoRAFactors(far, clients[1]["fc"].B)}
    with pytest.raises(FrozenAMismatchError, match=r"layer 'fc': client 1"):
        agg.ffa_lora(clients)
    nan = A.clone()
    nan[0, 1] = float("nan")
    clients[1] = {"fc": LoRAFactors(nan, clients[1]["fc"].B)}
    with pytest.raises(NonFiniteError, match=r"client 1 has NaN or Inf in A"):
        agg.ffa_lora(clients)


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements' bytes in row-major order (an independent reference)."""
    return t.contiguous().view(_INTS[t.element_size()]).numpy().tobytes()


@pytest.mark.parametrize("memcmp", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 40)),
    flip=st.integers(0, 10**6),
    transposed=st.booleans(),
)
@settings(max_examples=30, deadline=None)
def test_same_bits_is_byte_equality(memcmp, dtype, shape, flip, transposed):
    """``same_bits`` against the bytes themselves: a clone matches, one flipped bit anywhere
    (the last byte included) does not, on the memcmp path and on the fallback, contiguous or
    not."""
    with pytest.MonkeyPatch.context() as mp:
        if not memcmp:
            mp.setattr(_frozen, "_memcmp", lambda: None)
        _same_bits_cases(dtype, shape, flip, transposed)


def _same_bits_cases(dtype, shape, flip, transposed):
    g = torch.Generator().manual_seed(flip)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if transposed:
        x = x.mT
    y = x.clone()
    assert _frozen.same_bits(x, y)
    assert _bytes(x) == _bytes(y)
    z = x.contiguous().clone()
    flat = z.view(-1).view(_INTS[x.element_size()])
    i = flip % flat.numel()
    flat[i] ^= 1 << (flip % (8 * x.element_size() - 1))
    assert _bytes(z) != _bytes(x)
    assert not _frozen.same_bits(x, z)
    assert not _frozen.same_bits(z, x)


def test_same_bits_tells_signed_zeros_apart_and_matches_a_nan():
    zero = torch.zeros(3)
    assert not _frozen.same_bits(zero, -zero)
    assert torch.equal(zero, -zero)  # which is why the tolerance test runs after a False
    nan = torch.tensor([1.0, float("nan")])
    assert _frozen.same_bits(nan, nan.clone())
    assert not _frozen.same_bits(torch.zeros(3), torch.zeros(4))
    assert not _frozen.same_bits(torch.zeros(3), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("method", ["ffa_lora", "fedsvd"])
def test_a_nan_shared_by_every_frozen_copy_is_reported_as_non_finite(method):
    """Bit-equal copies skip the tolerance test; the NaN they share is still named."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(2, 6, generator=g)
    A[1, 3] = float("nan")
    clients = [{"fc": LoRAFactors(A.clone(), torch.randn(5, 2, generator=g))} for _ in range(3)]
    with pytest.raises(NonFiniteError, match=r"layer 'fc'.*client 0 has NaN or Inf in A"):
        getattr(agg, method)(clients)


def test_torch_pool_for_lifts_and_restores_torch_s_pool(monkeypatch):
    monkeypatch.setattr(_threads, "_free_cores", lambda: 2.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with _threads.single_threaded():
            with _threads.torch_pool_for(2**23) as n:
                assert n == 2
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
            with _threads.torch_pool_for(2**10) as m:
                assert m == 1
                assert torch.get_num_threads() == 1
            with pytest.raises(ValueError, match="boom"), _threads.torch_pool_for(2**30):
                raise ValueError("boom")
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["fedit", "ffa_lora", "flora"])
def test_threaded_memory_passes_give_the_same_bits_as_one_thread(method, dtype, monkeypatch):
    """Every pass large enough for two threads (1 byte each): the averages equal the one-thread
    averages to the bit, and the pool really was lifted."""
    monkeypatch.setattr(_threads, "_free_cores", lambda: 2.0)
    monkeypatch.setattr(_threads, "_BYTES_PER_THREAD", 1.0)
    lifted = []
    real = _threads.threads_for

    def spy(flops: float = 0.0, *, nbytes: float = 0.0) -> int:
        n = real(flops, nbytes=nbytes)
        lifted.append(n)
        return n

    monkeypatch.setattr(_threads, "threads_for", spy)
    g = torch.Generator().manual_seed(4)
    A0 = torch.randn(4, 3000, generator=g)
    clients = [
        {
            f"l{i}": LoRAFactors(
                (A0 if method == "ffa_lora" else torch.randn(4, 3000, generator=g)).to(dtype),
                torch.randn(2000, 4, generator=g).to(dtype),
            )
            for i in range(3)
        }
        for _ in range(7)
    ]
    one, two = _on_one_then_two_threads(getattr(agg, method), clients, between=lifted.clear)
    assert 2 in lifted
    _assert_same_bits(one, two)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=50), max_size=30),
    st.integers(min_value=0, max_value=120),
)
def test_packed_batches_are_greedy_in_order_and_within_the_budget(sizes, budget):
    """Every item once, in order; a batch of two or more fits the budget, and the next item
    would not have fitted in it (greedy)."""
    spans = _validate.packed(sizes, budget)
    assert [i for span in spans for i in span] == list(range(len(sizes)))
    for span in spans:
        assert len(span) > 0
        total = sum(sizes[i] for i in span)
        assert total <= budget or len(span) == 1
        if span.stop < len(sizes):
            assert total + sizes[span.stop] > budget


def _narrow_clients(n_layers, dtype=torch.bfloat16, k=5, r=4):
    g = torch.Generator().manual_seed(4)
    return [
        {
            f"l{i}": LoRAFactors(  # two shapes, alternating: chunks cut across groups
                torch.randn(r, 300, generator=g).to(dtype),
                torch.randn(200 + 40 * (i % 2), r, generator=g).to(dtype),
            )
            for i in range(n_layers)
        }
        for _ in range(k)
    ]


@pytest.mark.parametrize("budget", [1, 3 * 16 * 20**2, 1 << 25])
def test_gram_chunks_cover_every_layer_once_in_order_within_the_budget(budget, monkeypatch):
    """Every layer in exactly one chunk, in group order; a chunk of more than one layer holds
    at most the budget's bytes of Grams (2 · 8 R² a layer)."""
    monkeypatch.setattr(_stacks, "GRAM_BYTES", budget)
    prep = _validate.prepare(
        _narrow_clients(7), None, equal_ranks=False, check_finite=False, allow_excess_rank=False
    )
    groups = _validate.group_by_shape(list(prep.layers.values()))
    chunks = _stacks.chunks(groups)
    flat = [(part.group, layer) for chunk in chunks for part in chunk for layer in part.layers]
    assert flat == [(i, layer) for i, group in enumerate(groups) for layer in group]
    for chunk in chunks:
        used = sum(16 * sum(part.layers[0].ranks) ** 2 * len(part.layers) for part in chunk)
        assert used <= budget or sum(len(part.layers) for part in chunk) == 1
    if budget == 1:
        assert len(chunks) == 7


@pytest.mark.parametrize("what", ["jobs", "results"])
@pytest.mark.parametrize("rank", [3, agg.EnergyThreshold(0.9)])
def test_flexlora_host_route_in_small_jobs_and_result_batches_gives_the_same_bits(
    what, rank, monkeypatch
):
    """One layer per R × R core job (``_CORE_BYTES``), or per batch of float64 results
    (``_host_factors`` within ``GRAM_BYTES``, the Grams' chunk kept whole): the same factors,
    ranks and energies to the bit."""
    clients = _narrow_clients(6)
    whole = agg.flexlora_report(clients, rank=rank)
    if what == "jobs":
        monkeypatch.setattr(agg, "_CORE_BYTES", 1)
    else:
        monkeypatch.setattr(
            _stacks,
            "chunks",
            lambda groups: [[_stacks.Slice(i, list(g)) for i, g in enumerate(groups)]],
        )
        monkeypatch.setattr(_stacks, "GRAM_BYTES", 1)
    small = agg.flexlora_report(clients, rank=rank)
    assert small.ranks == whole.ranks
    _assert_same_bits(whole.adapters, small.adapters)


def _narrow_columns(monkeypatch):
    """Column blocks of 64 (at least 16) instead of 4096, so the sides of small test layers
    (200–300 columns) span several blocks and split in halves."""
    monkeypatch.setattr(_stacks, "_COLUMNS", 64)
    monkeypatch.setattr(_stacks, "_BUFFER", 20 * 64)
    monkeypatch.setattr(_stacks, "_MIN_COLUMNS", 16)


def test_wide_sides_split_in_halves_at_a_block_boundary(monkeypatch):
    """A side of two or more column blocks becomes two items that cover it once, split where a
    block starts, the first holding the extra block; a one-block side stays whole."""
    _narrow_columns(monkeypatch)
    prep = _validate.prepare(
        _narrow_clients(2), None, equal_ranks=False, check_finite=False, allow_excess_rank=False
    )
    for layer in prep.layers.values():
        for side in ("A", "B"):
            d = _stacks.width(layer, side)
            blocks = _stacks._blocks(d, sum(layer.ranks))
            halves = _stacks._halves(layer, side)
            assert len(blocks) >= 2
            assert len(halves) == 2
            assert halves[0][0] == 0
            assert halves[1][1] == d
            assert halves[0][1] == halves[1][0]
            assert halves[0][1] in [start for start, _ in blocks]
            first = sum(1 for start, _ in blocks if start < halves[0][1])
            assert first == len(blocks) - len(blocks) // 2
    monkeypatch.setattr(_stacks, "_COLUMNS", 4096)
    monkeypatch.setattr(_stacks, "_BUFFER", 320 * 4096)
    layer = next(iter(prep.layers.values()))
    assert _stacks._halves(layer, "A") == [(0, layer.d_in)]
    assert _stacks._split_sides(layer) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grams_of_split_sides_match_the_float64_stacks(dtype, monkeypatch):
    """Grams summed over halves of column blocks equal those of the whole float64 stacks."""
    _narrow_columns(monkeypatch)
    prep = _validate.prepare(
        _narrow_clients(3, dtype),
        None,
        equal_ranks=False,
        check_finite=False,
        allow_excess_rank=False,
    )
    groups = _validate.group_by_shape(list(prep.layers.values()))
    for group, (MA, MB) in zip(groups, _stacks.grams(groups), strict=True):
        for i, layer in enumerate(group):
            A_u = torch.cat([a.double() for a in layer.As])
            B_s = torch.cat([b.double() for b in layer.Bs], dim=1)
            torch.testing.assert_close(MA[i], A_u @ A_u.T, rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(MB[i], B_s.T @ B_s, rtol=1e-13, atol=1e-13)


def test_gram_chunks_count_the_halves_extra_gram(monkeypatch):
    """With split sides a layer holds (2 + s) R × R float64: a budget of exactly one such layer
    gives one layer a chunk, and of two, two."""
    _narrow_columns(monkeypatch)
    prep = _validate.prepare(
        _narrow_clients(4), None, equal_ranks=False, check_finite=False, allow_excess_rank=False
    )
    groups = _validate.group_by_shape(list(prep.layers.values()))
    per = 8 * (2 + 2) * 20**2  # R = 20, both sides split
    assert _stacks._split_sides(groups[0][0]) == 2
    for layers_per_chunk in (1, 2):
        monkeypatch.setattr(_stacks, "GRAM_BYTES", layers_per_chunk * per)
        chunks = _stacks.chunks(groups)
        assert all(sum(len(part.layers) for part in chunk) == layers_per_chunk for chunk in chunks)


@pytest.mark.parametrize("method", ["lora_fair", "flexlora"])
def test_gram_methods_with_split_sides_give_the_same_bits_on_two_threads(method, monkeypatch):
    """The halves are fixed by the shape, not by the workers: on two worker threads (the
    items side by side) the factors equal the one-thread factors to the bit."""
    _narrow_columns(monkeypatch)
    monkeypatch.setattr(_threads, "_free_cores", lambda: 2.0)
    monkeypatch.setattr(_threads, "_FLOPS_PER_THREAD", 1.0)
    monkeypatch.setattr(_threads, "_BYTES_PER_THREAD", 1.0)
    workers = []
    real = _threads.split_map

    def spy(fn, items, **kwargs):
        workers.append(_threads.threads_for(kwargs.get("flops", 0.0) * len(items)))
        return real(fn, items, **kwargs)

    monkeypatch.setattr(_stacks, "split_map", spy)
    one, two = _on_one_then_two_threads(getattr(agg, method), _narrow_clients(6))
    assert 2 in workers  # the Grams' items really ran on two workers
    _assert_same_bits(one, two)


@pytest.mark.parametrize("method", ["lora_fair", "flexlora"])
def test_gram_methods_in_chunks_of_one_layer_give_the_one_chunk_result(method, monkeypatch):
    """Bounded memory does not change the answer: one layer per chunk gives the factors of
    one chunk for the whole call (each layer's problem is its own)."""
    clients = _narrow_clients(6)
    fn = getattr(agg, method)
    whole = fn(clients)
    monkeypatch.setattr(_stacks, "GRAM_BYTES", 1)
    chunked = fn(clients)
    for name in whole:
        torch.testing.assert_close(chunked[name].A, whole[name].A, rtol=0, atol=0)
        torch.testing.assert_close(chunked[name].B, whole[name].B, rtol=0, atol=0)
