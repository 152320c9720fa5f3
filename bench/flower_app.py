"""The Flower side of bench/vs_flower.py: the same FedAvg task on Flower 1.42's simulation engine.

Runs in bench/.flwr-venv (Flower pins another Ray), started by vs_flower.py as

    python -c "import sys, flower_app; sys.exit(flower_app.main(sys.argv[1:]))" --num-clients 100 ...

with PYTHONPATH=<repo>:<repo>/bench. It is imported as a module, never run as ``__main__``: Flower
pickles the ClientApp with every message, and a module's functions are pickled by reference, so
each Ray actor imports this file once and keeps its cached data between messages
(notes/flower_anchor.md, pitfall 3).

What is shared with edgeray, so both systems do the same work: the data loader and IID partition
(pipelines.data), the CNN and its seeded initial weights (pipelines.models), and the local
training itself (pipelines.fedavg.FedAvg.client_update, with the same per-(round, client) seeds
as edgeray's ClientActor). The clients of each round are not drawn here: vs_flower.py computes
them with edgeray's own selection code and passes the schedule in; the ServerApp maps partition
ids to Flower's random node ids with one QUERY message per node (pitfall 4) and overrides
``configure_train`` to send to exactly those nodes.

Round time = ``configure_train`` start to ``aggregate_train`` end (messages, client training in
2 single-CPU Ray actors, replies, Flower's FedAvg aggregation); central evaluation is timed apart.
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")   # no internet here
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg  # noqa: E402

from pipelines.data import load_mnist, partition  # noqa: E402
from pipelines.fedavg.settings import FedAvgSettings  # noqa: E402
from pipelines.fedavg.strategy import FedAvg  # noqa: E402
from pipelines.models import build_model  # noqa: E402
from pipelines.registry import ModelSpec  # noqa: E402
from pipelines.strategy import ClientContext, ClientData  # noqa: E402
from pipelines.tasks.vision import classification_loss, evaluate_classification  # noqa: E402

client_app = ClientApp()
server_app = ServerApp()

# Per process: the task's data and model (actors load them once; see the module docstring).
_cache: dict = {}
# Set by main() in the driver process, where the ServerApp runs (in a thread of run_simulation).
_run: dict = {}


def task_data(data_path: str, train_rows: int, num_clients: int, seed: int):
    """(dataset, partition) exactly as vs_flower.py builds them for edgeray."""
    key = (data_path, train_rows, num_clients, seed)
    if _cache.get("key") != key:
        data = load_mnist(data_path)
        if train_rows:
            data.x_train, data.y_train = data.x_train[:train_rows], data.y_train[:train_rows]
        _cache.update(key=key, data=data, parts=partition(data.y_train, num_clients, "iid", seed=seed),
                      model=build_model(ModelSpec("cnn", seed=seed, data_info=data.info)))
    return _cache["data"], _cache["parts"], _cache["model"]


def _task(config: ConfigRecord, context: Context):
    return task_data(str(config["data-path"]), int(config["train-rows"]),
                     int(context.node_config["num-partitions"]), int(config["seed"]))


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition id (and load the data, as edgeray's actors do at start)."""
    _task(msg.content["config"], context)
    return Message(RecordDict({"metrics": MetricRecord(
        {"partition-id": int(context.node_config["partition-id"])})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    config = msg.content["config"]
    data, parts, model = _task(config, context)
    cid, rnd, seed = int(context.node_config["partition-id"]), int(config["server-round"]), int(config["seed"])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    strategy = FedAvg(FedAvgSettings(local_epochs=int(config["local-epochs"]), batch_size=int(config["batch-size"]),
                                     lr=float(config["lr"]), momentum=float(config["momentum"])))
    torch.manual_seed(hash((seed, rnd, cid)) & 0xFFFFFFFF)  # as edgeray's ClientActor.train
    idx = parts[cid]
    update = strategy.client_update(ClientContext(
        cid, rnd, model, ClientData(data.x_train[idx], data.y_train[idx]),
        strategy.configure_round(rnd, {}, [cid], None)[cid], {}, np.random.default_rng([seed, rnd, cid]),
        classification_loss))
    metrics = MetricRecord({"num-examples": update.num_examples, "train_loss": update.metrics["train_loss"],
                            "train_s": time.perf_counter() - started, "torch_threads": torch.get_num_threads()})
    return Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=model.state_dict()), "metrics": metrics}),
                   reply_to=msg)


