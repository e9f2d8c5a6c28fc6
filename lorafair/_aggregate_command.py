"""``lorafair aggregate``: K peft adapter folders in, the aggregated folder(s) out.

The work is :func:`lorafair.interop.peft_aggregate.aggregate_adapters` and
:func:`~lorafair.interop.peft_aggregate.write_aggregated`; this module parses, times, shows
progress and prints ``cos(BA, ΔW)`` beside FedIT's.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from lorafair import registry
from lorafair.errors import AdapterFolderError, InvalidWeightsError, LoRAShapeError
from lorafair.types import LoRAFactors

__all__ = ["register", "run"]

_MAX_LAYER_LINES = 12
"""Up to this many layers, one line each; beyond, a summary (min, mean, worst layer)."""

_EXCESS_RANK_OPTION = "--option allow_excess_rank=True"
"""How this command passes the aggregators' ``allow_excess_rank=True``."""

_DESCRIPTION = """\
Aggregate K peft LoRA adapter folders (as save_pretrained writes them) with one lorafair
method, and write the result as a folder that PeftModel.from_pretrained loads.

Scaling: peft applies s·B@A (s = lora_alpha/r, /√r with rsLoRA, per rank_pattern /
alpha_pattern). If every client has the same s on every layer, the method runs on the stored
factors; otherwise each client's s is folded into its B first (the update its model
applied). The output keeps client 0's config and per-layer s, with r / rank_pattern /
alpha_pattern fitted to the result's ranks, and the dtype (bf16 in, bf16 out).
modules_to_save weights are averaged with the weights (each client keeps its own under
fedsa_lora); DoRA, embedding LoRA, LoRA biases and other keys are refused by name."""


def _epilog() -> str:
    from lorafair.interop.peft_aggregate import RESIDUAL_FILE, WRITES, method_options

    lines = ["methods (what each writes; --option KEY=VALUE choices):"]
    for spec in registry.specs():
        opts = [o for o in method_options(spec.name) if o != "allow_excess_rank"]
        lines.append(f"  {spec.name:<16} {spec.summary}")
        lines.append(f"  {'':<16} writes {WRITES[spec.output]}")
        if spec.shared_A:
            shared = _frozen(opts)
            lines.append(f"  {'':<16} needs every client to share the frozen factor ({shared})")
        if opts:
            defaults = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
            extra = f" (defaults: {defaults})" if defaults else ""
            lines.append(f"  {'':<16} options: {', '.join(opts)}{extra}")
    lines += [
        "",
        f"fedex_lora: fold {RESIDUAL_FILE} into the base weights, then load the adapter:",
        "  from safetensors.torch import load_file",
        "  from peft import PeftModel",
        f"  res = load_file('OUT/{RESIDUAL_FILE}')",
        "  with torch.no_grad():",
        "      for name, module in base.named_modules():",
        "          if f'{name}.residual_A' in res:",
        "              A = res[f'{name}.residual_A'].double()",
        "              B = res[f'{name}.residual_B'].double()",
        "              module.weight += (B @ A).to(module.weight.dtype)  # .T: fan_in_fan_out",
        "  model = PeftModel.from_pretrained(base, 'OUT')",
        "",
        "examples:",
        "  lorafair aggregate --method lora_fair --out global c0 c1 c2",
        "  lorafair aggregate --method flexlora --option rank=0.99 --weights 120,80 --out g c0 c1",
        "",
        "exit status: 0 done; 2 bad input (one line naming file, layer and client; nothing",
        "written); 1 internal error.",
    ]
    return "\n".join(lines)


def _frozen(options: Sequence[str]) -> str:
    """Which factor a shared-A method's clients share, from its options."""
    if "frozen" in options:
        return "the one frozen=A|B names, A by default"
    if "trained" in options:
        return "the one not trained: A when trained=B, the default"
    return "A"


