"""Conformance: a result that does not fit the output dtype raises, never returns Inf.

The rule, the same for every method (applied to every public aggregator's result in one place,
``lorafair._fit.fits_dtype``): for finite input an aggregator returns finite factors in the
input dtype, or raises :class:`lorafair.DtypeOverflowError` naming the layer, the factor, the
value (computed in float64) and the dtype, and suggesting float32. Where a method's contract
leaves the scale of its factors free it already returns the representation that fits best, the
balanced split ``(U S^½, S^½ Vᵀ)`` (``flexlora``'s default, ``fedex_lora(residual_rank=q)``);
where the contract fixes it (``fedsvd``: ``A' = Vᵀ`` orthonormal, so ``B' = UΣ``;
``flexlora(split="left")``) a factor beyond the dtype's range raises. Methods whose outputs are
averages or weighted copies of the inputs always fit. float64 factors near float64's limits
are solved on power-of-two-scaled copies (exact) wherever the method is homogeneous.

The references below are dense float64 computations written here, independent of the library.
``benchmarks/fuzz.py`` (and ``tests/test_fuzz.py``) check the rule over every registered method.
"""

from __future__ import annotations

import pytest
import torch

import lorafair
from lorafair import DtypeOverflowError, LoRAFactors, LoRAFairError
from lorafair.aggregate import fedex_lora, fedsvd, flexlora, hetlora, lora_fair

F16_MAX = float(torch.finfo(torch.float16).max)  # 65504


def _fedsvd_f16_clients() -> list[dict[str, LoRAFactors]]:
    """Three float16 clients sharing ``A`` (entries up to 250) whose ``B̄ A`` has spectral norm
    about 79,333 (> 65,504) while every entry fits (largest about 19,833): its top left
    singular vector is nearly ``e_0``, so ``B' = UΣ`` holds about 79,333 in row 0."""
    A = torch.zeros(2, 16, dtype=torch.float16)
    A[0] = 250.0
    A[1, ::2], A[1, 1::2] = 125.0, -125.0
    clients = []
    for b in (60.0, 80.0, 98.0):
        B = torch.zeros(8, 2, dtype=torch.float16)
        B[0, 0] = b
        B[1:, 1] = 0.5
        clients.append({"l0": LoRAFactors(A.clone(), B)})
    return clients


def _delta_w(clients: list[dict[str, LoRAFactors]], name: str = "l0") -> torch.Tensor:
    return sum(c[name].B.double() @ c[name].A.double() for c in clients) / len(clients)


def test_the_float16_fedsvd_case_has_the_reported_properties() -> None:
    clients = _fedsvd_f16_clients()
    A = clients[0]["l0"].A
    assert float(A.abs().max()) <= 250.0
    W = _delta_w(clients)
    assert float(torch.linalg.matrix_norm(W, ord=2)) > F16_MAX  # 79,333
    assert float(W.abs().max()) < F16_MAX  # every entry of B̄A fits (19,833)
    U, S, _ = torch.linalg.svd(W)
    assert float((U[:, :2] * S[:2]).abs().max()) > F16_MAX  # UΣ does not


def test_fedsvd_float16_overflow_raises_naming_layer_value_dtype() -> None:
    clients = _fedsvd_f16_clients()
    with pytest.raises(DtypeOverflowError) as info:
        fedsvd(clients)
    err = info.value
    assert isinstance(err, LoRAFairError)
    U, S, _ = torch.linalg.svd(_delta_w(clients))
    expected = float((U[:, :2] * S[:2]).abs().max())
    assert err.layer == "l0"
    assert err.dtype == torch.float16
    assert err.value == pytest.approx(expected, rel=1e-6)
    message = str(err)
    assert "'l0'" in message
    assert "float16" in message
    assert "float32" in message
    assert f"{expected:.6g}" in message


def test_fedsvd_in_float32_as_the_error_suggests_is_finite_and_exact() -> None:
    clients = [
        {n: LoRAFactors(A.float(), B.float()) for n, (A, B) in c.items()}
        for c in _fedsvd_f16_clients()
    ]
    A_new, B_new = fedsvd(clients)["l0"]
    assert A_new.dtype == B_new.dtype == torch.float32
    assert bool(torch.isfinite(B_new).all())
    W = _delta_w(clients)
    torch.testing.assert_close(B_new.double() @ A_new.double(), W, rtol=1e-5, atol=1e-5 * 8e4)


