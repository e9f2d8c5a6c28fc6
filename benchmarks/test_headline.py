"""pytest-benchmark entries for the headline cells (not collected by the normal test run).

Run: ``python -m pytest benchmarks/test_headline.py`` (needs the ``bench`` extra). Each entry
checks its result with the same independent checks as ``python -m benchmarks`` before timing.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.run import Inputs, call_aggregator, check, make_inputs

pytest.importorskip("pytest_benchmark")

_OPTIONS: dict[str, Any] = {"lam": 0.01, "similarity": "flat"}
_VIT = ["fedit", "ffa_lora", "flora", "flexlora", "lora_fair", "lora_fair_sq"]


@pytest.fixture(scope="module")
def vit_k6_r16() -> Inputs:
    return make_inputs("vit_b16", None, 6, 16, "float32", "cpu")


@pytest.mark.parametrize("name", _VIT)
def test_vit_b16_k6_r16(benchmark: Any, vit_k6_r16: Inputs, name: str) -> None:
    result, _ = call_aggregator(name, vit_k6_r16, _OPTIONS, ref_layers=None)
    assert check(name, result, vit_k6_r16, _OPTIONS, dense={}).problems == []
    benchmark.pedantic(
        call_aggregator,
        args=(name, vit_k6_r16, _OPTIONS),
        kwargs={"ref_layers": None},
        rounds=5,
        warmup_rounds=1,
    )
