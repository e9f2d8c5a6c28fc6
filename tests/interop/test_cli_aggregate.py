"""``lorafair aggregate`` end to end, on real peft: every registered method, every case, every
bad input.

Clients are saved by ``get_peft_model(...).save_pretrained`` on a tiny Llama; the result is
loaded by ``PeftModel.from_pretrained`` and merged; the merged weights are compared with a dense
float64 reference of the method's update (tests/reference*.py, tests/test_lora_fair.py), built
from the factors and scalings that peft's own layers hold. The reference sees what the command
promises the method sees: the stored factors when every client has the same scaling on every
layer, the applied ``(A_k, s_k B_k)`` otherwise; the loaded model must then apply the method's
update times that common scaling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from lorafair import registry
from lorafair.cli import main
from tests import reference as ref
from tests import reference_methods as refm
from tests.interop.peft_llama import (
    IGNORE_TRANSFORMERS_DEPRECATION,
    Client,
    lora_layers,
    merged_deltas,
    save_client,
    tiny_base,
)
from tests.test_lora_fair import dense_objective, dense_parts, dense_reference

pytestmark = pytest.mark.filterwarnings(IGNORE_TRANSFORMERS_DEPRECATION)

F64 = torch.float64
Factors = dict[str, tuple[Tensor, Tensor]]

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base() -> Any:
    return tiny_base()


@pytest.fixture(scope="module")
def base16() -> Any:
    return tiny_base(torch.bfloat16)


def _shared_A(base: Any, seed: int, config: dict[str, Any]) -> dict[str, Tensor]:
    """One A per layer for clients that train with A frozen (FFA-LoRA, RoLoRA, FedSVD)."""
    import copy

    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj", "v_proj"], **config)
    )
    return {n: m.lora_A["default"].weight.detach().clone() for n, m in lora_layers(model).items()}


def _clients(
    base: Any, root: Path, configs: list[dict[str, Any]], *, shared: bool = False
) -> list[Client]:
    A = _shared_A(base, 99, configs[0]) if shared else None
    return [
        save_client(base, root / f"c{k}", seed=10 + k, shared_A=A, **cfg)
        for k, cfg in enumerate(configs)
    ]


def cli(*args: str | os.PathLike[str]) -> int:
    return main([os.fspath(a) for a in args])


# --------------------------------------------------------------------------- references


def seen(clients: list[Client]) -> tuple[list[Factors], dict[str, float]]:
    """What the method sees, and the scaling the loaded model applies on top of its result."""
    layers = list(clients[0].factors)
    if all(c.scalings == clients[0].scalings for c in clients):
        return [c.factors for c in clients], dict(clients[0].scalings)
    return [c.applied() for c in clients], dict.fromkeys(layers, 1.0)


def _product(pair: tuple[Tensor, Tensor]) -> Tensor:
    return pair[1] @ pair[0]


REFERENCES: dict[str, Callable[[list[Factors], str, list[float] | None], Tensor]] = {
    "fedit": lambda c, n, w: _product(ref.fedit(c, n, w)),
    "ffa_lora": lambda c, n, w: _product(refm.frozen_average(c, n, w, frozen="A")),
    "flora": ref.delta_w,
    "flexlora": lambda c, n, w: ref.best_rank_approx(
        ref.delta_w(c, n, w), max(x[n][0].shape[0] for x in c)
    ),
    "flexlora_energy": lambda c, n, w: ref.best_rank_approx(
        ref.delta_w(c, n, w), refm.energy_rank(ref.delta_w(c, n, w), 0.99)
    ),
    "fedex_lora": ref.delta_w,  # adapter + residual folded into W0
    "rolora": lambda c, n, w: _product(refm.frozen_average(c, n, w, frozen="A")),
    "hetlora": lambda c, n, w: _product(refm.hetlora(c, n, w)),
    "fedsvd": refm.fedsvd_product,
}
# lora_fair and fedsa_lora are checked by their own rules below.
assert set(REFERENCES) | {"lora_fair", "fedsa_lora"} == set(registry.names())

SHARED_A = {s.name for s in registry.specs() if s.shared_A}


def assert_rel(got: Tensor, want: Tensor, rel: float) -> None:
    err = float((got - want).norm())
    scale = float(want.norm())
    assert err <= rel * scale, f"relative error {err / scale:.3g} > {rel}"


def fold_residual(base: Any, folder: Path) -> Any:
    """The docs' recipe: W += residual_B @ residual_A for each module in the residual file."""
    import copy

    from safetensors.torch import load_file

    res = load_file(folder / "fedex_residual.safetensors")
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in model.named_modules():
            if f"{name}.residual_A" in res:
                A = res[f"{name}.residual_A"].double()
                B = res[f"{name}.residual_B"].double()
                module.weight += (B @ A).to(module.weight.dtype)
    return model


