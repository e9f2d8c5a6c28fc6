"""lorafair.flower.LoRAStrategy.aggregate_train on replies built as Flower's own tests build them
(``create_mock_reply`` in ``flwr/serverapp/strategy/strategy_utils_test.py``)."""

from __future__ import annotations

import math
import warnings
from typing import Any
from unittest.mock import Mock

import pytest
import torch
from torch import Tensor

with warnings.catch_warnings():
    # flwr 1.42 imports typer, which touches an API that click 8.5 deprecates.
    warnings.filterwarnings("ignore", message=r".*click.*deprecated", category=DeprecationWarning)
    flwr = pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.exception import InconsistentMessageReplies
    from flwr.serverapp.strategy import FedAvg

    from lorafair.flower import LoRAStrategy, from_array_record, to_array_record

from lorafair import aggregate

P = "base_model.model."
LAYERS = ("enc.q", "enc.v")
D_OUT, D_IN = 6, 5


def create_mock_reply(
    arrays: ArrayRecord, num_examples: float, key: str = "num-examples", **metrics: float
) -> Message:
    """As Flower's ``create_mock_reply``, with extra metrics and a configurable weight key."""
    message = Mock(spec=Message)
    message.content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({key: num_examples, **metrics})}
    )
    message.has_error.side_effect = lambda: False
    message.has_content.side_effect = lambda: True
    return message


def error_reply() -> Message:
    message = Mock(spec=Message)
    message.has_error.side_effect = lambda: True
    message.has_content.side_effect = lambda: False
    message.metadata.src_node_id = 7
    message.error.reason = "client crashed"
    return message


def client_sd(seed: int, rank: int, adapter: str | None = None) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    mid = "" if adapter is None else f".{adapter}"
    sd: dict[str, Tensor] = {}
    for layer in LAYERS:
        sd[f"{P}{layer}.lora_A{mid}.weight"] = torch.randn(rank, D_IN, generator=g)
        sd[f"{P}{layer}.lora_B{mid}.weight"] = torch.randn(D_OUT, rank, generator=g)
    sd[f"{P}head.weight"] = torch.randn(3, D_OUT, generator=g)
    return sd


def factors(sd: dict[str, Tensor], layer: str) -> tuple[Tensor, Tensor]:
    keys = [k for k in sd if k.startswith(f"{P}{layer}.lora_")]
    A = next(sd[k] for k in keys if ".lora_A" in k).double()
    B = next(sd[k] for k in keys if ".lora_B" in k).double()
    return A, B


def dense_delta(sds: list[dict[str, Tensor]], n: list[float], layer: str) -> Tensor:
    total = sum(n)
    out = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    for sd, nk in zip(sds, n, strict=True):
        A, B = factors(sd, layer)
        out += (nk / total) * (B @ A)
    return out


def cosine(X: Tensor, Y: Tensor) -> float:
    return float((X * Y).sum() / (X.norm() * Y.norm()))


def record(sd: dict[str, Tensor]) -> ArrayRecord:
    """Flower's own ArrayRecord, or lorafair's encoding where NumPy cannot hold the dtype."""
    if any(v.dtype == torch.bfloat16 for v in sd.values()):
        return to_array_record(sd)
    return ArrayRecord(sd)


