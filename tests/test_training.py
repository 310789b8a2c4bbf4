"""The Lightning training engine: early stopping, best weights, loss terms, batch orders, quiet runs."""

import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from histo2expr.models import (
    LossOutput,
    SpotNetwork,
    SpotSet,
    TrainConfig,
    TrainingPlan,
    get_method,
    train_network,
)
from histo2expr.models.batches import BatchOrder, ordered_batches, shuffled_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(**changes) -> TrainConfig:
    return TrainConfig(
        **{"epochs": 6, "batch_size": 16, "lr": 0.1, "patience": 10, "progress": False, **changes}
    )


def spots(n=64, d=4, seed=0) -> SpotSet:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, d)).astype(np.float32)
    return SpotSet(
        coords=rng.normal(size=(n, 2)),
        groups=np.repeat(["a", "b"], n // 2),
        features=features,
        targets=(features[:, :2] * 2).astype(np.float32),
    )


class Drifting(SpotNetwork):
    """Training pushes ``w`` away from 0 while the validation metric is ``w^2``: no epoch beats the untrained one."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.head = nn.Linear(4, 2)

    def loss(self, batch):
        fit = nn.functional.mse_loss(self.head(batch["features"]), batch["targets"])
        drift = -self.w
        return LossOutput(fit + drift, {"fit": fit, "drift": drift})

    def validation_loss(self, batch):
        return self.w**2 + 0 * batch["features"].sum()


def test_loss_terms_are_reported_per_epoch():
    report, device = train_network(Drifting(), spots(), None, config(epochs=3))
    assert device == torch.device("cpu")
    assert len(report.train_loss) == 3 and report.best_epoch == 2 and report.validation_loss == []
    assert set(report.train_terms) == {"fit", "drift"} and all(
        len(v) == 3 for v in report.train_terms.values()
    )
    np.testing.assert_allclose(
        report.train_loss, np.add(report.train_terms["fit"], report.train_terms["drift"]), rtol=1e-5
    )


def test_a_submodule_with_an_lr_scale_trains_at_that_fraction_of_the_rate():
    from histo2expr.models import TrainingPlan

    network = Drifting()
    network.head.lr_scale = 0.1
    optimizer = TrainingPlan(network, lr=0.5, weight_decay=0.0).configure_optimizers()
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rates == {id(network.w): 0.5, **{id(p): pytest.approx(0.05) for p in network.head.parameters()}}


def test_the_untrained_weights_stay_when_no_epoch_beats_them():
    network = Drifting()
    report, _ = train_network(network, spots(), spots(seed=1), config(patience=2), validate_untrained=True)
    assert report.best_epoch is None and report.notes["untrained_validation_loss"] == 0.0
    assert float(network.w.detach()) == 0.0  # the untrained weights are back
    assert len(report.validation_loss) == 3  # early stopping after `patience` epochs without improvement
    drifted = Drifting()
    report, _ = train_network(drifted, spots(), spots(seed=1), config(patience=2))
    assert (
        report.best_epoch == 0 and float(drifted.w.detach()) > 0
    )  # without the untrained run, epoch 0 is the best


def test_patience_none_is_the_methods_own_and_an_integer_wins():
    chrep = get_method("chrep")
    assert TrainConfig().patience is None
    assert TrainConfig().for_method(chrep).patience == chrep.default_patience
    assert TrainConfig(patience=7).for_method(chrep).patience == 7
    assert TrainConfig().for_method(get_method("nh2st")()).patience == 10  # a class or an instance
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match=r"`patience` must be an integer between 1 and 100000 \(or None"):
            TrainConfig(patience=bad)
    with pytest.raises(ValueError, match="for_method"):  # the engine needs it resolved
        train_network(Drifting(), spots(), spots(seed=1), config(patience=None))


class Recording(TrainingPlan):
    """Records ``w`` after every optimiser step and the steps of every epoch."""

    def __init__(self, network, **kwargs):
        super().__init__(network, lr=0.1, weight_decay=0.0, **kwargs)
        self.steps, self.per_epoch = [], []

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.steps.append(float(self.network.w.detach()))

    def on_train_epoch_end(self):
        super().on_train_epoch_end()
        self.per_epoch.append(len(self.steps))


def moving_average(steps, per_epoch, epochs):
    """The EMA of the recorded weights with a time constant of ``epochs`` epochs, after every step."""
    decay = math.exp(-1 / (epochs * per_epoch))
    averages = [steps[0]]
    for w in steps[1:]:
        averages.append(decay * averages[-1] + (1 - decay) * w)
    return averages


def test_weight_averaging_keeps_the_moving_average_of_the_weights():
    network = Drifting()
    plan = Recording(network)
    train_network(network, spots(), None, config(epochs=3), plan=plan, average_epochs=1.5)
    assert plan.per_epoch == [4, 8, 12]  # 64 spots in batches of 16
    expected = moving_average(plan.steps, 4, 1.5)[-1]
    assert float(network.w.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(network.w.detach()) < plan.steps[-1] - 0.1  # the average lags the drifting weights


def test_weight_averaging_validates_and_keeps_the_averaged_weights():
    network = Drifting()  # validation metric w^2: the first epoch is the best one
    plan = Recording(network)
    report, _ = train_network(
        network, spots(), spots(seed=1), config(epochs=3), plan=plan, average_epochs=1.5
    )
    averages = moving_average(plan.steps, 4, 1.5)
    assert report.best_epoch == 0
    assert report.validation_loss[0] == pytest.approx(averages[3] ** 2, rel=1e-4)
    assert float(network.w.detach()) == pytest.approx(averages[3], rel=1e-5) and averages[3] < plan.steps[3]


class Linear(SpotNetwork):
    """A linear head scored by the gene-wise PCC of its predictions on the validation spots."""

    validation_metric = "pcc"

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)

    def loss(self, batch):
        return LossOutput(nn.functional.mse_loss(self.head(batch["features"]), batch["targets"]))

    def validation_predictions(self, batch):
        return self.head(batch["features"])


def test_the_pcc_metric_is_the_mean_gene_pcc_over_all_validation_spots():
    from histo2expr.metrics import pcc_acg

    network, validation = Linear(), spots(n=70, seed=1)
    validation.targets = validation.targets + np.random.default_rng(2).normal(size=(70, 2)).astype(np.float32)
    report, _ = train_network(network, spots(), validation, config(epochs=1, batch_size=16))  # 5 batches
    with torch.no_grad():
        predicted = network.head(torch.from_numpy(validation.features)).numpy()
    expected = 1 - pcc_acg(validation.targets, predicted)
    assert report.validation_loss == [pytest.approx(expected, abs=1e-5)]


def test_pcc_moments_leave_constant_genes_out_and_sum_over_batches(rng):
    from histo2expr.metrics import pcc_acg
    from histo2expr.models.training import correlation_moments, mean_correlation

    targets = rng.normal(size=(50, 5)).astype(np.float32) + 3
    predicted = (targets * 0.5 + rng.normal(size=targets.shape)).astype(np.float32)
    predicted[:, 1] = 2.0  # a constant prediction: no correlation, left out as pcc_acg does
    moments = sum(
        correlation_moments(torch.from_numpy(predicted[rows]), torch.from_numpy(targets[rows]))
        for rows in np.array_split(np.arange(50), 3)
    )
    assert mean_correlation(moments, 50) == pytest.approx(pcc_acg(targets, predicted), abs=1e-5)
    assert mean_correlation(correlation_moments(torch.ones(4, 2), torch.ones(4, 2)), 4) == 0.0


def test_a_loss_that_is_not_finite_is_a_clear_error():
    class Exploding(Drifting):
        def loss(self, batch):
            return LossOutput(self.w * np.nan + self.head(batch["features"]).sum())

    with pytest.raises(FloatingPointError, match="lower `lr`"):
        train_network(Exploding(), spots(), None, config(epochs=2))


def test_different_seeds_train_different_networks():
    runs = []
    for seed in (1, 1, 2):
        method = get_method("stnet")(hidden=8, dropout=0.3)
        method.fit(spots(), spots(seed=1), config(seed=seed))
        runs.append(method.predict(spots(seed=2)))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_fits_write_no_files_and_print_nothing(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_method("bleep")(top_k=5, projection_dim=8).fit(spots(), spots(seed=1), config(epochs=2))
    assert not [str(w.message) for w in caught]
    assert list(tmp_path.iterdir()) == []
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_one_progress_bar_over_the_epochs(capfd):
    get_method("stnet")(closed_form=False).fit(spots(), spots(seed=1), config(epochs=3, progress=True))
    err = capfd.readouterr().err
    assert "epochs" in err and "Epoch 0" not in err and "Validation" not in err


def test_batch_orders_share_the_batches_between_processes():
    batches = partial(shuffled_batches, n=100, batch_size=16, seed=0, drop_last=True)
    assert len(batches(epoch=0)) == 6
    one = BatchOrder(batches)
    one.set_epoch(3)
    assert [e for _, e in one] == [3] * 6
    shares = [list(BatchOrder(batches, rank=r, world_size=4)) for r in range(4)]
    assert [len(s) for s in shares] == [1, 1, 1, 1]  # 6 batches: 4 used, each process steps once
    served = np.concatenate([rows for share in shares for rows, _ in share])
    assert len(np.unique(served)) == 64
    evaluation = partial(ordered_batches, n=100, batch_size=16)  # 7 batches
    shares = [list(BatchOrder(evaluation, rank=r, world_size=2, equal_shares=False)) for r in range(2)]
    assert [len(s) for s in shares] == [4, 3]
    np.testing.assert_array_equal(
        np.sort(np.concatenate([rows for s in shares for rows, _ in s])), np.arange(100)
    )
    few = partial(ordered_batches, n=10, batch_size=16)
    assert len(list(BatchOrder(few, rank=1, world_size=2, equal_shares=False))) == 1  # too few to share: all
    with pytest.raises(ValueError, match="too few for 2 processes"):
        list(BatchOrder(few, rank=1, world_size=2))


def test_strategies_that_spawn_processes_are_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"strategy='ddp_spawn'.*histo2expr fit"):
        train_network(Drifting(), spots(), None, config(accelerator="cpu", devices=2, strategy="ddp_spawn"))


_foreach_optimizer = TrainingPlan.configure_optimizers


def _per_weight_optimizer(plan: TrainingPlan) -> torch.optim.Optimizer:
    optimizer = _foreach_optimizer(plan)
    for group in optimizer.param_groups:
        group["foreach"] = False
    return optimizer


def _per_weight_average(ema, averaged, current, n_averaged) -> None:
    for mean, weight in zip(averaged, current, strict=True):
        mean.copy_(torch.lerp(weight, mean, ema.decay))


def test_weights_step_and_average_all_at_once_with_the_per_weight_arithmetic(monkeypatch):
    """The foreach optimiser step and moving average give the weights of per-weight loops, bit for bit."""
    from histo2expr.models.training import EpochEMA

    def trained() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        network = Linear()
        train_network(network, spots(), spots(seed=1), config(epochs=4, lr=0.05), average_epochs=1.5)
        return network.state_dict()

    at_once = trained()
    with monkeypatch.context() as patch:
        patch.setattr(TrainingPlan, "configure_optimizers", _per_weight_optimizer)
        patch.setattr(EpochEMA, "_average", _per_weight_average)
        loops = trained()
    assert any(not torch.equal(loops[key], Linear().state_dict()[key]) for key in loops)  # trained
    assert all(torch.equal(loops[key], at_once[key]) for key in loops)