def check_method(
    method: str,
    base: Any,
    clients: list[Client],
    out: Path,
    *,
    weights: list[float] | None = None,
    rel: float = 1e-5,
) -> None:
    """Run the command, load the result with peft, merge, compare with the dense reference."""
    args: list[Any] = ["aggregate", "--method", method, "--out", out]
    if weights is not None:
        args += ["--weights", ",".join(map(str, weights))]
    assert cli(*args, *(c.path for c in clients)) == 0
    factors, scale = seen(clients)
    layers = list(factors[0])
    if method == "fedsa_lora":
        A_bar = {n: ref.fedit(factors, n, weights)[0] for n in layers}
        for k in range(len(clients)):
            deltas = merged_deltas(base, out / f"client_{k}")
            for n in layers:  # client k keeps its B_k and loads the shared Ā
                assert_rel(deltas[n], scale[n] * factors[k][n][1] @ A_bar[n], rel)
        return
    if method == "fedex_lora":
        deltas = merged_deltas(fold_residual(base, out), out)
        before = {k: v.double() for k, v in base.state_dict().items()}
        after = fold_residual(base, out).state_dict()
        for n in layers:
            key = n.removeprefix("base_model.model.") + ".weight"
            deltas[n] = deltas[n] + (after[key].double() - before[key])
    else:
        deltas = merged_deltas(base, out)
    assert set(deltas) == set(layers)
    for n in layers:
        if method == "lora_fair":
            check_lora_fair(factors, n, weights, deltas[n] / scale[n], rel)
        else:
            want = scale[n] * REFERENCES[method](factors, n, weights)
            assert_rel(deltas[n], want, rel)


def check_lora_fair(
    factors: list[Factors], name: str, weights: list[float] | None, update: Tensor, rel: float
) -> None:
    """LoRA-FAIR keeps Ā and corrects B̄: its update is (B̄ + D) Ā with an objective no worse
    than the dense L-BFGS reference (and so no worse than FedIT's D = 0)."""
    Abar, Bbar, dW = dense_parts(factors, weights, name)
    B_new = update @ torch.linalg.pinv(Abar)
    assert_rel(B_new @ Abar, update, rel)  # the update lies in Ā's row space
    D = B_new - Bbar
    ours = float(dense_objective(D, Abar, Bbar, dW, 0.01, "fro", "flat", "B"))
    best, _ = dense_reference(Abar, Bbar, dW, 0.01, "fro", "flat", "B")
    fedit = float(dense_objective(torch.zeros_like(D), Abar, Bbar, dW, 0.01, "fro", "flat", "B"))
    assert ours <= best + 1e-5
    # the update went through float32 storage and a float32 merge: objective noise ~1e-7
    assert ours <= fedit + 1e-6


# --------------------------------------------------------------------------- cases

EQUAL = {"r": 4, "lora_alpha": 8}


@pytest.fixture(scope="module")
def equal_clients(base: Any, tmp_path_factory: pytest.TempPathFactory) -> list[Client]:
    return _clients(base, tmp_path_factory.mktemp("equal"), [EQUAL] * 3)


@pytest.fixture(scope="module")
def shared_clients(base: Any, tmp_path_factory: pytest.TempPathFactory) -> list[Client]:
    return _clients(base, tmp_path_factory.mktemp("shared"), [EQUAL] * 3, shared=True)


@pytest.mark.parametrize("method", registry.names())
def test_every_method_equal_configs(
    method: str,
    base: Any,
    equal_clients: list[Client],
    shared_clients: list[Client],
    tmp_path: Path,
) -> None:
    clients = shared_clients if method in SHARED_A else equal_clients
    check_method(method, base, clients, tmp_path / "out", weights=[3.0, 1.0, 2.0])


@pytest.mark.parametrize("method", registry.names())
def test_every_method_equal_weights_default(
    method: str,
    base: Any,
    equal_clients: list[Client],
    shared_clients: list[Client],
    tmp_path: Path,
) -> None:
    clients = shared_clients if method in SHARED_A else equal_clients
    check_method(method, base, clients, tmp_path / "out")


