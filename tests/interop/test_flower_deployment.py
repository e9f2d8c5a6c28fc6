"""Flower's Deployment Engine on loopback: a real SuperLink, three SuperNodes, ``flwr run``.

One federation (``examples/flower/deploy.py``, insecure, 127.0.0.1, free ports) serves two
runs of the examples/flower app with ``LoRAStrategy(lora_fair)``, two rounds each:
- every node healthy: both rounds aggregate all three replies;
- SuperNode 2 is SIGKILLed when it receives its first train message: round 1 completes with
  the two other replies (the SuperLink answers for the dead node with an error reply), round 2
  samples the two that are left, and the run finishes.
Every process started is stopped by pid (also on failure); the whole test is bounded in time.
If the Deployment Engine cannot start here, the failure says which process died and its log.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

_MISSING = [m for m in ("flwr", "peft", "psutil") if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"needs {', '.join(_MISSING)}", allow_module_level=True)

BIN = Path(sys.executable).parent
_CLIS = ("flwr", "flower-superlink", "flower-supernode", "flower-superexec")
if not all((BIN / c).exists() or shutil.which(c) for c in _CLIS):
    pytest.skip(f"needs Flower's CLIs {_CLIS} next to {sys.executable}", allow_module_level=True)

from examples.flower.deploy import RunSpec, deploy  # noqa: E402

TIMEOUT = 480.0  # seconds, for both runs together; a hang fails here instead of stalling CI


@pytest.mark.deployment
def test_two_runs_and_a_supernode_crash(tmp_path: Path) -> None:
    runs = [RunSpec(rounds=2), RunSpec(rounds=2, kill_node=2)]
    done = deploy(runs, supernodes=3, timeout=TIMEOUT, workdir=tmp_path)
    print({"seconds": done.seconds, "runs": [r.seconds for r in done.runs]})

    healthy, faulty = done.runs
    for run in done.runs:
        train = {int(k): v for k, v in run.result["train"].items()}
        assert sorted(train) == [1, 2], run.log[-3000:]  # every round aggregated
        for metrics in train.values():
            assert metrics["solver-converged"] == 1.0
            assert 0.9 < metrics["bias-cosine-min"] <= 1.0
        central = {int(k): v for k, v in run.result["central"].items()}
        assert sorted(central) == [0, 1, 2]
        assert all(math.isfinite(m["loss"]) for m in central.values())
        assert run.result["method"] == "lora_fair"

    assert [healthy.result["train"][r]["num-replies"] for r in ("1", "2")] == [3, 3]
    # The crash: round 1 aggregates the two replies that came, round 2 the two nodes left.
    assert [faulty.result["train"][r]["num-replies"] for r in ("1", "2")] == [2, 2]
    assert "Received 2 results and 1 failures" in faulty.log, faulty.log[-3000:]

    assert _left_running(tmp_path) == []  # everything started was stopped


def _left_running(work: Path) -> list[Any]:
    """Live processes this test started: our children, or anything with our FLWR_HOME."""
    import psutil

    home = str(work / "flwr-home")
    left = []
    for proc in psutil.process_iter():
        try:
            ours = proc.environ().get("FLWR_HOME") == home
            if ours and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.Error:
            continue
    here = psutil.Process()
    left += [p for p in here.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    return left


@pytest.mark.deployment
def test_flwr_run_in_simulation(tmp_path: Path) -> None:
    """``flwr run examples/flower`` on the Simulation Engine (a SuperLink with --simulation),
    one round: the CLI, the FAB and the app's components, not the rounds (tested above)."""
    from examples.flower.deploy import simulate

    config = {"method": "'lora_fair'", "num-server-rounds": "1", "fraction-evaluate": "0.0"}
    result = simulate(run_config=config, supernodes=2, timeout=300.0, workdir=tmp_path)
    train = {int(k): v for k, v in result["train"].items()}
    assert sorted(train) == [1]
    assert train[1]["num-replies"] == 2
    assert train[1]["solver-converged"] == 1.0
    central = {int(k): v for k, v in result["central"].items()}
    assert central[1]["loss"] < central[0]["loss"]
    assert _left_running(tmp_path) == []


@pytest.mark.deployment
def test_a_killed_superlink_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """RoLoRA, 4 rounds: once uninterrupted; once with the SuperLink (and the ServerApp it
    runs) SIGKILLed by pid when round 2's checkpoint is written, then a new federation that
    resumes from that checkpoint at round 3. The final adapters are equal bit for bit (the
    example trains deterministically and the strategy sorts replies by content)."""
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    spec = RunSpec(rounds=4, method="rolora", checkpoint_dir=whole)
    first = deploy(
        [spec, spec._replace(checkpoint_dir=cut, kill_superlink_after=2)],
        supernodes=3,
        timeout=TIMEOUT,
        workdir=tmp_path / "first",
    )
    uninterrupted, killed = first.runs
    assert killed.result == {}
    assert sorted(p.name for p in (tmp_path / "cut").glob("round-*")) == ["round-1", "round-2"]
    assert _left_running(tmp_path / "first") == []
    second = deploy(
        [spec._replace(checkpoint_dir=cut, resume=True)],
        supernodes=3,
        timeout=TIMEOUT,
        workdir=tmp_path / "second",
    )
    (resumed,) = second.runs
    assert sorted(int(r) for r in resumed.result["train"]) == [3, 4]
    assert sorted(int(r) for r in uninterrupted.result["train"]) == [1, 2, 3, 4]
    assert resumed.result["arrays-sha256"] == uninterrupted.result["arrays-sha256"]
    for r in ("3", "4"):
        assert resumed.result["train"][r] == uninterrupted.result["train"][r]
    assert _left_running(tmp_path / "second") == []
