"""Run the Flower App on Flower's Deployment Engine, all on this machine, and report each round.

    python -m examples.flower.deploy --supernodes 3 --rounds 2
    python -m examples.flower.deploy --kill-node 2   # then a second run that crashes node 2

Starts a real ``flower-superlink`` and ``flower-supernode`` processes (insecure, bound to
127.0.0.1 on free ports, Flower's state in a temporary ``FLWR_HOME``), submits the app with
``flwr run examples/flower <connection>``, waits for the ServerApp's result and stops every
process it started, by process id, whatever happens. With ``--kill-node k`` a second run on
the same federation sends SIGKILL to SuperNode k (and its ClientApp processes) as soon as that
node receives its first train message: the SuperLink marks the node unavailable after two
missed heartbeats (Flower 1.42: 2 × 30 s) and answers its message with an error reply, so the
round completes with the other replies, as Flower's FedAvg handles failures (or earlier, with
the remaining replies, if ``round-timeout`` expires first), and later rounds go on without it.

The same commands, on separate machines, are in /README's "Running across machines".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, NamedTuple

import psutil

APP = Path(__file__).resolve().parent
ROOT = APP.parents[1]
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"


class DeploymentError(RuntimeError):
    """The Deployment Engine could not start or the run did not finish; says which and why."""


class RunSpec(NamedTuple):
    """One ``flwr run`` on the federation; ``kill_node``: the SuperNode to crash in round 1.

    ``checkpoint_dir``: the ServerApp's ``checkpoint-dir`` (empty: none); ``resume``: continue
    from its latest checkpoint; ``kill_superlink_after``: SIGKILL the SuperLink and everything
    it started (the ServerApp included), by pid, once round k's checkpoint is written; the run
    then has no result and the federation is down (make it the deployment's last run).
    """

    rounds: int = 2
    method: str = "lora_fair"
    kill_node: int | None = None
    round_timeout: float = 3600.0
    checkpoint_dir: str = ""
    resume: bool = False
    kill_superlink_after: int | None = None


class RunResult(NamedTuple):
    """A finished run: the ServerApp's result (per-round metrics) and its log (``flwr log``)."""

    spec: RunSpec
    result: dict[str, Any]
    log: str
    seconds: float


class Deployment(NamedTuple):
    """Every run, when each phase ended (seconds since the start) and where the logs are."""

    runs: list[RunResult]
    seconds: dict[str, float]
    logs: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class _Processes:
    """Every process started here and every descendant seen, stopped by pid at the end."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.seen: dict[int, psutil.Process] = {}
        self._files: list[IO[bytes]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        out = (self.logs / f"{name}.log").open("wb")
        self._files.append(out)
        proc = subprocess.Popen(  # own process group: a kill reaches its children
            argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started[name] = proc
        self.seen[proc.pid] = psutil.Process(proc.pid)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def track(self) -> None:
        """Remember the descendants now alive (Flower detaches some into new sessions)."""
        for proc in list(self.seen.values()):
            try:
                for child in proc.children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except psutil.Error:
                continue

    def orphans(self) -> None:
        """Also remember processes that left the tree (ray daemonises its workers) but carry
        this deployment's own FLWR_HOME, so they were started here."""
        home = self.env["FLWR_HOME"]
        for proc in psutil.process_iter():
            try:
                if proc.pid not in self.seen and proc.environ().get("FLWR_HOME") == home:
                    self.seen[proc.pid] = proc
            except psutil.Error:
                continue

    def kill_tree(self, name: str) -> None:
        """SIGKILL ``name`` and every descendant of it (a crash, not a shutdown)."""
        root = self.seen[self.started[name].pid]
        try:
            victims = [root, *root.children(recursive=True)]
        except psutil.Error:
            victims = [root]
        for proc in victims:
            self.seen.setdefault(proc.pid, proc)
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                continue
        self.started[name].wait(timeout=10)

    def stop_all(self, grace: float = 10.0) -> list[int]:
        """SIGTERM every process seen, SIGKILL what is left after ``grace``; the pids killed."""
        self.track()
        self.orphans()
        alive = [p for p in self.seen.values() if _alive(p)]
        for proc in alive:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                continue
        _, still = psutil.wait_procs(alive, timeout=grace)
        for proc in still:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                continue
        psutil.wait_procs(still, timeout=grace)
        for popen in self.started.values():  # reap our direct children
            with suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=grace)
        for f in self._files:
            f.close()
        return [p.pid for p in still]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait(what: str, ready: Any, deadline: float, procs: _Processes, poll: float = 0.25) -> Any:
    while time.monotonic() < deadline:
        procs.track()
        for name, popen in procs.started.items():
            if popen.poll() is not None and not name.startswith("killed-"):
                tail = procs.log(name)[-3000:]
                raise DeploymentError(
                    f"{name} exited with {popen.returncode} while {what}:\n{tail}"
                )
        value = ready()
        if value:
            return value
        time.sleep(poll)
    raise DeploymentError(f"timed out while {what}")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/health", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _flwr(procs: _Processes, *args: str, timeout: float = 120) -> str:
    cmd = [str(BIN / "flwr"), *args]
    done = subprocess.run(
        cmd, env=procs.env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise DeploymentError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def _connected_nodes(procs: _Processes) -> int:
    out = json.loads(_flwr(procs, "supernode", "ls", "deploy", "--format", "json"))
    nodes = out.get("nodes", out.get("supernodes", []))
    return sum(1 for n in nodes if str(n.get("status", "online")).lower() == "online")


@contextmanager
def _environment(workdir: Path) -> Iterator[dict[str, str]]:
    home = workdir / "flwr-home"
    home.mkdir()
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),
        OMP_NUM_THREADS="1",  # four processes share the cores
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),  # Flower spawns flower-superexec
    )
    env.pop("VIRTUAL_ENV", None)
    yield env


