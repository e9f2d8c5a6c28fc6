"""pytest-benchmark entries for the headline cells (not collected by the normal test run).

Run: ``python -m pytest benchmarks/test_headline.py`` (needs the ``bench`` extra). Each entry
checks its result with the same independent checks as ``python -m benchmarks`` before timing.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import entries
from benchmarks.checks import check
from lorafair.bench import Inputs, make_inputs, preset

pytest.importorskip("pytest_benchmark")

_OPTIONS: dict[str, Any] = {"lam": 0.01, "similarity": "flat"}
_VIT = [n for n in entries.names() if not entries.get(n).dense]


@pytest.fixture(scope="module")
def vit_k6_r16() -> Inputs:
    return make_inputs(preset("vit_b16"), 6, 16, "float32", "cpu")


@pytest.mark.parametrize("name", _VIT)
def test_vit_b16_k6_r16(benchmark: Any, vit_k6_r16: Inputs, name: str) -> None:
    entry = entries.get(name)
    result, _ = entry.run(vit_k6_r16, _OPTIONS, None)
    assert check(entry, result, vit_k6_r16, _OPTIONS, dense={}).problems == []
    benchmark.pedantic(entry.run, args=(vit_k6_r16, _OPTIONS, None), rounds=5, warmup_rounds=1)
