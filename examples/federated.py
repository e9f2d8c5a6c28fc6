"""Federated LoRA fine-tuning of timm ViT / MLP-Mixer with lorafair's aggregators.

Offline default (no downloads): small ViT and Mixer pre-trained in-process on a digits source task,
then federated LoRA on six digit-style domains, every method of ``examples.methods.SIDES``. Real
setup: ``--setup domainnet|nico --data-root DIR --weights FILE``. ``python -m examples.federated
--help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from examples.data import (
    ClientData,
    Domain,
    digits_domains,
    feature_label_noniid,
    feature_noniid,
    load_domainnet,
    load_nico,
)
from examples.jobs import Job, Tick, available_cpus, run_jobs
from examples.loop import FedConfig, MethodResult, run_method
from examples.methods import METHODS
from examples.report import accuracy_table, all_finite, write_outputs

__all__ = ["build_parser", "main"]

log = logging.getLogger("examples.federated")

# Per-setup defaults for flags left unset: the paper's values for the real datasets, and values
# that make the small offline models learn within the time budget (all methods, both models,
# three seeds in a few minutes on 2 cores; see examples/README.md for the measured time).
_SETUP_DEFAULTS: dict[str, dict[str, Any]] = {
    "offline": {
        "rounds": 6,
        "lr": 0.3,
        "batch_size": 32,
        "rank": 8,
        "local_iters": 1,
        "pretrain_epochs": 30,
        "models": ["vit", "mixer"],
        "pretrain_styles": None,
    },
    "domainnet": {"rounds": 50, "lr": 0.01, "batch_size": 128, "rank": 16},
    "nico": {"rounds": 30, "lr": 0.01, "batch_size": 128, "rank": 16},
}
# Offline presets override the offline defaults (flags given explicitly still win). "bias": a
# setting where FedIT's B̄Ā departs from ΔW: five times the local work (5 epochs a round) and a
# stronger feature shift (the base model is pre-trained on clean digits only, so five of the six
# client styles are unseen). A larger learning rate was tried and diverged (lr 0.5: FedIT's loss
# 8.8 then 14.3, chance accuracy), so the lr stays 0.3. Chosen for the size of the bias alone,
# never for which method wins; ViT only and 4 rounds, to keep its run near the default's time.
_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "bias": {
        "local_iters": 5,
        "rounds": 4,
        "models": ["vit"],
        "pretrain_styles": ("clean",),
    },
}
_CLASSES = {"domainnet": 100, "nico": 60, "offline": 10}


def _csv(choices: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the example (defaults that depend on --setup are shown as such)."""
    p = argparse.ArgumentParser(
        prog="python -m examples.federated",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data and models")
    g.add_argument(
        "--setup",
        choices=["offline", "domainnet", "nico"],
        default="offline",
        help="offline: digits domains + small in-process pre-trained models",
    )
    g.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder with <domain>/<class>/<image> (required for domainnet, nico)",
    )
    g.add_argument(
        "--models",
        type=_csv(["vit", "mixer"]),
        default=None,
        help="comma-separated: vit, mixer (default both; --preset bias: vit)",
    )
    g.add_argument(
        "--preset",
        choices=list(_PRESETS),
        default="default",
        help="offline only; bias: 5x the local work and a stronger feature shift, "
        "where FedIT's B̄Ā departs from ΔW (see examples/README.md)",
    )
    g.add_argument(
        "--vit-name",
        default="vit_base_patch16_224.augreg_in21k",
        help="timm model name for --setup domainnet/nico",
    )
    g.add_argument(
        "--mixer-name",
        default="mixer_b16_224.goog_in21k",
        help="timm model name for --setup domainnet/nico",
    )
    g.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="[MODEL=]PATH",
        help="local weights file for timm (pretrained_cfg_overlay file=); "
        "'vit=PATH' / 'mixer=PATH', or a bare PATH with one model; "
        "without it the local Hugging Face cache is used",
    )
    g.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="input resolution (default: 16 offline, the weights' own otherwise)",
    )
    g.add_argument(
        "--pretrain-epochs",
        type=int,
        default=None,
        help="offline only: epochs of in-process pre-training on the source digits (30)",
    )
    g.add_argument(
        "--max-train-per-domain",
        type=int,
        default=None,
        help="offline only: cap on training images per domain (smoke tests)",
    )
    g.add_argument(
        "--max-test-per-domain",
        type=int,
        default=None,
        help="offline only: cap on test images per domain (smoke tests)",
    )
    g = p.add_argument_group("federation")
    g.add_argument(
        "--methods",
        type=_csv(METHODS),
        default=list(METHODS),
        help="comma-separated subset of " + ",".join(METHODS),
    )
    g.add_argument(
        "--partition",
        choices=["feature", "feature_label"],
        default="feature",
        help="feature: 6 clients, one domain each; feature_label: 5 clients per "
        "domain with Dirichlet label skew",
    )
    g.add_argument("--clients-per-domain", type=int, default=5, help="feature_label only")
    g.add_argument("--dirichlet-alpha", type=float, default=0.5, help="feature_label only")
    g.add_argument(
        "--clients-per-round",
        type=int,
        default=None,
        help="default: all (feature), 18 (feature_label)",
    )
    g.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="default: 50 domainnet, 30 nico, 6 offline (4 with --preset bias)",
    )
    g.add_argument(
        "--local-iters",
        type=int,
        default=None,
        help="local iterations per round; default 2 (feature), 5 (feature_label); "
        "offline 1 (5 with --preset bias)",
    )
    g.add_argument(
        "--local-unit",
        choices=["epochs", "steps"],
        default="epochs",
        help="what one local iteration is: a pass over the client's data or one "
        "SGD step (the paper says 'iterations'; see examples/README.md)",
    )
    g = p.add_argument_group("optimisation and LoRA")
    g.add_argument("--batch-size", type=int, default=None, help="default: 128 (paper), 32 offline")
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="SGD lr; default 0.01 (paper), 0.3 offline",
    )
    g.add_argument("--momentum", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument(
        "--rank",
        type=int,
        choices=[4, 8, 16, 32],
        default=None,
        help="LoRA rank; default 16 (paper), 8 offline",
    )
    g.add_argument(
        "--lora-alpha",
        type=float,
        default=None,
        help="LoRA alpha; scaling alpha/rank; default alpha = rank (scaling 1)",
    )
    g.add_argument("--lam", type=float, default=0.01, help="LoRA-FAIR's λ")
    g.add_argument(
        "--residual-on", choices=["A", "B"], default="B", help="LoRA-FAIR residual position"
    )
    g.add_argument(
        "--flexlora-split",
        choices=["balanced", "left"],
        default="balanced",
        help="how FlexLoRA splits the singular values between B and A",
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="first seed; it also fixes the data split and the offline pre-training",
    )
    g.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="number of seeds (seed, seed+1, ...): every method runs on each, with the same "
        "LoRA/head initialisation and client SGD order; results report mean ± std and paired "
        "intervals over them",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if any)")
    g.add_argument(
        "--workers",
        type=int,
        default=4,
        help="DataLoader workers for image folders (offline data is in memory)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; default 1 offline (tiny models gain nothing from "
        "more and lose a lot on a busy machine), torch's default otherwise",
    )
    g.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes for the independent runs (one per model, seed and method), each on "
        "--threads threads; default: every CPU offline on the CPU, else 1. Results do not "
        "depend on it",
    )
    g.add_argument("--out", type=Path, default=None, help="output folder; default runs/<UTC time>")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    return p


