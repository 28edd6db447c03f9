"""A Flower federation on digits, recorded round by round with umig.integrations.flower.UmigFedAvg.

Flower's Message API: the ServerApp runs ``UmigFedAvg`` (Flower's FedAvg that also records
every round), each ClientApp trains the global model on its partition of
``sklearn:digits?split=train`` and replies with its ``ArrayRecord`` and ``num-examples``.
The strategy records the initial model, every client model (parent: the global it trained
from, data: its partition) and every aggregate (FedAvg weights from ``num-examples``).
Afterwards the example plans forgetting ``--labels`` over the recorded rounds, as

    umig unlearn --labels 1 --dry-run --store DIR

would. It runs the federation in-process with Flower's simulation engine (Ray, which umig's
``ray`` extra installs). Without Ray it prints how to run the same apps with ``flwr run``:
the ClientApp and ServerApp are ``examples.flower_digits:client_app`` / ``:server_app``, and
the ServerApp reads the store path from the run config (``umig-store``).

    python examples/flower_digits.py [--quick] [--store DIR] [--clients 2] [--rounds 2] [--labels 1]
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# shared example plumbing (examples/_common.py); imported first, it puts the repository on sys.path
from _common import CLASSES, example_parser, example_store, parse_args  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from umig.api import Store  # noqa: E402
from umig.data import digits_client_split, parse_labels  # noqa: E402
from umig.demo import DEFAULT_ARCH as ARCH, DIGITS_TRAIN  # noqa: E402
from umig.integrations.flower import UmigFedAvg  # noqa: E402
from umig.lineage import fresh_model, subset_ref  # noqa: E402
from umig.train import Recipe  # noqa: E402

# What the ServerApp reads when the run config does not say (set by main() for the simulation).
SETTINGS: dict = {"store": None, "clients": 2, "rounds": 2, "epochs": 3, "seed": 0}

client_app = ClientApp()
server_app = ServerApp()


def client_recipe(round: int, partition: int, epochs: int, seed: int) -> Recipe:
    """Client ``partition``'s recipe in ``round``: its own seed, so a retrain replays it exactly."""
    return Recipe(optimizer="adam", lr=0.01, epochs=epochs, batch_size=64, seed=seed + 100 * round + partition)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this SuperNode's partition of the digits."""
    from umig.data import resolve
    from umig.demo import train_client

    pid, parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    cfg = msg.content["config"]
    rnd, epochs, seed = int(cfg["server-round"]), int(cfg["epochs"]), int(cfg["seed"])
    data = resolve(DIGITS_TRAIN).select(digits_client_split(parts, seed=seed)[pid])
    model = ARCH.build()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    recipe = client_recipe(rnd, pid, epochs, seed)
    train_client(model, data, recipe, CLASSES, capture=False)  # the reply carries no FIM: the server computes it
    # FedAvg reads its weight from the MetricRecord; who trained, and with which seed, goes in a ConfigRecord.
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                               "metrics": MetricRecord({"num-examples": len(data)}),
                               "client": ConfigRecord({"partition-id": pid, "seed": recipe.seed})}), reply_to=msg)


@server_app.main()
def main_server(grid: Grid, context: Context) -> None:
    """FedAvg over every SuperNode for ``rounds`` rounds, recorded in the umig store."""
    cfg = {**SETTINGS, **{k.removeprefix("umig-"): v for k, v in context.run_config.items()}}
    store = cfg["store"] if isinstance(cfg["store"], Store) else Store.open(cfg["store"])
    clients, seed = int(cfg["clients"]), int(cfg["seed"])
    shards = [subset_ref(store, DIGITS_TRAIN, idx) for idx in digits_client_split(clients, seed=seed)]

    def pid(m: Message) -> int:
        return int(m.content["client"]["partition-id"])

    base = client_recipe(0, 0, int(cfg["epochs"]), seed)
    strategy = UmigFedAvg(
        store, ARCH, classes=CLASSES, prefix="flower",
        client_id=pid, data=lambda m: shards[pid(m)],
        recipe=lambda m: Recipe(**{**base.to_json(), "seed": int(m.content["client"]["seed"])}),
        fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(fresh_model(ARCH, seed).state_dict()),
                   num_rounds=int(cfg["rounds"]), train_config=ConfigRecord({"epochs": int(cfg["epochs"]), "seed": seed}))
    SETTINGS["recorded"] = [n for r in sorted(strategy.rounds) for n in strategy.rounds[r]]


def simulation_available() -> str | None:
    """Why Flower's simulation engine cannot run here, or None when it can."""
    import importlib.util

    try:
        import flwr.simulation  # noqa: F401
    except ImportError as e:
        return str(e)
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed: pip install 'umig[ray]' (or 'flwr[simulation]')"
    return None


FLWR_RUN = """Flower's simulation engine is not available here ({why}).
Run the same apps with the Flower CLI instead: in a Flower app project (flwr new), point
[tool.flwr.app.components] at serverapp = "flower_digits:server_app" and
clientapp = "flower_digits:client_app", then
    flwr run . --run-config "umig-store='{store}' umig-rounds={rounds} umig-clients={clients}"
"""


def main(argv: list[str] | None = None) -> int:
    ap = example_parser(__doc__, quick="2 clients, 2 rounds of 1 epoch", labels="1",
                        labels_help="labels to plan forgetting of, e.g. 1 or 1,2")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="local epochs per client and round")
    args = parse_args(ap, argv, quick={"clients": 2, "rounds": 2, "epochs": 1})
    labels = parse_labels(args.labels)
    why = simulation_available()
    if why:
        print(FLWR_RUN.format(why=why, store=args.store or ".umig", rounds=args.rounds, clients=args.clients))
        return 0
    from flwr.simulation import run_simulation

    with example_store(args.store, "umig-flower-") as store:
        SETTINGS.update(store=store, clients=args.clients, rounds=args.rounds, epochs=args.epochs, seed=args.seed)
        t0 = time.perf_counter()
        run_simulation(server_app, client_app, num_supernodes=args.clients,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": min(args.clients, os.cpu_count() or 1),
                                                     "include_dashboard": False}})
        recorded = SETTINGS.get("recorded", [])
        if len(recorded) != args.rounds * (args.clients + 1):
            print(f"the federation recorded {len(recorded)} nodes; expected {args.rounds * (args.clients + 1)}")
            return 1
        plan = store.plan_unlearning(labels)
        print(f"flower: recorded {len(recorded) + 1} models ({args.rounds} rounds x {args.clients} clients + "
              f"aggregates + init) in {time.perf_counter() - t0:.1f} s; forgetting label(s) "
              f"{','.join(map(str, labels))} would update {len(plan.plan.affected)} of them")
        if args.store:
            print(f"next: umig unlearn --labels {args.labels} --dry-run --store {args.store}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