def _start_superlink(procs: _Processes, deadline: float, *, simulation: bool = False) -> int:
    """Start ``flower-superlink`` on a free loopback port, name it "deploy" in the Flower config."""
    link = free_port()
    (Path(procs.env["FLWR_HOME"]) / "config.toml").write_text(
        '[superlink]\ndefault = "deploy"\n\n'
        f'[superlink.deploy]\naddress = "{LOOPBACK}:{link}"\ninsecure = true\n'
    )
    argv = [str(BIN / "flower-superlink"), "--insecure", "--isolation", "subprocess"]
    argv += ["--host", LOOPBACK, "--port", str(link), "--disable-runtime-dependency-installation"]
    procs.start("superlink", [*argv, "--simulation"] if simulation else argv)
    _wait("starting the SuperLink", lambda: _healthy(link), deadline, procs)
    return link


def simulate(
    app: Path = APP,
    *,
    run_config: dict[str, str] | None = None,
    supernodes: int = 2,
    timeout: float = 300.0,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """``flwr run <app>`` on Flower's Simulation Engine, via a SuperLink started here.

    What ``flwr run examples/flower`` does with Flower's default ``local`` connection, except
    that the SuperLink gets a free port and is stopped (by pid) at the end. Returns the
    ServerApp's result (``result-path``).
    """
    deadline = time.monotonic() + timeout
    tmp = tempfile.TemporaryDirectory(prefix="lorafair-sim-") if workdir is None else None
    work = Path(tmp.name) if tmp is not None else workdir
    assert work is not None
    (work / "logs").mkdir(parents=True, exist_ok=True)
    with _environment(work) as env:
        procs = _Processes(work / "logs", env)
        try:
            _start_superlink(procs, deadline, simulation=True)
            result_path = work / "result.json"
            config = {**(run_config or {}), "result-path": f"'{result_path}'"}
            cmd = ["run", str(app), "deploy", "--format", "json"]
            cmd += ["--run-config", " ".join(f"{k}={v}" for k, v in config.items())]
            cmd += [
                "--federation-config",
                f"num-supernodes={supernodes} client-resources-num-cpus=1",
            ]
            _flwr(procs, *cmd)
            _wait("running the simulation", result_path.exists, deadline, procs, poll=0.5)
            time.sleep(0.2)
            return dict(json.loads(result_path.read_text()))
        finally:
            procs.stop_all()
            if tmp is not None:
                tmp.cleanup()


def deploy(
    runs: list[RunSpec],
    *,
    supernodes: int = 3,
    timeout: float = 600.0,
    workdir: Path | None = None,
) -> Deployment:
    """Start a SuperLink and ``supernodes`` SuperNodes, submit ``runs`` one after the other.

    Every process started is stopped by pid at the end, also on failure. Raises
    :class:`DeploymentError` (with the failing process's log tail) if a process dies, the
    whole deployment exceeds ``timeout`` seconds, or a run ends without a result.
    """
    start = time.monotonic()
    deadline = start + timeout
    tmp = tempfile.TemporaryDirectory(prefix="lorafair-deploy-") if workdir is None else None
    work = Path(tmp.name) if tmp is not None else workdir
    assert work is not None
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with _environment(work) as env:
        procs = _Processes(logs, env)
        try:
            link = _start_superlink(procs, deadline)
            seconds["superlink-ready"] = time.monotonic() - start
            for k in range(supernodes):
                procs.start(
                    f"supernode-{k}",
                    [
                        str(BIN / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"{LOOPBACK}:{link}",
                        "--host",
                        LOOPBACK,
                        "--port",
                        str(free_port()),
                        "--node-config",
                        f"partition-id={k} num-partitions={supernodes}",
                    ],
                )
            live = supernodes
            _wait(
                f"waiting for {supernodes} SuperNodes to connect",
                lambda: _connected_nodes(procs) >= supernodes,
                deadline,
                procs,
                poll=1.0,
            )
            seconds["supernodes-ready"] = time.monotonic() - start
            results = []
            for i, spec in enumerate(runs):
                if (
                    spec.kill_node is not None
                    and f"supernode-{spec.kill_node}" not in procs.started
                ):
                    raise ValueError(f"run {i}: SuperNode {spec.kill_node} is not running")
                began = time.monotonic()
                results.append(_one_run(procs, spec, live, work / f"result-{i}.json", deadline))
                results[-1] = results[-1]._replace(seconds=time.monotonic() - began)
                live -= spec.kill_node is not None
                seconds[f"run-{i}"] = time.monotonic() - start
            return Deployment(results, seconds, logs)
        finally:
            leftovers = procs.stop_all()
            seconds["stopped"] = time.monotonic() - start
            if leftovers:
                print(f"needed SIGKILL after SIGTERM: pids {leftovers}", file=sys.stderr)
            if tmp is not None:
                tmp.cleanup()


def _one_run(
    procs: _Processes, spec: RunSpec, live: int, result_path: Path, deadline: float
) -> RunResult:
    config = {
        "method": f"'{spec.method}'",
        "num-server-rounds": str(spec.rounds),
        # With a fault, the later rounds go on without the dead node.
        "min-nodes": str(live if spec.kill_node is None else live - 1),
        "fraction-evaluate": "0.0",
        "round-timeout": str(spec.round_timeout),
        "result-path": f"'{result_path}'",
    }
    if spec.checkpoint_dir:
        config["checkpoint-dir"] = f"'{spec.checkpoint_dir}'"
        config["resume"] = "true" if spec.resume else "false"
    run_config = " ".join(f"{k}={v}" for k, v in config.items())
    out = _flwr(procs, "run", str(APP), "deploy", "--run-config", run_config, "--format", "json")
    run_id = str(json.loads(out)["run-id"])
    if spec.kill_node is not None:
        victim = f"supernode-{spec.kill_node}"
        before = procs.log(victim).count("Receiving: train message")
        _wait(
            f"waiting for {victim} to receive a train message of run {run_id}",
            lambda: procs.log(victim).count("Receiving: train message") > before,
            deadline,
            procs,
        )
        procs.kill_tree(victim)
        procs.started[f"killed-{victim}"] = procs.started.pop(victim)
    if spec.kill_superlink_after is not None:
        done = Path(spec.checkpoint_dir) / f"round-{spec.kill_superlink_after}" / "state.json"
        _wait(f"waiting for {done}", done.exists, deadline, procs, poll=0.2)
        procs.track()  # remember the ServerApp process, then kill the SuperLink's whole tree
        procs.kill_tree("superlink")
        procs.started["killed-superlink"] = procs.started.pop("superlink")
        return RunResult(spec, {}, "", 0.0)
    _wait(f"running {run_id}", result_path.exists, deadline, procs, poll=0.5)
    time.sleep(0.2)  # the ServerApp writes the file in one call; let it close
    result = json.loads(result_path.read_text())
    log = _flwr(procs, "log", run_id, "deploy", "--show", timeout=60)
    return RunResult(spec, result, log, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="lora_fair")
    parser.add_argument(
        "--kill-node", type=int, default=None, help="then run again, crashing this SuperNode"
    )
    parser.add_argument("--round-timeout", type=float, default=3600.0)
    parser.add_argument("--timeout", type=float, default=900.0, help="for the whole deployment")
    args = parser.parse_args()
    runs = [RunSpec(args.rounds, args.method, None, args.round_timeout)]
    if args.kill_node is not None:
        runs.append(RunSpec(args.rounds, args.method, args.kill_node, args.round_timeout))
    with tempfile.TemporaryDirectory(prefix="lorafair-deploy-") as tmp:
        done = deploy(runs, supernodes=args.supernodes, timeout=args.timeout, workdir=Path(tmp))
        for run in done.runs:
            print(json.dumps({"spec": run.spec._asdict(), "seconds": run.seconds, **run.result}))
        print(json.dumps({"seconds": done.seconds}))


if __name__ == "__main__":
    main()