def run(strategy: LoRAStrategy, sds: list[dict[str, Tensor]], n: list[float], **kw: Any) -> Any:
    replies = [create_mock_reply(record(sd), nk, **kw) for sd, nk in zip(sds, n, strict=True)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert metrics is not None
    return from_array_record(arrays), metrics


def test_fedit_matches_dense_reference_and_reports_bias() -> None:
    sds = [client_sd(s, 3) for s in range(3)]
    n = [10.0, 30.0, 60.0]
    out, metrics = run(LoRAStrategy(aggregate.fedit), sds, n, **{"train-loss": 1.0})
    p = [w / sum(n) for w in n]
    assert list(out) == list(sds[0])
    for layer in LAYERS:
        A_bar = sum(pk * factors(sd, layer)[0] for pk, sd in zip(p, sds, strict=True))
        B_bar = sum(pk * factors(sd, layer)[1] for pk, sd in zip(p, sds, strict=True))
        A, B = factors(out, layer)
        torch.testing.assert_close(A, A_bar, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(B, B_bar, rtol=1e-6, atol=1e-6)
        ref = cosine(B_bar @ A_bar, dense_delta(sds, n, layer))
        assert metrics[f"bias-cosine/{P}{layer}"] == pytest.approx(ref, abs=1e-6)
        assert ref < 0.99  # random clients: FedIT is visibly biased
    head = sum(pk * sd[f"{P}head.weight"].double() for pk, sd in zip(p, sds, strict=True))
    torch.testing.assert_close(out[f"{P}head.weight"].double(), head, rtol=1e-6, atol=1e-6)
    cosines = [metrics[f"bias-cosine/{P}{layer}"] for layer in LAYERS]
    assert metrics["bias-cosine-min"] == min(cosines)
    assert metrics["bias-cosine-mean"] == pytest.approx(sum(cosines) / 2)
    assert metrics["train-loss"] == pytest.approx(1.0)
    assert "num-examples" not in metrics


def test_flora_with_heterogeneous_ranks_where_fedavg_cannot() -> None:
    ranks = [2, 3, 5]
    sds = [client_sd(s, r) for s, r in enumerate(ranks)]
    n = [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"broadcast|shape"):  # Flower's own FedAvg
        FedAvg().aggregate_train(
            1, [create_mock_reply(ArrayRecord(sd), k) for sd, k in zip(sds, n, strict=True)]
        )
    out, metrics = run(LoRAStrategy(aggregate.flora), sds, n)
    for layer in LAYERS:
        A, B = factors(out, layer)
        assert A.shape == (sum(ranks), D_IN)
        torch.testing.assert_close(B @ A, dense_delta(sds, n, layer), rtol=1e-5, atol=1e-5)
        assert metrics[f"bias-cosine/{P}{layer}"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["bias-relative-error-max"] < 1e-6


def test_flexlora_options_reach_the_aggregator() -> None:
    sds = [client_sd(s, r) for s, r in enumerate([2, 4])]
    n = [3.0, 1.0]
    out, metrics = run(LoRAStrategy(aggregate.flexlora, options={"rank": 3}), sds, n)
    for layer in LAYERS:
        A, B = factors(out, layer)
        assert A.shape == (3, D_IN)
        U, S, Vh = torch.linalg.svd(dense_delta(sds, n, layer))
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(B @ A, best, rtol=1e-5, atol=1e-5)
        ref = cosine(best, dense_delta(sds, n, layer))
        assert metrics[f"bias-cosine/{P}{layer}"] == pytest.approx(ref, abs=1e-6)


def test_ffa_lora_and_module_format_keys() -> None:
    sds = [client_sd(s, 2, adapter="default") for s in range(2)]
    for sd in sds[1:]:
        for layer in LAYERS:
            sd[f"{P}{layer}.lora_A.default.weight"] = sds[0][f"{P}{layer}.lora_A.default.weight"]
    n = [1.0, 1.0]
    out, metrics = run(LoRAStrategy(aggregate.ffa_lora), sds, n)
    assert list(out) == list(sds[0])
    for layer in LAYERS:
        A, B = factors(out, layer)
        torch.testing.assert_close(B @ A, dense_delta(sds, n, layer), rtol=1e-5, atol=1e-5)
        assert metrics[f"bias-cosine/{P}{layer}"] == pytest.approx(1.0, abs=1e-6)


def test_custom_weight_key_error_replies_and_no_bias_report() -> None:
    sds = [client_sd(s, 2) for s in range(2)]
    strategy = LoRAStrategy(aggregate.fedit, weighted_by_key="n", report_bias=False)
    replies = [
        create_mock_reply(ArrayRecord(sd), k, key="n")
        for sd, k in zip(sds, [1.0, 3.0], strict=True)
    ]
    arrays, metrics = strategy.aggregate_train(2, [*replies, error_reply()])
    assert arrays is not None
    assert metrics is not None
    assert not any(k.startswith("bias-") for k in metrics)
    A, _ = factors(arrays.to_torch_state_dict(), LAYERS[0])
    expected = 0.25 * factors(sds[0], LAYERS[0])[0] + 0.75 * factors(sds[1], LAYERS[0])[0]
    torch.testing.assert_close(A, expected, rtol=1e-6, atol=1e-6)
    assert strategy.aggregate_train(3, [error_reply()]) == (None, None)
    assert strategy.aggregate_train(3, []) == (None, None)


def test_inconsistent_replies_raise_with_on_invalid_reply_raise() -> None:
    a, b = client_sd(0, 2), client_sd(1, 2)
    del b[f"{P}head.weight"]
    strategy = LoRAStrategy(aggregate.fedit, on_invalid_reply="raise")
    with pytest.raises(InconsistentMessageReplies):
        strategy.aggregate_train(
            1, [create_mock_reply(ArrayRecord(a), 1.0), create_mock_reply(ArrayRecord(b), 1.0)]
        )
    with pytest.raises(InconsistentMessageReplies):
        strategy.aggregate_train(1, [create_mock_reply(ArrayRecord(a), 1.0, key="w")])
    with pytest.raises(TypeError):
        LoRAStrategy(3)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="fedit"):
        LoRAStrategy("fedavg")


def test_lora_fair_reports_solver_metrics() -> None:
    fn = getattr(aggregate, "lora_fair", None)
    if fn is None:
        pytest.skip("lorafair.aggregate.lora_fair is not available in this build")
    sds = [client_sd(s, 3) for s in range(3)]
    n = [1.0, 2.0, 3.0]
    _, fedit_metrics = run(LoRAStrategy(aggregate.fedit), sds, n)
    out, metrics = run(LoRAStrategy(fn, options={"lam": 0.01}), sds, n)
    assert metrics["solver-iterations-max"] >= 0
    assert 0.0 <= metrics["solver-converged"] <= 1.0
    for layer in LAYERS:
        A, B = factors(out, layer)
        ref = cosine(B @ A, dense_delta(sds, n, layer))
        assert metrics[f"bias-cosine/{P}{layer}"] == pytest.approx(ref, abs=1e-6)
        assert ref >= fedit_metrics[f"bias-cosine/{P}{layer}"] - 1e-9
    assert math.isfinite(metrics["bias-relative-error-max"])


def _count_solves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap the solver's one entry to the residual problem so each solve appends to the list."""
    from lorafair._fair import _api

    calls: list[int] = []
    inner = _api._run

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(_api, "_run", counted)
    return calls


@pytest.mark.parametrize(
    ("dtype", "ranks", "options"),
    [
        (torch.float32, [3, 3, 3], {"lam": 0.01}),
        (torch.float64, [2, 3, 4], {"lam": 0.05}),
        (torch.float32, [3, 3, 3], {"lam": 0.01, "residual_on": "A"}),
        (torch.bfloat16, [3, 3, 3], {"lam": 0.01}),
    ],
)
def test_lora_fair_solves_once_and_matches_lora_fair(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, ranks: list[int], options: dict[str, Any]
) -> None:
    sds = [{k: v.to(dtype) for k, v in client_sd(s, r).items()} for s, r in enumerate(ranks)]
    n = [1.0, 2.0, 3.0]
    solves = _count_solves(monkeypatch)
    # "arrival": the replies in the order given, as `expected` below takes them.
    strategy = LoRAStrategy(aggregate.lora_fair, options=options, reply_order="arrival")
    out, metrics = run(strategy, sds, n)
    assert len(solves) == 1  # one residual solve per round, metrics included
    monkeypatch.undo()
    clients = [
        {layer: factors(sd, layer) for layer in LAYERS} for sd in sds
    ]  # float64 copies of the uploaded factors
    low = [{k: (A.to(dtype), B.to(dtype)) for k, (A, B) in c.items()} for c in clients]
    expected = aggregate.lora_fair(low, n, **options)
    solved = aggregate.solve_residual(low, n, **options)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    p = [w / sum(n) for w in n]
    r_max = max(ranks)
    for layer in LAYERS:
        A, B = factors(out, layer)
        assert out[f"{P}{layer}.lora_B.weight"].dtype == dtype
        # FedIT's mean of the zero-padded clients, plus the residual, formed independently here.
        A_bar = sum(
            pk * torch.nn.functional.pad(factors(sd, layer)[0], (0, 0, 0, r_max - r))
            for pk, sd, r in zip(p, sds, ranks, strict=True)
        )
        B_bar = sum(
            pk * torch.nn.functional.pad(factors(sd, layer)[1], (0, r_max - r))
            for pk, sd, r in zip(p, sds, ranks, strict=True)
        )
        delta = solved[layer].delta.double()
        if options.get("residual_on") == "A":
            A_bar = A_bar + delta
        else:
            B_bar = B_bar + delta
        torch.testing.assert_close(A, A_bar, rtol=tol, atol=tol)
        torch.testing.assert_close(B, B_bar, rtol=tol, atol=tol)
        # The same factors as lora_fair itself, bit for bit (its output-rounding guard included).
        assert torch.equal(out[f"{P}{layer}.lora_A.weight"], expected[layer].A)
        assert torch.equal(out[f"{P}{layer}.lora_B.weight"], expected[layer].B)
        ref = cosine(B @ A, dense_delta(sds, n, layer))
        assert metrics[f"bias-cosine/{P}{layer}"] == pytest.approx(ref, abs=1e-6)
    iterations = [s.iterations for s in solved.values()]
    assert metrics["solver-iterations-max"] == max(iterations)
    assert metrics["solver-converged"] == sum(s.converged for s in solved.values()) / 2
