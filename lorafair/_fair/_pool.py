"""Private: the one candidate pool of both forms and its one scorer.

Every heuristic adds its points to a :class:`_Pool` (columns: starts, dropped columns, column
mixes, the λ = 0 end; flat: the family's Newton result, the λ = 0 end's points, the general
solver's runs), each with its score ``f``: the true objective, plus (flat) what rounding the
output can cost it (:func:`~lorafair._fair._batch.turning`), ``inf`` where the form rules the
point out (columns: its objective is not resolved in the output, ``_column_objective._unsafe``).
:meth:`_Pool.pick` is the one scorer: per layer the candidate of lowest score (the first of
equals), unless ``ΔB = 0`` (always in the pool, never charged: it returns FedIT's factors bit
for bit) is within ``TIE`` of it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from lorafair._fair import _tolerances as _tol


class _Candidates(NamedTuple):
    """Candidate points, one per row: ``x`` (rows, N), ``f`` (rows,) the score, ``layer``
    (rows,) which layer's, the ``iterations`` / ``converged`` of the run that produced it, and
    ``report`` (rows, V): what the form reports of the point (columns: its objective; flat: its
    objective and cosine)."""

    x: Tensor
    f: Tensor
    layer: Tensor
    iterations: Tensor
    converged: Tensor
    report: Tensor


class Picked(NamedTuple):
    """:meth:`_Pool.pick` per layer: the chosen point ``x`` (L, N), or (L, p, q) where the pick
    was given a shape; its objective ``f`` (``report[:, 0]``) and ``report`` (L, V); the
    ``iterations`` / ``converged`` of its run; its ``row`` in :meth:`_Pool.joined` (−1 where
    ``ΔB = 0`` is kept)."""

    x: Tensor
    f: Tensor
    report: Tensor
    iterations: Tensor
    converged: Tensor
    row: Tensor


@dataclasses.dataclass
class _Pool:
    """The one pool a form's heuristics add their candidates to, with ``ΔB = 0`` (``zero_x``
    (L, N), its objective ``zero_f`` (L,), its ``zero_report`` (L, V), default ``zero_f``)
    always among them; :meth:`pick` is the one scorer."""

    zero_x: Tensor
    zero_f: Tensor
    parts: list[_Candidates] = dataclasses.field(default_factory=list)
    zero_report: Tensor | None = None

    def add(
        self,
        x: Tensor,
        f: Tensor,
        layer: Tensor,
        iterations: Tensor,
        cv: Tensor,
        report: Tensor | None = None,
    ) -> None:
        """Candidates ``x`` (rows, N) of ``layer`` (rows,) scored ``f`` (rows,); a NaN score
        counts as ``+inf`` (never chosen: ``amin`` would otherwise carry the NaN to the layer's
        best and point it at another layer's row)."""
        f = torch.where(torch.isnan(f), torch.inf, f)
        self.parts.append(
            _Candidates(x, f, layer, iterations, cv, f[:, None] if report is None else report)
        )

    def joined(self) -> _Candidates:
        return _Candidates(*(torch.cat(z) for z in zip(*self.parts, strict=True)))

    def pick(self, shape: tuple[int, int] | None = None) -> Picked:
        """Per layer the candidate of lowest score (the first of equals: :func:`_best`), unless
        ``ΔB = 0`` is within ``TIE`` of it (then ``ΔB = 0``; so a form is never worse than
        FedIT on its objective). The iterations and convergence are those of the best
        candidate's run either way (when ``ΔB = 0`` is kept, that run ended no lower). With a
        ``shape`` the point comes as (L, p, q)."""
        every = self.joined()
        first, f_best = _best(every, self.zero_f.shape[0])
        zero = self.zero_f <= f_best + _tol.TIE
        zero_report = self.zero_f[:, None] if self.zero_report is None else self.zero_report
        x = torch.where(zero[:, None], self.zero_x, every.x[first])
        report = torch.where(zero[:, None], zero_report, every.report[first])
        return Picked(
            x if shape is None else x.reshape(-1, *shape),
            report[:, 0],
            report,
            every.iterations[first],
            every.converged[first],
            torch.where(zero, -1, first),
        )


def _best(c: _Candidates, n_layers: int) -> tuple[Tensor, Tensor]:
    """The scorer: per layer, the index of its first candidate of lowest ``f``, and that ``f``."""
    dev = c.f.device
    f_best = torch.full((n_layers,), torch.inf, dtype=c.f.dtype, device=dev)
    f_best = f_best.scatter_reduce(0, c.layer, c.f, reduce="amin")
    idx = torch.arange(c.f.shape[0], device=dev)
    hit = c.f == f_best[c.layer]
    first = torch.full((n_layers,), c.f.shape[0], dtype=torch.int64, device=dev)
    first = first.scatter_reduce(0, c.layer[hit], idx[hit], reduce="amin")
    return torch.clamp(first, max=c.f.shape[0] - 1), f_best