MIXED = [{"r": 2, "lora_alpha": 8}, {"r": 4, "lora_alpha": 8}, {"r": 8, "lora_alpha": 8}]
HETERO = [s.name for s in registry.specs() if not s.equal_ranks]


@pytest.fixture(scope="module")
def mixed_clients(base: Any, tmp_path_factory: pytest.TempPathFactory) -> list[Client]:
    return _clients(base, tmp_path_factory.mktemp("mixed"), MIXED)


@pytest.mark.parametrize("method", HETERO)
def test_ranks_2_4_8_one_alpha_scalings_folded(
    method: str, base: Any, mixed_clients: list[Client], tmp_path: Path
) -> None:
    assert len({c.scalings[next(iter(c.scalings))] for c in mixed_clients}) == 3
    check_method(method, base, mixed_clients, tmp_path / "out", weights=[1.0, 2.0, 5.0])
    if method == "flora":  # rank Σ r_k = 14 on every layer, written as r, not a pattern
        config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        assert config["r"] == 14
        assert config["rank_pattern"] == {}


@pytest.mark.parametrize("method", [s.name for s in registry.specs() if s.equal_ranks])
def test_ranks_2_4_8_refused_by_equal_rank_methods(
    method: str, mixed_clients: list[Client], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    rc = cli("aggregate", "--method", method, "--out", out, *(c.path for c in mixed_clients))
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "layer 'base_model.model.model.layers.0.self_attn" in err
    assert f"client 1 ({mixed_clients[1].path})" in err
    assert not out.exists()


def test_flexlora_energy_writes_per_layer_ranks(
    base: Any, mixed_clients: list[Client], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    check_method("flexlora_energy", base, mixed_clients, out)
    from safetensors.torch import load_file

    stored = load_file(out / "adapter_model.safetensors")
    factors, _ = seen(mixed_clients)
    for n in factors[0]:
        want = refm.energy_rank(ref.delta_w(factors, n), 0.99)
        assert stored[f"{n}.lora_A.weight"].shape[0] == want


@pytest.mark.parametrize("method", registry.names())
def test_rslora(method: str, base: Any, tmp_path: Path) -> None:
    cfg = {"r": 4, "lora_alpha": 8, "use_rslora": True}
    clients = _clients(base, tmp_path / "in", [cfg] * 2, shared=method in SHARED_A)
    check_method(method, base, clients, tmp_path / "out")


@pytest.mark.parametrize("method", ["flora", "flexlora", "lora_fair", "hetlora"])
def test_rslora_mixed_ranks(method: str, base: Any, tmp_path: Path) -> None:
    cfgs = [{"r": r, "lora_alpha": 8, "use_rslora": True} for r in (2, 8)]
    clients = _clients(base, tmp_path / "in", cfgs)
    check_method(method, base, clients, tmp_path / "out")


PATTERNS = {
    "r": 4,
    "lora_alpha": 8,
    "rank_pattern": {"v_proj": 2},
    "alpha_pattern": {"model.layers.1.self_attn.q_proj": 3},
}


@pytest.mark.parametrize("method", registry.names())
def test_rank_and_alpha_patterns(method: str, base: Any, tmp_path: Path) -> None:
    clients = _clients(base, tmp_path / "in", [PATTERNS] * 2, shared=method in SHARED_A)
    check_method(method, base, clients, tmp_path / "out", weights=[1.0, 3.0])


@pytest.mark.parametrize("method", ["fedit", "flora", "lora_fair", "fedex_lora"])
def test_patterns_that_differ_between_clients(method: str, base: Any, tmp_path: Path) -> None:
    other = dict(PATTERNS, alpha_pattern={"q_proj": 16})  # same ranks, different scalings
    clients = _clients(base, tmp_path / "in", [PATTERNS, other])
    check_method(method, base, clients, tmp_path / "out")


@pytest.mark.parametrize("method", registry.names())
def test_bf16(method: str, base16: Any, tmp_path: Path) -> None:
    clients = _clients(base16, tmp_path / "in", [EQUAL] * 3, shared=method in SHARED_A)
    out = tmp_path / "out"
    # bf16 throughout: the factors, the method's output and the merged bf16 weight each
    # round to 8 significant bits.
    check_method(method, base16, clients, out, rel=3e-2)
    from safetensors.torch import load_file

    folder = out / "client_0" if method == "fedsa_lora" else out
    stored = load_file(folder / "adapter_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    if method == "fedex_lora":
        residual = load_file(out / "fedex_residual.safetensors")
        assert {t.dtype for t in residual.values()} == {torch.bfloat16}


def test_bf16_flora_mixed_ranks(base16: Any, tmp_path: Path) -> None:
    clients = _clients(base16, tmp_path / "in", MIXED)
    check_method("flora", base16, clients, tmp_path / "out", rel=3e-2)


def test_modules_to_save_averaged_with_weights(base: Any, tmp_path: Path) -> None:
    cfg = dict(EQUAL, modules_to_save=["lm_head"])
    clients = _clients(base, tmp_path / "in", [cfg] * 2)
    from safetensors.torch import load_file

    heads = [
        load_file(Path(c.path) / "adapter_model.safetensors")["base_model.model.lm_head.weight"]
        for c in clients
    ]
    for h in heads:  # peft saves the untrained copy: make the clients' heads differ
        h.add_(torch.randn_like(h))
    from safetensors.torch import save_file

    for c, h in zip(clients, heads, strict=True):
        state = load_file(Path(c.path) / "adapter_model.safetensors")
        state["base_model.model.lm_head.weight"] = h
        save_file(state, Path(c.path) / "adapter_model.safetensors")
    out = tmp_path / "out"
    assert cli("aggregate", "--method", "fedit", "--weights", "1,3", "--out", out,
               *(c.path for c in clients)) == 0  # fmt: skip
    import copy

    import peft

    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.fspath(out))
    got = model.base_model.model.lm_head.modules_to_save["default"].weight.detach().double()
    torch.testing.assert_close(got, 0.25 * heads[0].double() + 0.75 * heads[1].double())


def test_options_are_parsed_and_used(
    base: Any, mixed_clients: list[Client], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    paths = [c.path for c in mixed_clients]
    assert cli("aggregate", "--method", "flexlora", "--option", "rank=3", "--out", out, *paths) == 0
    factors, _ = seen(mixed_clients)
    deltas = merged_deltas(base, out)
    for n in factors[0]:
        assert_rel(deltas[n], ref.best_rank_approx(ref.delta_w(factors, n), 3), 1e-5)
    out2 = tmp_path / "out2"
    assert cli("aggregate", "--method", "flexlora", "--option", "rank=0.9,2", "--out", out2,
               *paths) == 0  # fmt: skip
    deltas = merged_deltas(base, out2)
    for n in factors[0]:
        dW = ref.delta_w(factors, n)
        assert_rel(deltas[n], ref.best_rank_approx(dW, min(2, refm.energy_rank(dW, 0.9))), 1e-5)


def test_rolora_trained_A_option(base: Any, tmp_path: Path) -> None:
    """trained=A: B is the shared, frozen factor; A is averaged."""
    import copy

    import peft

    torch.manual_seed(5)
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4)
    )
    shared_B = {
        n: torch.randn_like(m.lora_B["default"].weight) for n, m in lora_layers(model).items()
    }
    clients = []
    for k in range(2):
        c = save_client(base, tmp_path / f"c{k}", seed=k, r=4, lora_alpha=8)
        from safetensors.torch import load_file, save_file

        file = Path(c.path) / "adapter_model.safetensors"
        state = load_file(file)
        for n, B in shared_B.items():
            state[f"{n}.lora_B.weight"] = B
        save_file(state, file)
        factors = {n: (A, shared_B[n].double()) for n, (A, _) in c.factors.items()}
        clients.append(Client(c.path, factors, c.scalings))
    out = tmp_path / "out"
    assert cli("aggregate", "--method", "rolora", "--option", "trained=A", "--out", out,
               *(c.path for c in clients)) == 0  # fmt: skip
    factors, scale = seen(clients)
    deltas = merged_deltas(base, out)
    for n in factors[0]:
        want = scale[n] * _product(refm.frozen_average(factors, n, None, frozen="B"))
        assert_rel(deltas[n], want, 1e-5)


# --------------------------------------------------------------------------- output


def test_prints_cosines_beside_fedit_and_time(
    equal_clients: list[Client], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert cli("aggregate", "--method", "flora", "--out", out,
               *(c.path for c in equal_clients)) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "cos(BA, ΔW): flora vs FedIT" in text
    lines = [ln for ln in text.splitlines() if "self_attn" in ln]
    assert len(lines) == 4
    factors, _ = seen(equal_clients)
    for line in lines:
        module, ours, theirs = line.split()
        n = "base_model.model." + module
        assert float(ours) == pytest.approx(1.0, abs=1e-6)  # FLoRA is exact
        fedit_cos = ref.cosine(_product(ref.fedit(factors, n)), ref.delta_w(factors, n))
        assert float(theirs) == pytest.approx(fedit_cos, abs=2e-6)
    assert "time: " in text


def test_many_layers_are_summarised(
    base: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    clients = _clients(base, tmp_path / "in", [dict(EQUAL, target_modules=every)] * 2)
    assert cli("aggregate", "--method", "lora_fair", "--out", tmp_path / "out",
               *(c.path for c in clients)) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "over 14 layers" in text
    assert "lora_fair    min " in text
    assert "fedit        min " in text


def test_fedit_reports_one_column(
    equal_clients: list[Client], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("aggregate", "--method", "fedit", "--out", tmp_path / "out",
               *(c.path for c in equal_clients[:1])) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "fedit: 1 client, 4 layers," in text
    assert "cos(BA, ΔW): fedit\n" in text  # no "vs FedIT" beside itself
    lines = [ln.split() for ln in text.splitlines() if "self_attn" in ln]
    assert len(lines) == 4
    assert all(len(parts) == 2 and float(parts[1]) == pytest.approx(1.0) for parts in lines)


def test_rank_above_the_layer_size_round_trips_with_the_option(
    equal_clients: list[Client], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """FlexLoRA at a rank above a layer's d_in and d_out writes it (zero-padded, as the
    library returns it) and says so; that folder as a client is refused with this command's
    option named, then accepted with it, the FedIT baseline of the report included."""
    wide = tmp_path / "wide"
    assert cli("aggregate", "--method", "flexlora", "--option", "rank=40", "--out", wide,
               *(c.path for c in equal_clients)) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "note: 4 layers written with a rank above both d_in and d_out" in text
    assert "rank 40, d_in 32, d_out 32" in text
    assert "pass --option allow_excess_rank=True" in text
    inputs = (wide, equal_clients[0].path)
    err = _fail(capsys, tmp_path / "again", "--method", "flexlora", *inputs)
    assert f"client 0 ({wide})" in err
    assert err.rstrip().endswith("If this rank is on purpose, pass --option allow_excess_rank=True")
    assert cli("aggregate", "--method", "flexlora", "--option", "allow_excess_rank=True",
               "--out", tmp_path / "again", *inputs) == 0  # fmt: skip
    assert "fedit" in capsys.readouterr().out  # the FedIT baseline ran on the padded clients


def test_python_dash_m_runs(equal_clients: list[Client], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lorafair", "aggregate", "--method", "fedit", "--out", out,
         *(c.path for c in equal_clients)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "adapter_config.json").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "lorafair", "aggregate", "--method", "fedit", "--out", out,
         *(c.path for c in equal_clients)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr
    assert "not empty" in bad.stderr


# --------------------------------------------------------------------------- bad input


def _fail(capsys: pytest.CaptureFixture[str], out: Path, *args: Any, code: int = 2) -> str:
    existed = sorted(os.listdir(out)) if out.exists() else None
    rc = cli("aggregate", "--out", out, *args)
    captured = capsys.readouterr()
    assert rc == code, captured
    err = captured.err
    assert err.count("\n") == 1, err  # one line
    assert "Traceback" not in err
    assert (sorted(os.listdir(out)) if out.exists() else None) == existed  # nothing written
    leftovers = [p for p in os.listdir(out.parent) if p.startswith(f".{out.name}.")]
    assert leftovers == []
    return err


@pytest.fixture
def two(base: Any, tmp_path: Path) -> list[Client]:
    return _clients(base, tmp_path / "in", [EQUAL] * 2)


L1V = "base_model.model.model.layers.1.self_attn.v_proj"


def _edit_state(client: Client, edit: Callable[[dict[str, Tensor]], None]) -> None:
    from safetensors.torch import load_file, save_file

    file = Path(client.path) / "adapter_model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file)


def _edit_config(client: Client, **fields: Any) -> None:
    file = Path(client.path) / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(fields)
    file.write_text(json.dumps(config))


def test_bad_missing_folder(two: list[Client], tmp_path: Path, capsys: Any) -> None:
    err = _fail(capsys, tmp_path / "out", "--method", "fedit", two[0].path, tmp_path / "gone")
    assert "client 1" in err
    assert "gone" in err


def test_bad_missing_weights_file(two: list[Client], tmp_path: Path, capsys: Any) -> None:
    (Path(two[1].path) / "adapter_model.safetensors").unlink()
    err = _fail(capsys, tmp_path / "out", "--method", "fedit", *(c.path for c in two))
    assert f"client 1 ({two[1].path})" in err
    assert "adapter_model.safetensors" in err


def test_bad_truncated_file(two: list[Client], tmp_path: Path, capsys: Any) -> None:
    file = Path(two[1].path) / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    err = _fail(capsys, tmp_path / "out", "--method", "flora", *(c.path for c in two))
    assert f"client 1 ({two[1].path})" in err
    assert str(file) in err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_bad_non_finite(value: float, two: list[Client], tmp_path: Path, capsys: Any) -> None:
    def poison(state: dict[str, Tensor]) -> None:
        state[f"{L1V}.lora_A.weight"][1, 2] = value

    _edit_state(two[1], poison)
    err = _fail(capsys, tmp_path / "out", "--method", "lora_fair", *(c.path for c in two))
    assert f"client 1 ({two[1].path})" in err
    assert f"layer '{L1V}'" in err
    assert "adapter_model.safetensors" in err
    assert "NaN or Inf" in err


def test_bad_shapes_between_clients(base: Any, tmp_path: Path, capsys: Any) -> None:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=48,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    wide = transformers.LlamaForCausalLM(config)
    a = save_client(base, tmp_path / "a", seed=1, **EQUAL)
    b = save_client(wide, tmp_path / "b", seed=2, **EQUAL)
    err = _fail(capsys, tmp_path / "out", "--method", "fedit", a.path, b.path)
    assert f"client 1 ({b.path})" in err
    assert "layer 'base_model.model.model.layers.0" in err
    assert f"client 0 ({a.path})" in err


def test_bad_shape_within_a_client(two: list[Client], tmp_path: Path, capsys: Any) -> None:
    def cut(state: dict[str, Tensor]) -> None:
        state[f"{L1V}.lora_B.weight"] = state[f"{L1V}.lora_B.weight"][:, :3].contiguous()

    _edit_state(two[0], cut)
    err = _fail(capsys, tmp_path / "out", "--method", "fedit", *(c.path for c in two))
    assert f"client 0 ({two[0].path})" in err
    assert f"layer '{L1V}'" in err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_modules", ["q_proj"]),
        ("base_model_name_or_path", "another/model"),
        ("use_dora", False),  # equal: passes this check, caught by the next field below
        ("fan_in_fan_out", True),
        ("modules_to_save", ["lm_head"]),
    ],
)
def test_bad_configs_differ(
    field: str, value: Any, two: list[Client], tmp_path: Path, capsys: Any
) -> None:
    if field == "use_dora":
        _edit_config(two[1], use_dora=False, task_type="CAUSAL_LM")
        field, value = "task_type", "CAUSAL_LM"
    else:
        _edit_config(two[1], **{field: value})
    err = _fail(capsys, tmp_path / "out", "--method", "fedit", *(c.path for c in two))
    assert f"client 1 ({two[1].path}) has {field}={value!r}" in err
    assert f"client 0 ({two[0].path}) has {field}=" in err


def test_target_modules_order_does_not_matter(two: list[Client], tmp_path: Path, base: Any) -> None:
    _edit_config(two[1], target_modules=["v_proj", "q_proj"])
    _edit_config(two[0], target_modules=["q_proj", "v_proj"])
    check_method("fedit", base, two, tmp_path / "out")


def test_bad_dora(two: list[Client], tmp_path: Path, capsys: Any) -> None:
    _edit_config(two[1], use_dora=True)
    err = _fail(capsys, tmp_path / "out", "--method", "fedit", *(c.path for c in two))
    assert f"client 1 ({two[1].path})" in err
    assert "use_dora=True" in err


@pytest.mark.parametrize(
    "key",
    [
        f"{L1V}.lora_magnitude_vector",
        "base_model.model.model.embed_tokens.lora_embedding_A",
        f"{L1V}.lora_B.bias",
        "base_model.model.model.norm.weight",  # not in modules_to_save
    ],
)
def test_bad_other_keys_named(key: str, two: list[Client], tmp_path: Path, capsys: Any) -> None:
    def add(state: dict[str, Tensor]) -> None:
        state[key] = torch.ones(32)

    _edit_state(two[1], add)
    err = _fail(capsys, tmp_path / "out", "--method", "fedit", *(c.path for c in two))
    assert f"client 1 ({two[1].path})" in err
    assert f"key '{key}'" in err


@pytest.mark.parametrize("method", sorted(SHARED_A))
def test_bad_shared_A_methods_on_unshared_clients(
    method: str, two: list[Client], tmp_path: Path, capsys: Any
) -> None:
    err = _fail(capsys, tmp_path / "out", "--method", method, *(c.path for c in two))
    assert "share" in err
    assert "frozen" in err
    assert f"client 1 ({two[1].path})" in err
    assert "layer 'base_model.model." in err


def test_bad_non_empty_out_needs_force(
    two: list[Client], tmp_path: Path, base: Any, capsys: Any
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    err = _fail(capsys, out, "--method", "fedit", *(c.path for c in two))
    assert "not empty" in err
    assert "--force" in err
    assert cli("aggregate", "--method", "fedit", "--force", "--out", out,
               *(c.path for c in two)) == 0  # fmt: skip
    assert not (out / "precious.txt").exists()
    assert (out / "adapter_config.json").exists()


def test_bad_out_is_an_input(two: list[Client], tmp_path: Path, capsys: Any) -> None:
    rc = cli("aggregate", "--method", "fedit", "--force", "--out", two[0].path,
             *(c.path for c in two))  # fmt: skip
    assert rc == 2
    assert "also an input" in capsys.readouterr().err
    assert (Path(two[0].path) / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--method", "fedit", "--weights", "1,2,3"], "3 values for 2 folders"),
        (["--method", "fedit", "--weights", "1,x"], "--weights"),
        (["--method", "fedit", "--weights", "1,-2"], "client 1 has weight -2"),
        (["--method", "fedit", "--weights", "0,0"], "weight"),
        (["--method", "lora_fair", "--option", "gamma=1"], "no option 'gamma'; its options: lam"),
        (["--method", "lora_fair", "--option", "lam=abc"], "expected float"),
        (["--method", "lora_fair", "--option", "lam=-1"], "lam"),
        (["--method", "rolora", "--option", "trained=C"], "expected A | B"),
        (["--method", "flexlora", "--option", "rank"], "expected KEY=VALUE"),
        (["--method", "nope"], "invalid choice: 'nope'"),
    ],
)
def test_bad_arguments(
    args: list[str], needle: str, two: list[Client], tmp_path: Path, capsys: Any
) -> None:
    err = _fail(capsys, tmp_path / "out", *args, *(c.path for c in two))
    assert needle in err


def test_internal_failure_exits_1(
    two: list[Client], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lorafair.interop.peft_aggregate as agg

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated\nfailure")

    monkeypatch.setattr(agg, "aggregate_adapters", boom)
    err = _fail(capsys, tmp_path / "out", "--method", "fedit", *(c.path for c in two), code=1)
    assert "internal error: RuntimeError: simulated failure" in err


def test_no_command_and_help(capsys: Any) -> None:
    assert main([]) == 2
    assert main(["aggregate", "--help"]) == 0
    text = capsys.readouterr().out
    for spec in registry.specs():
        assert spec.name in text
    assert "fedex_residual.safetensors" in text
    assert "client_<k>" in text


def test_runs_without_tqdm(
    equal_clients: list[Client], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    out = tmp_path / "out"
    assert cli("aggregate", "--method", "fedit", "--out", out,
               *(c.path for c in equal_clients)) == 0  # fmt: skip
    assert (out / "adapter_model.safetensors").exists()


def test_fedit_cosine_of_mixed_ranks_is_the_zero_padded_average(
    mixed_clients: list[Client], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("aggregate", "--method", "flora", "--out", tmp_path / "out",
               *(c.path for c in mixed_clients)) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "zero-padded" in text
    factors, _ = seen(mixed_clients)
    for line in (ln for ln in text.splitlines() if "self_attn" in ln):
        module, ours, theirs = line.split()
        Abar, Bbar, dW = dense_parts(factors, None, "base_model.model." + module)
        assert float(ours) == pytest.approx(1.0, abs=1e-6)
        assert float(theirs) == pytest.approx(ref.cosine(Bbar @ Abar, dW), abs=2e-6)