def test_flexlora_left_split_raises_where_the_balanced_split_fits() -> None:
    clients = [{n: LoRAFactors(A, B) for n, (A, B) in c.items()} for c in _fedsvd_f16_clients()]
    with pytest.raises(DtypeOverflowError, match="'l0'"):
        flexlora(clients, split="left")
    A, B = flexlora(clients)["l0"]  # balanced: √σ ≈ 282 per side
    assert A.dtype == B.dtype == torch.float16
    assert bool(torch.isfinite(A).all())
    assert bool(torch.isfinite(B).all())
    W = _delta_w(clients)
    err = torch.linalg.matrix_norm(B.double() @ A.double() - W) / torch.linalg.matrix_norm(W)
    assert float(err) < 1e-2


def test_fedex_lora_residual_fits_exact_and_truncated() -> None:
    clients = [{n: LoRAFactors(A, B) for n, (A, B) in c.items()} for c in _fedsvd_f16_clients()]
    for q in (None, 2):
        result = fedex_lora(clients, residual_rank=q)
        for part in (result.adapters, result.residual):
            for A, B in part.values():
                assert bool(torch.isfinite(A).all())
                assert bool(torch.isfinite(B).all())


def _float64_clients(seed: int, a_exp: int, b_exp: int) -> list[dict[str, LoRAFactors]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        A = torch.randn(3, 7, generator=gen, dtype=torch.float64)
        B = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        out.append(
            {
                "l0": LoRAFactors(
                    torch.ldexp(A, torch.tensor(a_exp)), torch.ldexp(B, torch.tensor(b_exp))
                )
            }
        )
    return out


@pytest.mark.parametrize(("a_exp", "b_exp"), [(600, 600), (900, -900), (-600, -500), (1000, 0)])
def test_float64_near_its_limits_flexlora_is_the_scaled_result(a_exp: int, b_exp: int) -> None:
    """Balanced factors of a ΔW beyond float64's range still fit: √(2^(a+b)) on each side."""
    small = flexlora(_float64_clients(0, 0, 0))["l0"]
    A, B = flexlora(_float64_clients(0, a_exp, b_exp))["l0"]
    half = torch.tensor((a_exp + b_exp) / 2, dtype=torch.float64)
    torch.testing.assert_close(A, small.A * torch.exp2(half))
    torch.testing.assert_close(B, small.B * torch.exp2(half))


@pytest.mark.parametrize(("a_exp", "b_exp"), [(600, 600), (900, -900), (-600, -500)])
def test_float64_near_its_limits_hetlora_weights_are_scale_free(a_exp: int, b_exp: int) -> None:
    small = hetlora(_float64_clients(1, 0, 0))["l0"]
    A, B = hetlora(_float64_clients(1, a_exp, b_exp))["l0"]
    torch.testing.assert_close(A, torch.ldexp(small.A, torch.tensor(a_exp)))
    torch.testing.assert_close(B, torch.ldexp(small.B, torch.tensor(b_exp)))


@pytest.mark.parametrize("a_exp", [600, -700, 1000])
def test_float64_near_its_limits_lora_fair_is_homogeneous_in_A(a_exp: int) -> None:
    """With the residual on B, scaling every A_k by 2^a scales Ā and leaves B̄ + ΔB*."""
    small = lora_fair(_float64_clients(2, 0, 0))["l0"]
    A, B = lora_fair(_float64_clients(2, a_exp, 0))["l0"]
    torch.testing.assert_close(A, torch.ldexp(small.A, torch.tensor(a_exp)))
    torch.testing.assert_close(B, small.B)


def test_float64_lora_fair_with_huge_B_is_finite() -> None:
    """B_k near 2^1000: λ‖ΔB‖ dominates, ΔB* → 0 and the answer is FedIT's (Ā, B̄)."""
    clients = _float64_clients(3, 0, 1000)
    A, B = lora_fair(clients)["l0"]
    A_bar = sum(c["l0"].A for c in clients) / 3
    B_bar = sum(c["l0"].B / 4 for c in clients) * (4 / 3)  # no overflow on the way
    torch.testing.assert_close(A, A_bar)
    torch.testing.assert_close(B, B_bar)


def test_fedsvd_float64_beyond_its_range_raises() -> None:
    """B' = UΣ with σ ≈ 2^1200: no float64 holds it; the contract fixes A' orthonormal."""
    with pytest.raises(DtypeOverflowError, match="float64"):
        fedsvd(
            [
                {"l0": LoRAFactors(c["l0"].A.clone(), c["l0"].B)}
                for c in _shared_a(_float64_clients(4, 600, 600))
            ]
        )
    A, B = fedsvd(_shared_a(_float64_clients(4, 600, -600)))["l0"]  # σ ~ 1: fits
    assert bool(torch.isfinite(A).all())
    assert bool(torch.isfinite(B).all())


def _shared_a(clients: list[dict[str, LoRAFactors]]) -> list[dict[str, LoRAFactors]]:
    A = clients[0]["l0"].A
    return [{"l0": LoRAFactors(A.clone(), c["l0"].B)} for c in clients]


def test_the_error_is_exported() -> None:
    assert "DtypeOverflowError" in lorafair.__all__
    assert issubclass(lorafair.DtypeOverflowError, lorafair.LoRAFairError)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [[0.1, 5.0, 0.7], [1e-6, 1.0, 9.0], None])
