"""Simulate the Flower app in-process: ``python -m examples.flower.run --method lora_fair``.

The same app runs with Flower's CLI: ``flwr run examples/flower`` (see README.md here).
"""

from __future__ import annotations

import argparse
import json
import os

from flwr.serverapp.strategy import Result
from flwr.simulation import run_simulation

from examples.flower.lorafair_app.client_app import app as client_app
from examples.flower.lorafair_app.server_app import METHODS, make_server_app, summary

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a ray FutureWarning


def simulate(method: str, *, rounds: int = 3, num_clients: int = 3, backend: str = "ray") -> Result:
    """Run the simulation and return the strategy's Result (global metrics per round)."""
    results: list[Result] = []
    run_config = {"method": method, "num-server-rounds": rounds, "min-nodes": num_clients}
    server = make_server_app(run_config, results=results)
    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=num_clients,
        backend_name=backend,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if not results:
        raise RuntimeError("the simulation finished without a result (see the log above)")
    return results[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=METHODS, default="lora_fair")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--json", help="write the per-round metrics to this file")
    args = parser.parse_args()
    result = simulate(args.method, rounds=args.rounds, num_clients=args.clients)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary(result, method=args.method, seconds=0.0), f, indent=1)
    for rnd, metrics in sorted(result.evaluate_metrics_serverapp.items()):
        print(f"round {rnd}: {dict(metrics)}")
    for rnd, metrics in sorted(result.train_metrics_clientapp.items()):
        print(f"round {rnd} train: bias-cosine-min={metrics.get('bias-cosine-min')}")


if __name__ == "__main__":
    main()
