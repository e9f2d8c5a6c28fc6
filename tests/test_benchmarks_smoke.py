"""Smoke tests of ``benchmarks/``: its references and checks against plain dense float64 math,
against the library on tiny shapes, and the CLI end to end (including a wrong aggregator that
must make it fail)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import cli, entries
from benchmarks import references as ref
from lorafair.aggregate import fedit, flexlora, lora_fair
from lorafair.bench import make_clients, preset, ratio_lines, ratios
from lorafair.types import LoRAFactors

_NORMS: tuple[ref.Norm, ...] = ("fro", "fro_squared")


def _tiny(K: int = 3, r: int = 3, seed: int = 0) -> list[dict[str, LoRAFactors]]:
    return make_clients(preset("tiny").layers, K, r, dtype=torch.float64, seed=seed)


def _dense_delta(clients: list[dict[str, LoRAFactors]], name: str) -> torch.Tensor:
    p = 1.0 / len(clients)
    out = torch.zeros(clients[0][name].B.shape[0], clients[0][name].A.shape[1], dtype=torch.float64)
    for c in clients:
        out += p * c[name].B.double() @ c[name].A.double()
    return out


def test_factored_helpers_match_dense_float64() -> None:
    clients = _tiny()
    p = [1 / 3] * 3
    for name in clients[0]:
        dW = _dense_delta(clients, name)
        A_s, B_s = ref.stack64(clients, name, p)
        A_bar, B_bar = ref.weighted_mean64(clients, name, p)
        Y = B_bar @ A_bar
        torch.testing.assert_close(B_s @ A_s, dW)
        assert ref.fro_norm(B_s, A_s) == pytest.approx(float(dW.norm()), rel=1e-12)
        assert ref.diff_norm(B_bar, A_bar, B_s, A_s) == pytest.approx(
            float((Y - dW).norm()), rel=1e-10
        )
        cos = float((dW * Y).sum() / (dW.norm() * Y.norm()))
        assert ref.flat_cosine(B_s, A_s, B_bar, A_bar) == pytest.approx(cos, rel=1e-12)
        torch.testing.assert_close(
            ref.singular_values(B_s, A_s), torch.linalg.svdvals(dW)[: A_s.shape[0]]
        )
        B_new = B_bar + 0.01 * torch.randn_like(B_bar)
        Yn = B_new @ A_bar
        flat = 1 - float((dW * Yn).sum() / (dW.norm() * Yn.norm()))
        cols = 1 - float(torch.nn.functional.cosine_similarity(dW, Yn, dim=0).mean())
        dB = float((B_new - B_bar).norm())
        for norm, reg in zip(_NORMS, (dB, dB * dB), strict=True):
            got = ref.fair_objective(A_s, B_s, A_bar, B_bar, B_new, lam=0.1, norm=norm)
            assert got == pytest.approx(flat + 0.1 * reg, rel=1e-10)
            got = ref.fair_objective(
                A_s,
                B_s,
                A_bar,
                B_bar,
                B_new,
                lam=0.1,
                norm=norm,
                similarity="columns",
            )
            assert got == pytest.approx(cols + 0.1 * reg, rel=1e-10)


def test_dense_svd_reference_matches_library_flexlora() -> None:
    clients = _tiny(K=4, r=3)
    dense = ref.dense_svd_flexlora(clients, rank=3)
    ours = flexlora(clients, rank=3)
    for name in clients[0]:
        dW = _dense_delta(clients, name)
        U, S, Vh = torch.linalg.svd(dW)
        torch.testing.assert_close(dense[name].B @ dense[name].A, (U[:, :3] * S[:3]) @ Vh[:3])
        torch.testing.assert_close(ours[name].B @ ours[name].A, dense[name].B @ dense[name].A)


def test_dense_sgd_reference_descends_and_library_is_not_worse() -> None:
    clients = _tiny(K=3, r=2)
    p = [1 / 3] * 3
    for norm in _NORMS:
        out, info = ref.dense_sgd_lora_fair(clients, norm=norm, max_steps=300)
        fair = lora_fair(clients, norm=norm)
        base = fedit(clients)
        for name in clients[0]:
            assert info[name].steps >= 1
            A_s, B_s = ref.stack64(clients, name, p)
            A_bar, B_bar = ref.weighted_mean64(clients, name, p)
            torch.testing.assert_close(out[name].A, base[name].A)
            o_sgd, o_fair, o_fedit = (
                ref.fair_objective(A_s, B_s, A_bar, B_bar, B, lam=0.01, norm=norm)
                for B in (out[name].B, fair[name].B, B_bar)
            )
            assert o_sgd < o_fedit  # SGD made progress
            assert o_fair <= o_sgd + 1e-9


def test_time_budget_stops_the_sgd_reference() -> None:
    clients = _tiny(K=2, r=2)
    _, info = ref.dense_sgd_lora_fair(
        clients, max_steps=10**6, min_delta=-1.0, time_budget_s=0.05, layers=["a.fc"]
    )
    assert info["a.fc"].stop == "time_budget"
    assert list(info) == ["a.fc"]


_CLI = ["--shapes", "tiny", "--clients", "3", "--repeats", "1", "--no-progress"]
_CLI += ["--sgd-max-steps", "50"]


def test_cli_end_to_end_writes_results(tmp_path: pytest.TempPathFactory) -> None:
    code = cli.main([*_CLI, "--ranks", "2", "3", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())  # type: ignore[operator]
    rows = data["rows"]
    assert {w["aggregator"] for w in rows} == set(cli.AGGREGATORS)
    assert all(w["check"] == "ok" for w in rows)
    assert all(math.isfinite(w["time_s"]) and w["time_s"] > 0 for w in rows)
    exact = [w for w in rows if w["aggregator"] in ("flora", "ffa_lora")]
    assert all(w["cos_min"] == pytest.approx(1.0, abs=1e-9) for w in exact)
    assert "| fedit |" in (tmp_path / "results.md").read_text()  # type: ignore[operator]
    assert any(r.get("dense_svd / flexlora") for r in data["ratios"])
    assert list(tmp_path.glob("time_vs_rank_*.png"))  # type: ignore[attr-defined]


def test_cli_fails_loudly_on_a_wrong_result(monkeypatch: pytest.MonkeyPatch) -> None:
    # FedIT's biased product passed off as FlexLoRA must be caught before any timing counts.
    flex = entries.get("flexlora")
    wrong = flex._replace(run=lambda inputs, options, layers: (fedit(inputs.free), {}))
    monkeypatch.setitem(entries._TABLE, "flexlora", wrong)
    code = cli.main([*_CLI, "--ranks", "2", "--aggregators", "flexlora", "dense_svd"])
    assert code == 1


def test_memory_child_reports_the_dense_temporary() -> None:
    import os

    from lorafair.bench import MemorySpec, measure

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    spec = MemorySpec(
        layers=[(s.name, s.d_out, s.d_in) for s in preset("vit_b16").layers[:1]],
        K=2,
        r=2,
        dtype="float32",
        device="cpu",
        seed=0,
        aggregator="fedit",
        provider="benchmarks.entries",
        options={},
        ref_layers=None,
        threads=1,
    )
    small = measure(spec, pythonpath=root)
    big_spec = spec.copy()
    big_spec.update(aggregator="dense_svd", ref_layers=["blocks.0.attn.qkv"])
    big = measure(big_spec, pythonpath=root)
    dense_bytes = 2304 * 768 * 4  # one float32 ΔW of attn.qkv
    assert small["peak_extra_bytes"] < dense_bytes / 4
    assert big["peak_extra_bytes"] >= dense_bytes


def test_every_library_row_carries_both_floor_ratios(tmp_path: pytest.TempPathFactory) -> None:
    names = [n for n in cli.AGGREGATORS if not entries.get(n).dense]
    code = cli.main([*_CLI, "--ranks", "2", "--aggregators", *names, "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())  # type: ignore[operator]
    for w in data["rows"]:
        assert w["floor_memory_s"] > 0
        assert w["floor_compute_s"] > 0
        assert w["x_memory"] == pytest.approx(w["time_s"] / w["floor_memory_s"])
        assert w["x_compute"] == pytest.approx(w["time_s"] / w["floor_compute_s"])
        # the memory floor counts the input once and the output once
        assert w["detail"]["in_bytes"] > 0
        assert w["detail"]["out_bytes"] > 0
    fl = data["ratios"][0]["floors"]
    assert {"read", "write", "gemm", "gram"} <= set(fl["probe_times_s"])


def test_smoke_run_prints_no_ratio() -> None:
    assert ratios([], quick=True) == []
    assert "none printed" in ratio_lines([{"shape_set": "x"}], quick=True)


def test_registry_drives_the_benchmarks() -> None:
    from lorafair import registry

    for spec in registry.specs():
        e = entries.get(spec.name)
        assert (e.exact, e.optimal, e.shared_A, e.floor) == (
            spec.exact,
            spec.optimal,
            spec.shared_A,
            spec.floor,
        )
    assert all(
        entries.get(n).reproduces in entries.names()
        for n in entries.names()
        if entries.get(n).dense
    )


def test_device_script_skips_its_cuda_parts_cleanly_without_a_gpu(tmp_path) -> None:
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: benchmarks/device.sh would run for minutes")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path)}
    proc = subprocess.run(
        ["bash", os.path.join(root, "benchmarks", "device.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout
    assert "skipping" in (tmp_path / "device.log").read_text()
