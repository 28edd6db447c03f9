"""Lightning integration: ``UmigCallback`` records what a CPU ``Trainer`` fitted (tiny MLP on digits)."""

from __future__ import annotations

import warnings

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="Lightning not installed: pip install 'umig[lightning]'")

from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from umig.api import Store  # noqa: E402
from umig.arch import ArchSpec  # noqa: E402
from umig.data import resolve  # noqa: E402
from umig.errors import UmigError  # noqa: E402
from umig.integrations.lightning import UmigCallback  # noqa: E402

ARCH = ArchSpec("umig.models:digits_mlp", {"num_classes": 10, "hidden": 16})
TRAIN = "sklearn:digits?split=train"


class Digits(pl.LightningDataModule):
    umig_data = TRAIN  # the data reference the callback records

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(resolve(TRAIN).dataset, batch_size=self.hparams.batch_size, shuffle=True)


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ARCH.build()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def fit(callback: UmigCallback, module: Classifier, epochs: int = 1, dm: pl.LightningDataModule | None = None) -> None:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers etc.
        trainer.fit(module, datamodule=dm or Digits())


@pytest.fixture
def store(tmp_path):
    s = Store.init(tmp_path / "s")
    s.add_node("base", ARCH.build(), ARCH, data=TRAIN)
    yield s
    s.close()


def test_fit_records_child_with_recipe_data_and_captured_fim(store):
    pl.seed_everything(3, verbose=False)
    module = Classifier()
    module.model.load_state_dict(store.state_dict("base"))
    cb = UmigCallback(store, ARCH, name="ft", parent="base", classes=range(10))
    fit(cb, module)

    assert cb.nodes == ["ft"]
    info = store.node("ft")
    assert [(p, r) for p, r, _ in info.parents] == [("base", "finetune")]
    assert info.data_size == len(resolve(TRAIN))
    assert info.recipe["optimizer"] == "adam" and info.recipe["lr"] == pytest.approx(0.01)
    assert (info.recipe["epochs"], info.recipe["batch_size"], info.recipe["seed"]) == (1, 64, 3)
    torch.testing.assert_close(store.state_dict("ft")["fc.weight"], module.model.fc.weight.detach())
    fim = store.fim("ft")  # captured from the epoch's own batches: every training sample, once
    assert fim.samples == len(resolve(TRAIN)) and float(fim.weight.sum()) > 0
    assert fim.has_label_stats and int(fim.label_counts.sum()) == fim.samples  # forgetting labels needs no pass
    assert len(store.plan_unlearning([1]).plan.affected) == 2


def test_every_epoch_chains_nodes_and_unknown_optimizer_goes_to_meta(store):
    class RMS(Classifier):
        def configure_optimizers(self):
            return torch.optim.RMSprop(self.parameters(), lr=1e-3)

    cb = UmigCallback(store, ARCH, name="run", every_epoch=True, capture_fim=False)
    fit(cb, RMS(), epochs=2)
    assert cb.nodes == ["run/epoch0", "run/epoch1"] and cb.node == "run/epoch1"
    second = store.node("run/epoch1")
    assert [p for p, *_ in second.parents] == ["run/epoch0"]
    assert second.recipe is None and second.meta["lightning"]["optimizer"] == "RMSprop"


def test_missing_data_reference_fails_before_training(store):
    class NoRef(Digits):
        umig_data = None

    module = Classifier()
    before = module.model.fc.weight.detach().clone()
    cb = UmigCallback(store, ARCH, name="x", parent="base")
    with pytest.raises(UmigError, match="no data reference"):
        fit(cb, module, dm=NoRef())
    assert torch.equal(module.model.fc.weight, before) and not store.has_node("x")
    with pytest.raises(UmigError, match="parent node 'nope'"):
        UmigCallback(store, ARCH, name="y", parent="nope")


def test_ddp_fim_is_reduced_over_ranks_and_only_rank_zero_records(store):
    """Two ranks that saw the same batches: the reduced FIM is the same mean over twice the samples."""
    from types import SimpleNamespace

    from umig.fisher import FisherCapture

    model = ARCH.build()
    x, y = next(iter(DataLoader(resolve(TRAIN).dataset, batch_size=32)))
    cap = FisherCapture(model, range(10), head="fc", per_label=True)
    for xb, _ in cap.wrap([(x, y)]):
        model(xb)
    single = FisherCapture(model, range(10), head="fc", per_label=True)
    for xb, _ in single.wrap([(x, y)]):
        model(xb)
    strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=lambda t, reduce_op: t * 2)
    cb = UmigCallback(store, ARCH, name="ddp")
    cb._cap = cap
    fim = cb._fim(SimpleNamespace(world_size=2, strategy=strategy))
    ref = single.fim()
    assert fim.samples == 2 * ref.samples
    torch.testing.assert_close(fim.weight, ref.weight)
    torch.testing.assert_close(fim.label_weight, 2 * ref.label_weight)  # sums add up over the ranks
    assert torch.equal(fim.label_counts, 2 * ref.label_counts)
    rank1 = SimpleNamespace(world_size=2, strategy=strategy, is_global_zero=False)
    cb._cap = None
    assert cb._record(rank1, None, "ddp", 1) is None and not store.has_node("ddp")
