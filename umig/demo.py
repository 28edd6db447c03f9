"""A real, small lineage on scikit-learn's digits: what `make demo`, tests and benchmarks build.

Federated learning with FedAvg: ``clients`` clients per round train the
previous global model on their shard of ``sklearn:digits?split=train``; each
round's aggregate becomes the next global model. Everything is recorded through
:class:`umig.lineage.FederatedRecorder`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from umig.api import Store
from umig.arch import ArchSpec
from umig.data import digits_client_split, resolve
from umig.lineage import FederatedRecorder, subset_ref
from umig.train import Recipe, fedavg, fit

DIGITS_TRAIN = "sklearn:digits?split=train"
DIGITS_TEST = "sklearn:digits?split=test"
DEFAULT_ARCH = ArchSpec("umig.models:digits_cnn", {"num_classes": 10})
DEFAULT_RECIPE = Recipe(optimizer="adam", lr=0.01, epochs=5, batch_size=64, seed=0)


@dataclass
class FLRun:
    """Names of what :func:`build_fl_digits` recorded."""

    init: str
    clients: list[list[str]]  # [round][client]
    globals: list[str]  # aggregate per round

    @property
    def nodes(self) -> list[str]:
        return [self.init] + [n for r, g in zip(self.clients, self.globals) for n in (*r, g)]


def train_client(model: torch.nn.Module, data, recipe: Recipe, classes=tuple(range(10)), *,
                 capture: bool = True) -> None:
    """One client's local training: ``recipe.epochs`` shuffled epochs over its shard (:func:`umig.train.fit`,
    which keeps the last epoch's FIM with the model for the recorder unless ``capture`` is False)."""
    fit(model, data, recipe, classes, capture=capture)


def build_fl_digits(
    store: Store,
    *,
    clients: int = 3,
    rounds: int = 2,
    recipe: Recipe = DEFAULT_RECIPE,
    arch: ArchSpec = DEFAULT_ARCH,
    alpha: float | None = None,
    seed: int = 0,
    prefix: str = "fl",
    on_node: Callable[[str], None] | None = None,
    exact_fim: bool = False,
) -> FLRun:
    """Train and record a ``clients`` x ``rounds`` FedAvg lineage on digits (one transaction).

    Client FIMs are captured from each client's last epoch; ``exact_fim`` computes them with one pass.
    """
    torch.manual_seed(seed)
    shards = [subset_ref(store, DIGITS_TRAIN, idx)
              for idx in digits_client_split(clients, split="train", seed=seed, alpha=alpha)]
    rec = FederatedRecorder(store, arch, prefix=prefix, recipe=recipe, exact_fim=exact_fim)
    with store.batch():
        global_model = arch.build()
        init = rec.initial(global_model).name
        if on_node:
            on_node(init)
        run = FLRun(init=init, clients=[], globals=[])
        for r in range(1, rounds + 1):
            names, states, sizes = [], [], []
            for c, shard in enumerate(shards):
                model = arch.build()
                model.load_state_dict(global_model.state_dict())
                # Each client's own seed is recorded in its recipe, so retraining reproduces it exactly.
                client_recipe = Recipe(**{**recipe.to_json(), "seed": recipe.seed + 100 * r + c})
                train_client(model, shard, client_recipe, capture=not exact_fim)
                names.append(rec.client(r, c, model, shard, recipe=client_recipe).name)
                states.append(model.state_dict())
                sizes.append(len(shard))
                if on_node:
                    on_node(names[-1])
            global_model = arch.build()
            global_model.load_state_dict(fedavg(states, sizes))
            run.globals.append(rec.aggregate(r, global_model).name)
            run.clients.append(names)
            if on_node:
                on_node(run.globals[-1])
    return run


def heldout():
    """The held-out digits split (never used for training)."""
    return resolve(DIGITS_TEST)