def register(subparsers: Any) -> None:
    """Add the ``aggregate`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "aggregate",
        help="aggregate peft adapter folders with one method",
        description=_DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--method", required=True, choices=registry.names(), metavar="NAME", help="see below"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--weights",
        metavar="W1,W2,...",
        help="the clients' example counts, in folder order (default: equal)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword option of the method (repeatable), e.g. lam=0.01, rank=8, trained=A",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("folders", nargs="+", metavar="DIR", help="the clients' adapter folders")
    parser.set_defaults(run=run)


def _weights(text: str | None, k: int) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise InvalidWeightsError(f"--weights {text!r}: expected numbers W1,W2,...") from None
    if len(values) != k:
        raise InvalidWeightsError(f"--weights has {len(values)} values for {k} folders")
    for i, w in enumerate(values):
        if not math.isfinite(w) or w < 0:
            raise InvalidWeightsError(f"--weights: client {i} has weight {w}")
    return values


class _Progress:
    """tqdm if installed (shown only after 2 s, only on a terminal); a no-op otherwise."""

    def __init__(self, total: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar: Any = None
        else:
            self._bar = tqdm(total=total, delay=2.0, disable=None, leave=False, unit="step")

    def step(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_description(what, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def _progress(total: int) -> Iterator[_Progress]:
    bar = _Progress(total)
    try:
        yield bar
    finally:
        bar.close()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _report(
    method: str,
    cosine: dict[str, float] | None,
    fedit_cosine: dict[str, float] | None,
    *,
    padded: bool,
) -> list[str]:
    """``cos(BA, ΔW)`` per layer (or its min and mean over many layers), one column per table
    given: the method's (None for a personalised method) and FedIT's (None for FedIT itself,
    whose column would repeat the method's)."""
    from lorafair.interop.peft import _module_key

    columns = [(label, t) for label, t in ((method, cosine), ("fedit", fedit_cosine)) if t]
    if not columns:
        return []
    names = list(columns[0][1])
    head = f"cos(BA, ΔW): {method}" + (" vs FedIT" if fedit_cosine else "")
    if padded and fedit_cosine:
        head += " (FedIT on clients zero-padded to the largest rank)"
    if cosine is None:
        head += f" ({method} is personalised: no global update)"
    if len(names) <= _MAX_LAYER_LINES:
        width = max(len(_module_key(n)) for n in names)
        lines = [head, f"  {'layer':<{width}}" + "".join(f"  {lb:>12}" for lb, _ in columns)]
        lines += [
            f"  {_module_key(n):<{width}}" + "".join(f"  {t[n]:>12.6f}" for _, t in columns)
            for n in names
        ]
        return lines
    lines = [head + f", over {len(names)} layers:"]
    for label, table in columns:
        worst = min(table, key=lambda n: table[n])
        lines.append(
            f"  {label:<12} min {table[worst]:.6f}  mean {statistics.fmean(table.values()):.6f}"
            f"  (worst: {_module_key(worst)})"
        )
    return lines


def _excess_rank_note(adapters: Sequence[Mapping[str, LoRAFactors]]) -> str | None:
    """A note when some written layer's rank exceeds both its d_in and d_out (a FlexLoRA
    ``rank`` above a small layer's size, or clients that already had such a rank): reading the
    folder back as a client refuses that rank unless told."""
    from lorafair.interop.peft import _module_key

    wide = [
        (name, A.shape[0], A.shape[1], B.shape[0])
        for written in adapters
        for name, (A, B) in written.items()
        if A.shape[0] > A.shape[1] and A.shape[0] > B.shape[0]
    ]
    if not wide:
        return None
    name, r, d_in, d_out = wide[0]
    return (
        f"note: {_count(len(wide), 'layer')} written with a rank above both d_in and d_out "
        f"({_module_key(name)}: rank {r}, d_in {d_in}, d_out {d_out}); to aggregate the "
        f"output again as a client, pass {_EXCESS_RANK_OPTION}"
    )


def run(args: argparse.Namespace) -> int:
    """Read, aggregate, write, report. Raises :class:`~lorafair.errors.LoRAFairError` on bad
    input, before anything is written."""
    from lorafair._validate import EXCESS_RANK_HINT
    from lorafair.interop.peft import _check_output_folder, read_adapter
    from lorafair.interop.peft_aggregate import (
        WRITES,
        aggregate_adapters,
        parse_option,
        write_aggregated,
    )

    start = time.perf_counter()
    folders: Sequence[str] = args.folders
    out: str = args.out
    for folder in folders:
        if _same(folder, out):
            raise AdapterFolderError(f"--out {out} is also an input folder")
    _check_output_folder(out, force=args.force, hint="pass --force")
    weights = _weights(args.weights, len(folders))
    options = dict(parse_option(args.method, item) for item in args.option)
    with _progress(len(folders) + 2) as bar:
        adapters = []
        for k, folder in enumerate(folders):
            adapters.append(read_adapter(folder, client=k))
            bar.step(f"read client {k}")
        read_s = time.perf_counter() - start
        t = time.perf_counter()
        try:
            result = aggregate_adapters(
                adapters, method=args.method, weights=weights, options=options
            )
        except LoRAShapeError as exc:  # the hint as this command's option
            hint = EXCESS_RANK_HINT.replace("allow_excess_rank=True", _EXCESS_RANK_OPTION)
            raise type(exc)(str(exc).replace(EXCESS_RANK_HINT, hint)) from None
        bar.step(args.method)
        agg_s = time.perf_counter() - t
        t = time.perf_counter()
        try:
            written = write_aggregated(out, result, adapters, force=args.force)
        except OSError as exc:
            raise AdapterFolderError(f"{out}: cannot write: {exc}") from None
        bar.step("write")
        write_s = time.perf_counter() - t
    spec = registry.get(args.method)
    layers = len(adapters[0].factors)
    print(
        f"{args.method}: {_count(len(adapters), 'client')}, {_count(layers, 'layer')}, "
        f"{adapters[0].dtype}" + ("; scalings differ, folded into B first" if result.folded else "")
    )
    padded = any(len({a.factors[n].A.shape[0] for a in adapters}) > 1 for n in adapters[0].factors)
    fedit_cosine = None if args.method == "fedit" else result.fedit_cosine
    for line in _report(args.method, result.cosine, fedit_cosine, padded=padded):
        print(line)
    total = time.perf_counter() - start
    print(
        f"wrote {WRITES[spec.output]}: {', '.join(written)}"
        + (" (+ residual file)" if result.residual is not None else "")
    )
    note = _excess_rank_note(result.adapters)
    if note is not None:
        print(note)
    print(
        f"time: {total:.2f} s (read {read_s:.2f} s, aggregate and cos {agg_s:.2f} s, "
        f"write {write_s:.2f} s)"
    )
    return 0
