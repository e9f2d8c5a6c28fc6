"""One Flower round at the Llama-3-8B cell: the server's ``aggregate_train`` time, side by side.

The same K replies (peft adapter state dicts of the first ``--blocks`` blocks of Llama-3-8B,
all seven linears, rank r, as :mod:`benchmarks.llm_cells` builds them, each in one
``ArrayRecord`` with its ``num-examples``) go to, round-robin in one run (medians over
``--repeats`` rounds):

- ``FedAvg``: Flower's own ``flwr.serverapp.strategy.FedAvg`` (it averages every array);
- for each of ``--methods`` (registry names, default every registered method; replies whose
  clients share one ``A`` for a method the registry marks ``shared_A``): ``LoRAStrategy(name)``
  (``report_bias=False``: the bias metrics are a diagnostic, another pair of Grams per layer;
  ``--bias`` keeps them) and the method called directly on the decoded factors;
- ``convert``: the message conversion alone with the public functions (decode the K records
  with :func:`lorafair.flower.from_array_record`, split them into factors, encode one result):
  an upper bound of what the strategy adds around its aggregator (the strategy reads the
  records in place, one copy less);
- the compute floor of :mod:`benchmarks.llm_cells` (the two float64 Grams per layer at the
  measured dgemm rate of torch's product, the faster of all threads and one).

It prints each time and, by the registry's ``floor`` of each method, ``LoRAStrategy(name) /
FedAvg`` (``"memory"``; goal ≤ 1) or ``LoRAStrategy(name) / (1.5 × compute floor + convert)``
(``"gram"``; goal ≤ 1: the compute goal plus the message conversion) and ``name / compute
floor``. Flower's ``ArrayRecord`` goes through NumPy, which has no bfloat16, so
FedAvg cannot read bfloat16 replies (``tests/interop/test_llm_example.py``): the replies are
float32 (``--dtype bfloat16`` times the two LoRA strategies alone, on
:func:`lorafair.flower.to_array_record`'s bit-exact encoding).

    python -m benchmarks.flower_round [--blocks 4] [--K 20] [--r 16] [--repeats 5]
                                      [--methods NAME ...]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.llm_cells import gram_flops, input_bytes, make_cell, measure_floors
from lorafair import registry
from lorafair.bench.cli import add_methods_argument
from lorafair.flower import LoRAStrategy, from_array_record, to_array_record
from lorafair.interop.peft import from_peft_state_dict, to_peft_state_dict
from lorafair.types import LoRAFactors

Clients = list[dict[str, LoRAFactors]]


def _state_dict(client: dict[str, LoRAFactors]) -> dict[str, torch.Tensor]:
    """peft's saved format: ``base_model.model.<layer>.lora_A.weight`` / ``lora_B.weight``."""
    out: dict[str, torch.Tensor] = {}
    for name, (A, B) in client.items():
        out[f"base_model.model.{name}.lora_A.weight"] = A
        out[f"base_model.model.{name}.lora_B.weight"] = B
    return out


def replies(clients: Clients) -> list[Message]:
    """One train reply per client, weights ``num-examples`` = 64 + k."""
    # Flower 1.42 stamps every Message with the current task; a SuperNode would set it
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    out = []
    for k, c in enumerate(clients):
        content = RecordDict(
            {
                "arrays": to_array_record(_state_dict(c)),
                "metrics": MetricRecord({"num-examples": 64 + k}),
            }
        )
        msg = Message(content=content, dst_node_id=k + 1, message_type="train")
        out.append(Message(content=content, reply_to=msg))
    return out


def _round(name: str, inbox: list[Message], *, bias: bool) -> object:
    """One ``aggregate_train`` of a fresh ``LoRAStrategy(name)`` (no state from earlier calls)."""
    return LoRAStrategy(name, report_bias=bias).aggregate_train(1, inbox)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--K", type=int, default=20)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bias", action="store_true", help="keep the strategies' bias metrics")
    add_methods_argument(ap, default=registry.names(), what="registered methods")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    specs = [registry.get(n) for n in a.methods]
    clients = make_cell(a.blocks, a.K, a.r, dtype)
    msgs = replies(clients)
    shared = make_cell(a.blocks, a.K, a.r, dtype, shared_A=True, seed=1)
    shared_msgs = replies(shared) if any(s.shared_A for s in specs) else []
    weights = [64.0 + k for k in range(a.K)]
    n = input_bytes(clients)
    print(
        f"Flower round, Llama-3-8B × {a.blocks} blocks ({len(clients[0])} layers), K={a.K}, "
        f"r={a.r}, {a.dtype}, {n / 1e6:.0f} MB of factors; torch threads "
        f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}; "
        f"load {os.getloadavg()[0]:.2f}"
    )

    def convert() -> None:
        sds = [from_array_record(m.content.array_records["arrays"]) for m in msgs]
        splits = [from_peft_state_dict(sd) for sd in sds]
        to_array_record(to_peft_state_dict(splits[0].factors, like=splits[0]))

    strategies: dict[str, Callable[[], object]] = {}
    direct: dict[str, Callable[[], object]] = {}
    for spec in specs:
        inbox, factors = (shared_msgs, shared) if spec.shared_A else (msgs, clients)
        strategies[f"LoRAStrategy({spec.name})"] = functools.partial(
            _round, spec.name, inbox, bias=a.bias
        )
        direct[spec.name] = functools.partial(spec.fn, factors, weights, **spec.defaults)
    runs: dict[str, Callable[[], object]] = {**strategies, "convert": convert, **direct}
    if dtype == torch.float32:
        runs = {"FedAvg": lambda: FedAvg().aggregate_train(1, msgs), **runs}
    probes = measure_floors(n, a.K * a.r)
    for fn in runs.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    rates: list[float] = []
    for _ in range(a.repeats):  # the faster of all threads and one, as in llm_cells
        rates.append(max(probes["dgemm"](), probes["dgemm 1 thread"]()))
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = gram_flops(clients) / statistics.median(rates)
    for k, t in med.items():
        print(f"{k:24s} {t * 1e3:8.1f} ms")
    print(f"compute floor            {floor * 1e3:8.1f} ms")
    goal = 1.5 * floor + med["convert"]
    for spec in specs:
        strategy_s = med[f"LoRAStrategy({spec.name})"]
        if spec.floor == "memory" and "FedAvg" in med:
            ratio = strategy_s / med["FedAvg"]
            print(f"LoRAStrategy({spec.name}) / FedAvg = {ratio:.2f} (goal ≤ 1)")
        elif spec.floor == "gram":
            ratio = strategy_s / goal
            print(f"LoRAStrategy({spec.name}) / (1.5 × floor + convert) = {ratio:.2f} (goal ≤ 1)")
            print(f"{spec.name} / compute floor = {med[spec.name] / floor:.2f}")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