def test_averages_at_the_dtype_limit_stay_finite(
    dtype: torch.dtype, weights: list[float] | None
) -> None:
    """Every entry at the largest finite value: the exact average is that value, which fits;
    a weighted sum may round past it (it did: ``fedit`` raised in float64) but is clamped."""
    top = torch.finfo(dtype).max
    clients = [
        {
            "l0": LoRAFactors(
                torch.full((2, 3), top, dtype=dtype), torch.full((4, 2), -top, dtype=dtype)
            )
        }
        for _ in range(3)
    ]
    for fn in (lorafair.fedit, lorafair.ffa_lora, lorafair.hetlora):
        A, B = fn(clients, weights)["l0"]
        torch.testing.assert_close(A, torch.full_like(A, top))
        torch.testing.assert_close(B, torch.full_like(B, -top))
    result = lorafair.fedex_lora(clients, weights)
    for A, B in (*result.adapters.values(), *result.residual.values()):
        assert bool(torch.isfinite(A).all())
        assert bool(torch.isfinite(B).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [[0.1, 5.0, 0.7], [1e-6, 1.0, 9.0], [0.0, 0.0, 1.0], None])
def test_flora_s_stacks_always_fit(dtype: torch.dtype, weights: list[float] | None) -> None:
    """FLoRA declares its outputs need no check (``fits_dtype(copies=True)``): every entry is an
    input entry times a normalised weight. At the dtype's largest values every stacked entry is
    finite and within the dtype's rounding of that product (float64 reference)."""
    top = torch.finfo(dtype).max
    hi, lo = torch.tensor(top, dtype=dtype), torch.tensor(-top, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    clients = []
    for _ in range(3):
        A = torch.where(torch.rand(2, 5, generator=g) < 0.5, hi, lo)
        B = torch.where(torch.rand(4, 2, generator=g) < 0.5, hi, lo)
        clients.append({"l0": LoRAFactors(A, B)})
    w = torch.tensor(weights if weights is not None else [1.0] * 3, dtype=torch.float64)
    p = w / w.sum()
    A, B = lorafair.flora(clients, weights)["l0"]
    assert A.dtype == B.dtype == dtype
    assert bool(torch.isfinite(A).all())
    assert bool(torch.isfinite(B).all())
    eps = float(torch.finfo(dtype).eps)
    for k, c in enumerate(clients):
        want = c["l0"].A.double() * p[k]
        torch.testing.assert_close(A[2 * k : 2 * k + 2].double(), want, rtol=eps, atol=0.0)
        assert torch.equal(B[:, 2 * k : 2 * k + 2], c["l0"].B)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_result_checks_flag_reads_every_nan_and_inf(dtype: torch.dtype, bad: float) -> None:
    """The flag the result check reads (one per output tensor) is not finite when one entry
    is NaN or ±Inf, wherever it sits, and finite for finite entries at the dtype's largest
    value, whose float16 sum would overflow (no false alarm, so no scan)."""
    from lorafair._fit import flag_sum

    top = torch.finfo(dtype).max
    full = torch.full((37, 29), top, dtype=dtype)
    full[::2] = -top
    if dtype == torch.float16:
        assert bool(torch.isfinite(flag_sum(full)))
    g = torch.Generator().manual_seed(0)
    t = torch.randn(37, 29, generator=g).to(dtype)
    assert bool(torch.isfinite(flag_sum(t)))
    for i, j in ((0, 0), (36, 28), (17, 3)):
        u = t.clone()
        u[i, j] = bad
        assert not bool(torch.isfinite(flag_sum(u)))
