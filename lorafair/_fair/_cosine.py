"""Private: the solver's one cosine, ``cos = <a, b> / (‖a‖ ‖b‖)``, and its edge cases.

Both forms compute the same quotient: the flat form per layer (``<P'Q, ΔW>``, ``‖ΔW‖`` and
``‖P'Q‖²``, from the reduced data), the column form per column (``<X_j, Y_j>``, ``xn_j`` and
``‖Y_j‖²``). :func:`cosine` is the only place it is written. Where its callers differ, they
differ on purpose, and the difference is one of its two keyword options:

- ``small``, what a product norm at or near zero gives (a cosine with a zero side is 0, but
  the derivatives need ``1/n³``, which overflows below ``TINY``);
- ``form``, which rounding of the quotient: the plain quotient, or the product of the
  reciprocal factors that the caller's derivatives reuse.

Each choice rounds differently in the last bit, so each caller keeps its own; the options name
them. Elementwise over any (broadcast) shapes, O(1) per entry.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lorafair._fair import _tolerances as _tol

Small = Literal["zero", "clamp", "floor", "zero_tiny"]
"""How :func:`cosine` treats a small product norm ``n = √n²`` (``TINY``: ``_tol.TINY``):

- ``"zero"``: 0 where ``n² = 0`` (or, given ``norm``, where ``n = 0``); else ``n`` exact;
- ``"clamp"``: 0 where ``n² = 0``; else ``n = √max(n², TINY)`` (the safe square root of the
  derivatives, so an underflowing ``n²`` gives a finite quotient);
- ``"floor"``: never 0 for its norm; ``n = √max(n², TINY)`` (the column form: a column whose
  product vanishes has ``<X_j, Y_j> = 0`` there anyway);
- ``"zero_tiny"``: 0 where ``n² ≤ TINY``; else ``n`` exact (the flat family, whose
  derivatives divide by ``n²`` again).
"""

Form = Literal["quotient", "inverse", "split"]
"""Which rounding of the quotient :func:`cosine` returns (equal in exact arithmetic):
``"quotient"`` ``inner / (ref n)``; ``"inverse"`` ``inner · (1/(ref n))`` (the flat family's
derivatives reuse ``1/(ref n)``); ``"split"`` ``(inner/ref) · (1/n)`` (the column
derivatives reuse ``inner/ref``, the cosine's numerator against the unit reference)."""


class Cosine(NamedTuple):
    """What :func:`cosine` computed: ``cos`` (0 where not ``ok``); ``ok`` where the cosine is
    defined (the reference non-zero and the product norm allowed by ``small``); ``ref`` the
    reference norm where ``ok``, 1 elsewhere; ``norm`` the product norm ``n`` as used;
    ``den`` ``ref n`` where ``ok``, 1 elsewhere."""

    cos: Tensor
    ok: Tensor
    ref: Tensor
    norm: Tensor
    den: Tensor

    def inverse(self) -> Tensor:
        """``1/(ref n)`` where ``ok``, 0 elsewhere (a derivative's coefficient)."""
        return torch.where(self.ok, 1.0 / self.den, 0.0)

    def unit(self, inner: Tensor) -> Tensor:
        """``inner / ref`` where ``ok``, 0 elsewhere (the numerator against the unit reference)."""
        return torch.where(self.ok, inner / self.ref, 0.0)


def cosine(
    inner: Tensor,
    ref: Tensor,
    n_sq: Tensor | None = None,
    *,
    norm: Tensor | None = None,
    defined: Tensor,
    small: Small,
    form: Form = "quotient",
) -> Cosine:
    """``cos = inner / (ref n)`` with ``n = √n²`` (or ``n = norm``, given instead of ``n_sq``).

    ``inner`` the inner product ``<a, b>``; ``ref`` ``‖a‖`` (the reference: ``‖ΔW‖`` or a
    column's ``xn_j``), used only where ``defined`` (a bool mask, e.g. ``ref > 0``);
    ``n_sq`` ``‖b‖²`` or ``norm`` ``‖b‖`` (then ``small`` must be ``"zero"``). The cosine is 0
    where not defined and where ``small`` (see :data:`Small`) says the product counts as
    zero; ``form`` (see :data:`Form`) picks the rounding. Every shape broadcasts.
    """
    if norm is not None:
        if small != "zero":
            raise ValueError(f"a norm given directly takes small='zero', not {small!r}")
        ok = defined & (norm > 0)
        n = norm
    else:
        assert n_sq is not None
        if small == "floor":
            ok = defined
        else:
            ok = defined & (n_sq > (_tol.TINY if small == "zero_tiny" else 0.0))
        if small in ("clamp", "floor"):
            n = torch.sqrt(torch.clamp(n_sq, min=_tol.TINY))
        else:
            n = torch.sqrt(torch.where(ok, n_sq, 1.0))
    den = torch.where(ok, ref * n, 1.0)
    out = Cosine(torch.zeros(()), ok, torch.where(ok, ref, 1.0), n, den)
    if form == "quotient":
        cos = torch.where(ok, inner / den, 0.0)
    elif form == "inverse":
        cos = inner * out.inverse()
    else:
        cos = out.unit(inner) * torch.where(ok, 1.0 / n, 0.0)
    return out._replace(cos=cos)
