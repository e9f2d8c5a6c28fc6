"""Private: float64 products with the clients' stacked factors, without stacking them whole.

For one layer with clients' factors ``A_k`` (r_k × d_in) and ``B_k`` (d_out × r_k), the stacks
are ``A_u = cat_k A_k`` (R × d_in) and ``B_s = cat_k B_k`` (d_out × R), R = Σ r_k. LoRA-FAIR
and FlexLoRA's Gram route need, for narrow input dtypes on the CPU, float64 products with them:

- the two Grams ``A_u A_uᵀ`` and ``B_sᵀ B_s`` (R × R, :func:`grams`), and
- thin products ``C A_u`` and ``C B_sᵀ`` with a small ``C`` (k × R, :func:`products`).

Each worker thread of :func:`lorafair._threads.split_map` casts into its own float64 buffer
(exact torch cast-copies) and runs one-thread kernels: for a Gram, a layer's stack
:func:`columns` columns at a time (one cast-copy per client) and a ``syrk`` per block (NumPy's
matmul hands ``X Xᵀ`` to it: half the flops of the general product); for a product, each
client's factor whole and one ``addmm`` per client. All the layers of a call are one list (a
Gram side of two column blocks or more as two items, its halves), largest first, so the workers
run kernels side by side and finish together, and no threaded BLAS call runs (its workers spin
after it and slow torch's next pass: on one Llama-3-8B block, bf16, FedIT's sums inside
``lora_fair`` took 50 ms after such a call against 22 ms on one thread).
Memory: per worker ``R × min(d, columns(R))`` float64 (at most 21 MB up to R = 5120) plus
one R × R block, and one R × R per split side, or for products one client's ``r_k × d``
(7.3 MB at r = 64 on a Llama-3-8B MLP layer), whatever the model's size. Every result is
what one thread computes: the split never changes a bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from lorafair._threads import split_map
from lorafair._validate import Layer, packed

__all__ = ["GRAM_BYTES", "Product", "Slice", "chunks", "grams", "products"]

Side = Literal["A", "B"]

_COLUMNS = 4096
"""Columns of a layer's stack cast into a worker's float64 buffer at a time, at R ≤ 640: the
buffer is ``R × 4096`` (21 MB at R = 640) whatever the layer's width, so a call's fixed
memory stays small beside its input. A longer side's Gram is done in column blocks, as a sum
of the blocks' ``syrk`` in float64 (:func:`products` casts one client's factor whole
instead). No ViT-B/16 layer (d ≤ 3072) is split. On one Llama-3-8B block (bf16, K = 20,
r = 16) ``lora_fair`` ran as fast as with whole-width buffers or faster (131–146 ms against
146–159 ms); 1024 columns were slower (170–190 ms). Beyond R = 640 the block narrows
(:func:`columns`) to keep the buffer's size."""

_BUFFER = 640 * _COLUMNS
"""Float64 elements of a worker's stack buffer (21 MB), whatever R. With half of it (10.5 MB:
819 columns at R = 1600, 1024 at R = 1280) each wide side takes more, narrower blocks: a
narrower ``syrk`` (55 against 61 GFLOP/s at 819 and 2048 columns, R = 1600, one thread) and
one more R × R sum (20 MB at R = 1600) into its side's Gram per block. On one Llama-3-8B
block, bf16, ``lora_fair`` then took 1.07–1.16× as long at K = 50 and 100, r = 16, and
1.04–1.26× at K = 20, r = 64; ``flexlora`` 1.00–1.12× (``python -m benchmarks.against
--commit 98a04a6 --methods lora_fair flexlora``, three rounds each). Each worker holds up to
10.5 MB more than with the half, from R = 320 on, where one Llama-3-8B block's bf16 input is
52 MB or more."""

_MIN_COLUMNS = 512


