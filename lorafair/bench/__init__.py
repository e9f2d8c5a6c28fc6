"""Time lorafair's server step on real shapes, against floors measured in the same run.

``lorafair bench`` (:mod:`lorafair.bench.cli`) is the command; the pieces below are what it and
the repository's ``benchmarks/`` are built from:

- shapes (:mod:`~lorafair.bench.shapes`): :func:`preset` (ViT-B/16, Mixer-B/16, Llama-3-8B and
  -70B on all linears, ...), :func:`from_adapter`, :func:`from_config`; synthetic clients on
  them (:func:`make_clients`, :func:`make_inputs`);
- entries (:mod:`~lorafair.bench.entries`): one per registered aggregator, read off
  :mod:`lorafair.registry`;
- one cell (:func:`run_cell`): check every result (:func:`check_update`), then time them with the
  memory and compute floor probes (:mod:`~lorafair.bench.floors`) in one round-robin;
- peak memory growth of one call in a fresh process (:func:`measure`, VmHWM);
- the report (:func:`table`, :func:`ratios`, :func:`ratio_lines`, :func:`environment`).
"""

from lorafair.bench.cell import Check, Row, make_row, ratio, run_cell
from lorafair.bench.cells import DTYPES, Inputs, make_inputs
from lorafair.bench.checks import REL_TOL, Quality, check_update
from lorafair.bench.entries import Entry, Norm, Result, Runner, from_spec, library, update_of
from lorafair.bench.floors import Floors, Probes, make_probes
from lorafair.bench.memory import MemorySpec, measure
from lorafair.bench.report import (
    BASELINE,
    QUICK_NOTE,
    environment,
    fmt_time,
    header,
    progress,
    ratio_lines,
    ratios,
    table,
)
from lorafair.bench.shapes import (
    PRESETS,
    LayerShape,
    ShapeSet,
    factor_bytes,
    from_adapter,
    from_config,
    make_clients,
    preset,
)
from lorafair.bench.timing import round_robin, sync, timed

__all__ = [
    "BASELINE",
    "DTYPES",
    "PRESETS",
    "QUICK_NOTE",
    "REL_TOL",
    "Check",
    "Entry",
    "Floors",
    "Inputs",
    "LayerShape",
    "MemorySpec",
    "Norm",
    "Probes",
    "Quality",
    "Result",
    "Row",
    "Runner",
    "ShapeSet",
    "check_update",
    "environment",
    "factor_bytes",
    "fmt_time",
    "from_adapter",
    "from_config",
    "from_spec",
    "header",
    "library",
    "make_clients",
    "make_inputs",
    "make_probes",
    "make_row",
    "measure",
    "preset",
    "progress",
    "ratio",
    "ratio_lines",
    "ratios",
    "round_robin",
    "run_cell",
    "sync",
    "table",
    "timed",
    "update_of",
]