class _TqdmHandler(logging.Handler):
    """Log lines printed above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _weights_map(entries: Sequence[str], models: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for e in entries:
        key, sep, path = e.partition("=")
        if sep and key in ("vit", "mixer"):
            out[key] = Path(path)
        elif len(models) == 1:
            out[models[0]] = Path(e)
        else:
            raise SystemExit(f"--weights {e!r}: with several models write vit=PATH or mixer=PATH")
    return out


def _seed_everything(seed: int) -> None:
    # Every random draw of the example takes an explicit seeded generator; these global seeds
    # only cover third-party code (timm's weight init) that draws from the global state.
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    torch.manual_seed(seed)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Run the experiment; returns the paths of the files written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.preset != "default" and args.setup != "offline":
        parser.error("--preset applies to --setup offline only")
    d = {**_SETUP_DEFAULTS[args.setup], **_PRESETS[args.preset]}
    if args.models is None:
        args.models = list(d.get("models", ["vit", "mixer"]))
    if args.pretrain_epochs is None:
        args.pretrain_epochs = d.get("pretrain_epochs", 30)
    rounds = args.rounds if args.rounds is not None else d["rounds"]
    lr = args.lr if args.lr is not None else d["lr"]
    batch_size = args.batch_size if args.batch_size is not None else d["batch_size"]
    rank = args.rank if args.rank is not None else d["rank"]
    alpha = args.lora_alpha if args.lora_alpha is not None else float(rank)
    feature_only = args.partition == "feature"
    default_iters = d.get("local_iters", 2 if feature_only else 5)
    local_iters = args.local_iters if args.local_iters is not None else default_iters
    per_round = args.clients_per_round
    if per_round is None and not feature_only:
        per_round = 18
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = args.threads or (1 if args.setup == "offline" else None)
    if threads:
        torch.set_num_threads(threads)
    out: Path = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)

    handlers: list[logging.Handler] = [
        _TqdmHandler() if not args.no_progress else logging.StreamHandler(sys.stderr),
        logging.FileHandler(out / "log.txt", mode="w"),
    ]
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return _run(
            args,
            out,
            device,
            rounds,
            lr,
            batch_size,
            rank,
            alpha,
            local_iters,
            per_round,
            d.get("pretrain_styles"),
        )
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()


def _run(
    args: argparse.Namespace,
    out: Path,
    device: str,
    rounds: int,
    lr: float,
    batch_size: int,
    rank: int,
    alpha: float,
    local_iters: int,
    per_round: int | None,
    pretrain_styles: Sequence[str] | None,
) -> dict[str, Path]:
    from examples import models as M  # timm from here on

    methods: list[str] = list(args.methods)
    jobs = args.jobs or (available_cpus() if args.setup == "offline" and device == "cpu" else 1)
    seeds = [args.seed + i for i in range(args.seeds)]
    _seed_everything(args.seed)
    num_classes = _CLASSES[args.setup]
    weights = _weights_map(args.weights, args.models)
    bases: dict[str, torch.nn.Module] = {}
    domains_for: dict[str, list[Domain]] = {}
    t0 = time.perf_counter()
    if args.setup == "offline":
        img = args.img_size or 16
        pre, domains = digits_domains(
            size=img,
            max_train_per_domain=args.max_train_per_domain,
            max_test_per_domain=args.max_test_per_domain,
            seed=args.seed,
            **({"pretrain_styles": pretrain_styles} if pretrain_styles else {}),
        )
        for arch in args.models:
            if arch in weights:
                raise SystemExit("--weights applies to --setup domainnet/nico only")

        def pretrain_job(arch: str, tick: Tick) -> torch.nn.Module:
            base = M.build_offline(cast(M.Arch, arch), num_classes=10, img_size=img, seed=args.seed)
            acc = M.pretrain(base, pre, epochs=args.pretrain_epochs, seed=args.seed, device=device)
            log.info(
                "pre-trained %s on %d source digits: train accuracy %.1f%% (%.1fs)",
                arch,
                len(pre),
                acc,
                time.perf_counter() - t0,
            )
            return base.cpu()

        trained = run_jobs(
            pretrain_job,
            [Job(f"pre-train {arch}", arch) for arch in args.models],
            processes=jobs,
            threads=torch.get_num_threads(),
            on_tick=lambda job, t: None,
            logger=log,
        )
        for arch, base in zip(args.models, trained, strict=True):
            bases[arch] = base
            domains_for[arch] = domains
    else:
        if args.data_root is None:
            raise SystemExit(f"--setup {args.setup} needs --data-root")
        loader = load_domainnet if args.setup == "domainnet" else load_nico
        for arch in args.models:
            name = args.vit_name if arch == "vit" else args.mixer_name
            kw = {"img_size": args.img_size} if args.img_size else {}
            base = M.build_pretrained(
                name, num_classes=num_classes, weights=weights.get(arch), **kw
            )
            size, mean, std = M.data_config(base)
            size = args.img_size or size  # the weights' config still names their own size
            bases[arch] = base
            domains_for[arch] = loader(
                args.data_root, size=size, mean=mean, std=std, seed=args.seed
            )
            log.info("loaded %s (%s) and %s", arch, name, args.data_root)

    cfg = FedConfig(
        rounds=rounds,
        local_iters=local_iters,
        local_unit=args.local_unit,
        batch_size=batch_size,
        lr=lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        rank=rank,
        clients_per_round=per_round,
        lam=args.lam,
        residual_on=args.residual_on,
        flexlora_split=args.flexlora_split,
        seed=args.seed,
        device=device,
        workers=0 if args.setup == "offline" else args.workers,
    )
    config = {
        **vars(args),
        **cfg.__dict__,
        "alpha": alpha,
        "num_classes": num_classes,
        "seed_list": seeds,
        "pretrain_styles": list(pretrain_styles or ["all six"]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "jobs": jobs,
    }
    domain_names: list[str] = []
    work: list[Job[tuple[str, int, str]]] = []
    inputs: dict[str, tuple[list[ClientData], dict[str, Any]]] = {}
    for arch in args.models:
        domains = domains_for[arch]
        domain_names = [dm.name for dm in domains]
        if args.partition == "feature":
            clients = feature_noniid(domains)
        else:
            clients = feature_label_noniid(
                domains,
                clients_per_domain=args.clients_per_domain,
                alpha=args.dirichlet_alpha,
                seed=args.seed,
            )
        log.info("%s: %d clients, sizes %s", arch, len(clients), [len(c) for c in clients])
        inputs[arch] = (list(clients), {dm.name: dm.test for dm in domains})
        for i, seed in enumerate(seeds):
            for m in methods:
                work.append(Job(f"{arch} seed {i + 1}/{len(seeds)} {m}", (arch, seed, m)))

    def run_job(job: tuple[str, int, str], tick: Tick) -> MethodResult:
        arch, seed, m = job
        clients, tests = inputs[arch]
        make = partial(
            M.with_lora,
            bases[arch],
            cast(M.Arch, arch),
            num_classes=num_classes,
            rank=rank,
            alpha=alpha,
            seed=seed,
            merge_when_training=args.setup == "offline",
        )
        label = f"{arch} seed {seed} "
        return run_method(
            m, make, clients, tests, replace(cfg, seed=seed), label=label, on_round=tick
        )

    bar: Any = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(work) * rounds, unit="round", dynamic_ncols=True, file=sys.stderr)
        bar.set_description(f"{len(work)} runs on {min(jobs, len(work))} processes")

    def on_tick(job: Job[tuple[str, int, str]], t: int) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{job.label} round {t + 1}/{rounds}")

    finished = run_jobs(
        run_job, work, processes=jobs, threads=torch.get_num_threads(), on_tick=on_tick, logger=log
    )
    if bar is not None:
        bar.close()
    results: dict[str, dict[str, list[MethodResult]]] = {
        arch: {m: [] for m in methods} for arch in args.models
    }
    for job, run in zip(work, finished, strict=True):
        arch, _, m = job.payload
        results[arch][m].append(run)
    paths = write_outputs(results, domain_names, out, config=config, plots=not args.no_plots)
    if not all_finite(results):
        log.warning("some accuracies or diagnostics are not finite; see %s", paths["json"])
    print(accuracy_table(results, domain_names))
    log.info("done in %.1fs; outputs in %s", time.perf_counter() - t0, out)
    (out / "files.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return paths


if __name__ == "__main__":
    main()
