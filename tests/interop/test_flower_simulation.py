"""End-to-end: the examples/flower app under Flower's simulation engine (ray), one short run.

The simulation runs in a subprocess with a timeout: ray emits FutureWarning/ResourceWarning
that this suite's ``filterwarnings = error`` would turn into a crashed (and hanging) runtime,
and ray's global state should not leak into the test process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafair import registry

# Only look the packages up: importing ray here would change this test process's state (it
# triggers torch's decomposition imports, whose DeprecationWarning then fails other tests).
_MISSING = [m for m in ("flwr", "peft", "ray") if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"needs {', '.join(_MISSING)}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


def test_import_lorafair_imports_neither_flwr_nor_peft() -> None:
    code = (
        "import sys, lorafair, lorafair.aggregate, lorafair.metrics, lorafair.interop.peft\n"
        "bad = [m for m in ('flwr', 'peft', 'ray', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)


@pytest.mark.slow
def test_simulation_smoke(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "examples.flower.run", "--method", "fedit", "--rounds", "2"]
    cmd += ["--clients", "2", "--json", str(out)]
    env = dict(os.environ, RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    central = {int(k): v for k, v in result["central"].items()}
    assert sorted(central) == [0, 1, 2]
    assert all(math.isfinite(m["loss"]) for m in central.values())
    assert central[2]["loss"] < central[0]["loss"]  # it learns something
    train = {int(k): v for k, v in result["train"].items()}
    assert sorted(train) == [1, 2]
    assert 0.9 < train[2]["bias-cosine-min"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("method", [n for n in registry.names() if n != "fedit"])
def test_simulation_of_every_method(method: str, tmp_path: Path) -> None:
    """Under ray, every registered method through LoRAStrategy and the example ClientApp
    (fedit is the smoke test above): two rounds, both replies aggregated, none rejected;
    FedEx-LoRA's residual record makes the global model exact; FedSA-LoRA (personalised) has no
    global model to evaluate centrally."""
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "examples.flower.run", "--method", method, "--rounds", "2"]
    cmd += ["--clients", "2", "--json", str(out)]
    env = dict(os.environ, RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    train = {int(k): v for k, v in result["train"].items()}
    assert sorted(train) == [1, 2]
    assert all(m["num-replies"] == 2 for m in train.values())
    assert all(m["replies-rejected"] == 0 for m in train.values())
    central = {int(k): v for k, v in result["central"].items()}
    if registry.get(method).personalised:  # no global model to evaluate centrally
        assert central == {}
        return
    assert sorted(central) == [0, 1, 2]
    assert all(math.isfinite(m["loss"]) for m in central.values())
    if registry.get(method).output == "adapters+residual":  # exact: the residual is folded
        assert central[2]["loss"] < central[0]["loss"]
        assert all(m["bias-relative-error-max"] < 1e-4 for m in train.values())
