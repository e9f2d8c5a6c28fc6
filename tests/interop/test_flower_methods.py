"""Every registry method through ``LoRAStrategy`` and the example's real ClientApp, in process.

``examples.flower.inprocess.InProcessGrid`` runs Flower's Message API without ray: the same
``ServerApp`` strategy and ``ClientApp`` as ``flwr run``, with per-node ``context.state``.
3 clients, 2 rounds, a 16-32-4 MLP: a few seconds per method.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*click.*deprecated", category=DeprecationWarning)
    pytest.importorskip("flwr")
    pytest.importorskip("peft")
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp.strategy import (
        DifferentialPrivacyServerSideFixedClipping,
        Result,
    )

    from examples.flower.inprocess import InProcessGrid, serving
    from examples.flower.lorafair_app import client_app as example_client
    from examples.flower.lorafair_app.server_app import run_strategy
    from lorafair.flower import RANKS_KEY, RESIDUAL_KEY, LoRAStrategy, from_array_record

from lorafair import registry
from lorafair.interop.peft import from_peft_state_dict

CLIENTS, ROUNDS = 3, 2  # the example's central evaluation uses 3 partitions' test data


def simulate(method: str, app: ClientApp | None = None, **kw: Any) -> tuple[Result, InProcessGrid]:
    grid = InProcessGrid(app or example_client.app, CLIENTS)
    with serving():
        result = run_strategy(grid, method=method, rounds=ROUNDS, min_nodes=CLIENTS, **kw)
    return result, grid


def train_messages(grid: InProcessGrid, server_round: int) -> list[Message]:
    return [
        m
        for m in grid.delivered
        if m.metadata.message_type == "train"
        and m.content.config_records["config"]["server-round"] == server_round
    ]


def global_sd(msg: Message) -> dict[str, Tensor]:
    return from_array_record(msg.content.array_records["arrays"])


@pytest.mark.parametrize("method", registry.names())
def test_every_method_runs_in_simulation(method: str) -> None:
    spec = registry.get(method)
    result, grid = simulate(method)
    train = result.train_metrics_clientapp
    assert sorted(train) == list(range(1, ROUNDS + 1))  # every round aggregated
    assert all(train[r]["replies-rejected"] == 0 for r in train)
    final = from_array_record(result.arrays)
    assert all(bool(torch.isfinite(t).all()) for t in final.values())
    clients_eval = result.evaluate_metrics_clientapp[ROUNDS]
    assert math.isfinite(float(clients_eval["eval-loss"]))
    if spec.personalised:  # FedSA-LoRA: only Ā goes out; each client keeps its own B
        assert not any(".lora_B." in k for k in final)
        own = [
            from_array_record(c.state.array_records["lorafair-own-B"])
            for c in grid.contexts.values()
        ]
        key = next(iter(own[0]))
        assert not torch.equal(own[0][key], own[1][key])
        assert result.evaluate_metrics_serverapp == {}
        return
    central = result.evaluate_metrics_serverapp[ROUNDS]
    assert math.isfinite(float(central["loss"]))
    if method not in example_client.HETERO:
        # Equal ranks: each client evaluates exactly the global model the server evaluates
        # (FedEx-LoRA: the clients' folded residuals equal the server's residual_total).
        assert float(clients_eval["eval-loss"]) == pytest.approx(float(central["loss"]), abs=1e-5)
    if spec.exact:
        assert all(train[r]["bias-relative-error-max"] < 1e-4 for r in train)


def test_fedex_lora_residuals_travel_in_their_own_record() -> None:
    _, grid = simulate("fedex_lora")
    first, second = train_messages(grid, 1)[0], train_messages(grid, 2)[0]
    assert RESIDUAL_KEY not in first.content.array_records
    assert second.content.config_records["config"]["lorafair-residual-round"] == 1
    residual = from_peft_state_dict(from_array_record(second.content[RESIDUAL_KEY]))
    # Its rank: the stacked clients plus the average, Σ r_k + r (all ranks 4 here).
    assert {A.shape[0] for A, _ in residual.factors.values()} == {CLIENTS * 4 + 4}
    last = [m for m in grid.delivered if m.metadata.message_type == "evaluate"][-1]
    assert last.content.config_records["config"]["lorafair-residual-round"] == ROUNDS
    total = from_peft_state_dict(from_array_record(last.content[RESIDUAL_KEY]))
    assert {A.shape[0] for A, _ in total.factors.values()} == {ROUNDS * (CLIENTS * 4 + 4)}


def test_rolora_trained_factor_follows_the_round() -> None:
    result, grid = simulate("rolora")
    r1, r2 = train_messages(grid, 1)[0], train_messages(grid, 2)[0]
    assert r1.content.config_records["config"]["lorafair-trained"] == "B"
    assert r2.content.config_records["config"]["lorafair-trained"] == "A"
    g0, g1, g2 = global_sd(r1), global_sd(r2), from_array_record(result.arrays)
    for key in g0:
        if ".lora_A." in key:  # round 1 trains B on the shared A, round 2 trains A
            assert torch.equal(g0[key], g1[key])
            assert not torch.equal(g1[key], g2[key])
        elif ".lora_B." in key:
            assert not torch.equal(g0[key], g1[key])
            assert torch.equal(g1[key], g2[key])


def test_flora_ranks_travel_so_clients_rebuild_exactly() -> None:
    result, grid = simulate("flora")
    r1, r2 = train_messages(grid, 1)[0], train_messages(grid, 2)[0]
    start = dict(r1.content.config_records[RANKS_KEY])
    after_one = dict(r2.content.config_records[RANKS_KEY])
    assert set(start.values()) == {8}
    assert after_one == {k: CLIENTS * 8 for k in start}  # Σ r_k: each client rebuilt at 8
    final = from_peft_state_dict(from_array_record(result.arrays)).factors
    assert {A.shape[0] for A, _ in final.values()} == {CLIENTS * CLIENTS * 8}


def _nan_app() -> ClientApp:
    """The example client, except that partition 0 uploads NaN in one factor."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Any) -> Message:
        reply = example_client.train_fn(msg, context)
        if int(context.node_config["partition-id"]) == 0:
            sd = reply.content.array_records["arrays"].to_torch_state_dict()
            key = next(k for k in sd if ".lora_B." in k)
            sd[key] = torch.full_like(sd[key], float("nan"))
            content = RecordDict(
                {"arrays": ArrayRecord(sd), "metrics": reply.content.metric_records["metrics"]}
            )
            return Message(content=content, reply_to=msg)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Any) -> Message:
        return example_client.evaluate_fn(msg, context)

    return app