def columns(rows: int) -> int:
    """Columns per block for a stack of ``rows`` = R rows: ``_COLUMNS`` up to R = 640, then
    ``_BUFFER / R`` (at least ``_MIN_COLUMNS``): 2048 at R = 1280 (K = 20, r = 64), where
    whole 4096-column blocks would cost 42 MB per worker on top of the R × R work."""
    return max(_MIN_COLUMNS, min(_COLUMNS, _BUFFER // max(1, rows)))


def width(layer: Layer, side: Side) -> int:
    """The stack's long side: ``d_in`` for ``A_u``, ``d_out`` for ``B_s``."""
    return layer.d_in if side == "A" else layer.d_out


class _HostBuffer:
    """One worker's reusable float64 buffers: ``flat`` elements for what it casts (for
    :func:`grams` a layer's stack, :func:`columns` columns at a time, the largest
    ``R × min(d, columns(R))`` of the call; for :func:`products` one client's factor), and an
    R × R Gram of one block (``block`` rows, 0 when no side is split)."""

    def __init__(self, flat: int, block: int) -> None:
        self.flat = np.empty(flat)
        self.block = np.empty(block * block)

    def view(self, rows: int, cols: int) -> npt.NDArray[np.float64]:
        """The stack buffer as a contiguous ``rows × cols`` array (at most its own size)."""
        return self.flat[: rows * cols].reshape(rows, cols)

    def gram(self, rows: int) -> npt.NDArray[np.float64]:
        """The block Gram buffer, ``rows × rows``."""
        return self.block[: rows * rows].reshape(rows, rows)


def _stacked_columns(
    layer: Layer, side: Side, host: _HostBuffer, start: int, stop: int
) -> npt.NDArray[np.float64]:
    """Columns ``start:stop`` of ``A_u`` (``side="A"``) or ``B_sᵀ`` (``"B"``), R × (stop − start),
    in ``host``'s buffer: one exact cast-copy per client by torch (a view, no float32 step for
    bfloat16): 2.3× faster than NumPy's cast for A, 1.2× for the transposed B (one Llama-3-8B
    MLP layer, K = 20, one thread)."""
    buf = host.view(sum(layer.ranks), stop - start)
    out = torch.from_numpy(buf)
    row = 0
    for A, B in zip(layer.As, layer.Bs, strict=True):
        rk = A.shape[0]
        out[row : row + rk].copy_((A[:, start:stop] if side == "A" else B[start:stop].mT).detach())
        row += rk
    return buf


def _blocks(d: int, rows: int) -> list[tuple[int, int]]:
    """``[(start, stop), …]``: ``0:d`` in blocks of at most :func:`columns` ``(rows)``."""
    step = columns(rows)
    return [(c, min(d, c + step)) for c in range(0, d, step)]


def _halves(layer: Layer, side: Side) -> list[tuple[int, int]]:
    """The column ranges of one side's Gram items: the whole side, or, from two column blocks
    on, two halves split at a block boundary (the first holds the extra block), whose Grams
    are summed after the run. Fixed by the shape alone, so the sums, and every bit of the
    result, are the same on any number of threads. A lone wide layer (one layer a chunk, at
    K = 100 or r = 64) then gives the workers four items instead of two unequal ones (a
    Llama-3-8B MLP layer: 14336 against 4096 columns)."""
    d = width(layer, side)
    blocks = _blocks(d, sum(layer.ranks))
    if len(blocks) < 2:
        return [(0, d)]
    mid = blocks[(len(blocks) + 1) // 2][0]
    return [(0, mid), (mid, d)]


def _split_sides(layer: Layer) -> int:
    """How many of the layer's two sides :func:`_halves` splits (each holds one more R × R)."""
    return sum(len(_halves(layer, side)) - 1 for side in ("A", "B"))


class _Gram(NamedTuple):
    """The Gram of columns ``start:stop`` of one layer's side, into ``out`` (R × R); for a
    second half (:func:`_halves`), then added to ``into``, the first half's."""

    layer: Layer
    side: Side
    start: int
    stop: int
    out: npt.NDArray[np.float64]
    into: npt.NDArray[np.float64] | None = None

    @property
    def flops(self) -> int:
        return int(self.out.size) * (self.stop - self.start)  # R² d, the symmetric product


class Product(NamedTuple):
    """One layer's thin product ``coef_t @ X`` (k × d) into ``out``, with ``X`` the stack
    ``A_u`` (``side="A"``) or ``B_sᵀ`` (``"B"``), R × d; ``coef_t`` is k × R."""

    layer: Layer
    side: Side
    coef_t: npt.NDArray[np.float64]
    out: npt.NDArray[np.float64]

    @property
    def flops(self) -> int:
        return 2 * int(self.coef_t.size) * int(self.out.shape[1])  # 2 k R d


GRAM_BYTES = 1 << 25
"""The float64 R × R Grams a Gram method holds at a time (32 MiB; the R × R work on them holds
a few times as much while it runs): its layers go through in :func:`chunks` within this, at
least one layer each, counting the extra R × R of each side split in halves. One Llama-3-8B
block at R = 320 (13 MiB of Grams) is one chunk, the whole 8B adapter set fourteen; at K = 20,
r = 64 (R = 1280: 12.5 MiB an R × R, three or four a layer with the halves) a chunk is one
layer.
Without it every layer's Grams and R × R work were alive at once: ``flexlora`` grew by 3.4×
its input on one 8B block at K = 100, r = 16 and 3.9× at K = 20, r = 64."""


class Slice(NamedTuple):
    """Some consecutive layers of one same-shaped group: ``groups[group][start:stop]``."""

    group: int
    layers: list[Layer]


def chunks(groups: Sequence[Sequence[Layer]]) -> list[list[Slice]]:
    """``groups`` (each same-shaped) cut into chunks of at most ``GRAM_BYTES`` of Grams
    (``(2 + s) · 8 R²`` bytes a layer, s of its sides split by :func:`_halves`), in order, at
    least one layer each (:func:`lorafair._validate.packed`). Unlike
    :func:`lorafair._validate.chunked`, which batches one group, a chunk packs several groups
    up to the budget, so the workers of :func:`grams` get layers of every shape side by side
    (one Llama-3-8B block: its four groups in one chunk)."""
    # the two float64 R × R Grams, and one more per side split in halves
    per = [8 * (2 + _split_sides(group[0])) * sum(group[0].ranks) ** 2 for group in groups]
    layers = [(index, layer) for index, group in enumerate(groups) for layer in group]
    out: list[list[Slice]] = []
    for span in packed([per[index] for index, _ in layers], GRAM_BYTES):
        chunk: list[Slice] = []
        for index, layer in layers[span.start : span.stop]:
            if chunk and chunk[-1].group == index:
                chunk[-1].layers.append(layer)
            else:
                chunk.append(Slice(index, [layer]))
        out.append(chunk)
    return out


def grams(groups: Sequence[Sequence[Layer]]) -> list[tuple[Tensor, Tensor]]:
    """Per group of same-shaped CPU layers, ``M_A = A_u A_uᵀ`` and ``M_B = B_sᵀ B_s`` (L, R, R),
    float64, every group's layers in one :func:`~lorafair._threads.split_map` list. A side
    wider than :func:`columns` is summed over its column blocks' Grams, as two items of half
    its blocks each (:func:`_halves`). Cost: ``(d_in + d_out) R²`` flops per layer (the
    symmetric products), one cast-copy of each input, and one more R × R per side split."""
    out: list[tuple[Tensor, Tensor]] = []
    items: list[_Gram] = []
    for layers in groups:
        R = sum(layers[0].ranks)
        MA, MB = np.empty((len(layers), R, R)), np.empty((len(layers), R, R))
        for i, layer in enumerate(layers):
            sides: tuple[tuple[Side, npt.NDArray[np.float64]], ...] = (("A", MA[i]), ("B", MB[i]))
            for side, M in sides:
                halves = _halves(layer, side)
                items.append(_Gram(layer, side, *halves[0], M))
                if len(halves) == 2:
                    items.append(_Gram(layer, side, *halves[1], np.empty((R, R)), into=M))
        out.append((torch.from_numpy(MA), torch.from_numpy(MB)))

    def gram(host: _HostBuffer, it: _Gram) -> None:
        for start, stop in _blocks(it.stop - it.start, it.out.shape[0]):  # mostly one
            x = _stacked_columns(it.layer, it.side, host, it.start + start, it.start + stop)
            if start == 0:
                np.matmul(x, x.T, out=it.out)
            else:
                block = host.gram(x.shape[0])
                np.matmul(x, x.T, out=block)
                np.add(it.out, block, out=it.out)

    # per worker the largest stack block, and one block's R × R where a side is split
    shapes = [(sum(it.layer.ranks), width(it.layer, it.side)) for it in items]
    flat = max((R * min(d, columns(R)) for R, d in shapes), default=0)
    block = max((R for R, d in shapes if d > columns(R)), default=0)
    _run(gram, items, flat, block)
    for it in items:
        if it.into is not None:
            np.add(it.into, it.out, out=it.into)
    return out


def products(items: list[Product]) -> None:
    """Fill every item's ``out = coef_t @ X`` (k × d), all the items in one
    :func:`~lorafair._threads.split_map` list, client by client: ``out += coef_t[:, rows_k]
    @ X_k`` with ``X_k`` the client's ``A_k`` (r_k × d_in) or ``B_kᵀ`` (r_k × d_out), its factor
    cast whole into the worker's float64 buffer (one contiguous cast-copy, no transpose) and one
    single-thread torch product (``addmm``), the long dimension last. Against casting the stack
    in column blocks (a transposing copy for B) and one NumPy ``gemm`` per block, on one
    Llama-3-8B MLP layer (14336 wide, one thread): 1.27–1.65× as fast in bf16 at K = 20,
    r = 8 to 64 and K = 50, r = 16, and 1.25–1.56× in float32, either side (``python
    docs/scripts/products.py``, and ``--dtype float32``). Cost: ``2 k R d`` flops and
    one cast-copy of each client's factor per item; the sum runs over the clients in order, the
    same bits on any number of threads."""

    def times(host: _HostBuffer, it: Product) -> None:
        out = torch.from_numpy(it.out)
        coef_t = torch.from_numpy(it.coef_t)
        d = it.out.shape[1]
        row = 0
        for k, (A, B) in enumerate(zip(it.layer.As, it.layer.Bs, strict=True)):
            rk = A.shape[0]
            if it.side == "A":
                x = torch.from_numpy(host.view(rk, d)).copy_(A.detach())
            else:  # B_k (d × r_k) as it is laid out, then its transpose as a view
                x = torch.from_numpy(host.view(d, rk)).copy_(B.detach()).mT
            if k == 0:
                torch.matmul(coef_t[:, row : row + rk], x, out=out)
            else:
                out.addmm_(coef_t[:, row : row + rk], x)
            row += rk

    # per worker one client's factor: the largest r_k × d of the items
    _run(times, items, max((max(it.layer.ranks) * it.out.shape[1] for it in items), default=0), 0)


_Item = TypeVar("_Item", _Gram, Product)


def _run(
    fn: Callable[[_HostBuffer, _Item], None], items: Sequence[_Item], flat: int, block: int
) -> None:
    """``fn`` over ``items`` on :func:`~lorafair._threads.split_map`, largest first, each worker
    with one :class:`_HostBuffer` of ``flat`` and ``block`` (see there)."""
    if not items:
        return
    order = sorted(items, key=lambda it: -it.flops)  # largest first: the workers end together
    # the thread policy: the items' kernels side by side, each on one thread
    split_map(
        fn,
        order,
        scratch=lambda: _HostBuffer(flat, block),
        flops=sum(it.flops for it in order) / len(order),
    )
