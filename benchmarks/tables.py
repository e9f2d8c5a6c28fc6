"""The report of a run: the environment line, the table and the same-run ratios
(:mod:`lorafair.bench.report`), printed and written as ``results.md`` and ``results.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from lorafair.bench import Row, header, ratio_lines, ratios, table

__all__ = ["report", "write"]


def report(rows: Sequence[Row], env: dict[str, Any], *, quick: bool) -> tuple[str, list[Any]]:
    """The printed text and the ratios of ``rows``."""
    rs = ratios(rows, quick=quick)
    return f"{header(env)}\n\n{table(rows)}\n{ratio_lines(rs, quick=quick)}", rs


def write(
    out_dir: str, text: str, rows: Sequence[Row], rs: list[Any], env: dict[str, Any], args: Any
) -> None:
    """``results.md`` (the text) and ``results.json`` (environment, arguments, rows, ratios)."""
    os.makedirs(out_dir, exist_ok=True)
    record = {"environment": env, "args": vars(args), "rows": [asdict(w) for w in rows]}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**record, "ratios": rs}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