def test_a_nan_client_is_rejected_and_the_rounds_go_on(caplog: pytest.LogCaptureFixture) -> None:
    global CLIENTS
    saved, CLIENTS = CLIENTS, 3
    try:
        with caplog.at_level(logging.WARNING, logger="flwr"):
            result, grid = simulate(
                "fedit",
                app=_nan_app(),
            )
    finally:
        CLIENTS = saved
    train = result.train_metrics_clientapp
    assert sorted(train) == [1, 2]
    assert [train[r]["replies-rejected"] for r in (1, 2)] == [1, 1]
    final = from_array_record(result.arrays)
    assert all(bool(torch.isfinite(t).all()) for t in final.values())
    bad_node = next(n for n, c in grid.contexts.items() if c.node_config["partition-id"] == 0)
    assert f"node {bad_node}" in caplog.text
    assert "NaN" in caplog.text


@pytest.mark.parametrize("method", ["fedit", "lora_fair"])
def test_flower_fixed_clipping_dp_wrapper(method: str) -> None:
    assert registry.get(method).dp_clipping

    def dp(clip: float) -> Any:
        return lambda s: DifferentialPrivacyServerSideFixedClipping(
            s, noise_multiplier=0.0, clipping_norm=clip, num_sampled_clients=CLIENTS
        )

    plain, _ = simulate(method)
    # Clipping that never binds and no noise: the same run, up to the wrapper's float32
    # rounding of `global + (reply - global)`.
    loose, _ = simulate(method, wrap=dp(1e9))
    for key, value in from_array_record(plain.arrays).items():
        torch.testing.assert_close(
            from_array_record(loose.arrays)[key], value, rtol=1e-5, atol=1e-6
        )
    clip = 1e-3
    tight, grid = simulate(method, wrap=dp(clip))
    sent = global_sd(train_messages(grid, 2)[0])
    out = from_array_record(tight.arrays)
    assert sent.keys() == out.keys()
    assert all(sent[k].shape == out[k].shape for k in sent)  # dp_clipping: same shapes
    step = math.sqrt(sum(float((out[k].double() - sent[k].double()).pow(2).sum()) for k in sent))
    if method == "fedit":  # a weighted mean of updates clipped to `clip` moves at most `clip`
        assert 0 < step <= clip * (1 + 1e-5)
    else:
        assert math.isfinite(step)
        assert step > 0
    assert isinstance(tight.train_metrics_clientapp[2], MetricRecord)


def test_strategy_accepts_a_name_a_spec_or_a_function() -> None:
    spec = registry.get("rolora")
    for given in ("rolora", spec, spec.fn):
        strategy = LoRAStrategy(given)
        assert strategy.spec.name == "rolora"
        assert strategy.round_options(1)["trained"] == "B"
        assert strategy.round_options(2)["trained"] == "A"
    assert LoRAStrategy("rolora", options={"trained": "A"}).round_options(1)["trained"] == "A"