class ScheduledFedAvg(FlowerFedAvg):
    """Flower's FedAvg with two changes: it trains the scheduled clients of each round, and it
    time-stamps the round (configure_train start, aggregate_train end)."""

    def __init__(self, schedule: list[list[int]], node_of: dict[int, int], **kwargs):
        super().__init__(**kwargs)
        self.schedule = schedule
        self.node_of = node_of
        self.round_started: dict[int, float] = {}
        self.round_ended: dict[int, float] = {}
        self.round_driver_cpu_s: dict[int, float] = {}  # CPU this process (Flower's driver) used in the round
        self.client_train_s: dict[int, list[float]] = {}
        self.torch_threads: set[int] = set()

    def configure_train(self, server_round, arrays, config, grid):
        self.round_started[server_round] = time.time()
        self.round_driver_cpu_s[server_round] = time.process_time()
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        nodes = [self.node_of[c] for c in self.schedule[server_round - 1]]
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        result = super().aggregate_train(server_round, replies)
        self.round_ended[server_round] = time.time()
        self.round_driver_cpu_s[server_round] = time.process_time() - self.round_driver_cpu_s[server_round]
        for r in replies:
            if not r.has_error():
                self.client_train_s.setdefault(server_round, []).append(float(r.content["metrics"]["train_s"]))
                self.torch_threads.add(int(r.content["metrics"]["torch_threads"]))
        return result


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run = _run
    run["server_main_epoch"] = time.time()
    num_clients = run["num_clients"]
    while len(list(grid.get_node_ids())) < num_clients:
        time.sleep(0.01)
    run["nodes_registered_epoch"] = time.time()
    task = ConfigRecord({"data-path": run["data_path"], "train-rows": run["train_rows"], "seed": run["seed"]})
    replies = grid.send_and_receive([Message(RecordDict({"config": task}), dst_node_id=n,
                                             message_type=MessageType.QUERY) for n in grid.get_node_ids()])
    node_of = {int(r.content["metrics"]["partition-id"]): r.metadata.src_node_id for r in replies}
    if len(node_of) != num_clients:
        raise RuntimeError(f"QUERY reached {len(node_of)} of {num_clients} nodes")
    run["query_done_epoch"] = time.time()

    data, _, model = task_data(run["data_path"], run["train_rows"], num_clients, run["seed"])
    evaluations: dict[int, dict] = {}

    def central_evaluate(rnd: int, arrays: ArrayRecord):
        if rnd not in run["evaluate_rounds"]:
            return None
        started = time.time()
        model.load_state_dict(arrays.to_torch_state_dict())
        sums = evaluate_classification(model, data.x_test, data.y_test)
        accuracy = sums["test_accuracy"] / sums["count"]
        evaluations[rnd] = {"test_accuracy": accuracy, "test_loss": sums["test_loss"] / sums["count"],
                            "eval_s": time.time() - started}
        return MetricRecord({"test_accuracy": accuracy})

    strategy = ScheduledFedAvg(run["schedule"], node_of, fraction_evaluate=0.0, min_available_nodes=num_clients)
    train_config = ConfigRecord({**task, "local-epochs": run["local_epochs"], "batch-size": run["batch_size"],
                                 "lr": run["lr"], "momentum": run["momentum"]})
    strategy.start(grid, ArrayRecord(torch_state_dict=model.state_dict()), num_rounds=len(run["schedule"]),
                   train_config=train_config, evaluate_fn=central_evaluate)
    run.update(round_started=strategy.round_started, round_ended=strategy.round_ended,
               round_driver_cpu_s=strategy.round_driver_cpu_s,
               client_train_s=strategy.client_train_s, torch_threads=sorted(strategy.torch_threads),
               evaluations=evaluations)


def main(argv: list[str]) -> int:
    imported = time.time()
    parser = argparse.ArgumentParser(description="Flower side of bench/vs_flower.py")
    parser.add_argument("--num-clients", type=int, required=True)
    parser.add_argument("--schedule", required=True, help="JSON list of client-id lists, one per round")
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--train-rows", type=int, default=0, help="use the first N training rows (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--evaluate-rounds", default="all", help="'all' or 'first-last' (round 0 and the last)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="client_resources num_cpus per actor")
    args = parser.parse_args(argv)
    from flwr.simulation import run_simulation

    schedule = json.loads(args.schedule)
    rounds = len(schedule)
    _run.update(num_clients=args.num_clients, schedule=schedule, data_path=args.data_path,
                train_rows=args.train_rows, seed=args.seed, local_epochs=args.local_epochs,
                batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                evaluate_rounds=set(range(rounds + 1)) if args.evaluate_rounds == "all" else {0, rounds})
    called = time.time()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.num_clients,
                   backend_name="ray",
                   backend_config={"client_resources": {"num_cpus": args.num_cpus, "num_gpus": 0.0},
                                   # a local Ray of our own, never someone else's head on this machine
                                   "init_args": {"address": "local", "num_cpus": 2, "include_dashboard": False}})
    returned = time.time()
    if "round_ended" not in _run:
        print("flower_app: the ServerApp did not finish (see the log above)", file=sys.stderr)
        return 1
    started, ended = _run["round_started"], _run["round_ended"]
    rows = [{"round": r, "round_wall_s": ended[r] - started[r], "driver_cpu_s": _run["round_driver_cpu_s"][r],
             "client_train_s": _run["client_train_s"].get(r, []), **_run["evaluations"].get(r, {})}
            for r in range(1, rounds + 1)]
    print(json.dumps({
        "rows": rows,
        "initial_evaluation": _run["evaluations"].get(0),
        "imported_epoch": imported,
        "run_simulation_called_epoch": called,
        "round1_start_epoch": started[1],
        "nodes_registered_s": _run["nodes_registered_epoch"] - called,
        "query_s": _run["query_done_epoch"] - _run["nodes_registered_epoch"],
        "call_to_round1_s": started[1] - called,
        "after_last_round_to_return_s": returned - ended[rounds],
        "torch_threads_in_clients": _run["torch_threads"],
        "versions": {"flwr": __import__("flwr").__version__, "ray": __import__("ray").__version__,
                     "torch": torch.__version__},
    }), flush=True)
    return 0
