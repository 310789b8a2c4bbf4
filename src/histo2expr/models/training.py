"""The training engine of every torch method: PyTorch Lightning, with histo2expr's defaults.

The split follows scvi-tools': a **network** (:class:`SpotNetwork`, a plain
:class:`torch.nn.Module`) computes the loss of a batch with each of its terms
(:class:`LossOutput`) and the method's validation metric; one **training plan**
(:class:`TrainingPlan`, a ``lightning.pytorch.LightningModule``) steps AdamW on it and
logs the terms; a **data module** (``histo2expr.models.batches.SpotDataModule``) serves
the spots in either regime, in the batch order the method asks for; :func:`train_network` runs a
``lightning.pytorch.Trainer`` with early stopping
(``lightning.pytorch.callbacks.EarlyStopping``) and keeps the weights of the best
validation epoch (:class:`BestWeights`), optionally of an exponential moving average of the
weights (:class:`EpochEMA`, Lightning's ``WeightAveraging``). Accelerator, devices, strategy, nodes and precision
are Lightning's, so one GPU, several GPUs (DDP) and SLURM clusters need no code here.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import lightning.pytorch as lightning
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ProgressBar, WeightAveraging
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from .base import FitReport, SpotSet, TrainConfig
from .batches import Batch, Batches, SpotDataModule

#: The metric early stopping and the best weights follow.
VALIDATION_METRIC = "validation_loss"


@dataclass
class LossOutput:
    """The loss of one batch, with each of its terms.

    Attributes
    ----------
    loss
        The scalar that is minimised (training) or compared across epochs (validation).
    terms
        Each term of ``loss`` by name, unweighted (e.g. ``{"mse": ..., "contrastive": ...}``),
        logged per epoch and kept in :attr:`FitReport.train_terms`.
    """

    loss: torch.Tensor
    terms: Mapping[str, torch.Tensor] = field(default_factory=dict)


class SpotNetwork(nn.Module):
    """A network the engine trains: the loss of a batch and the method's validation metric.

    Subclasses implement :meth:`loss` and, when the metric that chooses the epoch differs
    from the training loss, :meth:`validation_loss`, or set :attr:`validation_metric` to
    ``"pcc"`` and implement :meth:`validation_predictions`. Batches are dictionaries of tensors on
    the training device: ``position`` (rows of the spots), ``coords``, ``slide`` (integer slide
    codes), ``targets``, and ``features`` (frozen regime) or ``image`` (uint8 patches, end to end).

    Attributes
    ----------
    validation_metric
        ``"loss"``: the mean of :meth:`validation_loss` over the validation spots; ``"pcc"``: one
        minus the mean gene-wise Pearson correlation of :meth:`validation_predictions` with the
        targets over all validation spots (``correlation_moments``), the benchmark's
        PCC(ACG), which the slide's expression offsets do not dominate as they dominate an MSE.
    """

    validation_metric: str = "loss"

    def loss(self, batch: Batch) -> LossOutput:
        """The training loss of ``batch`` and its terms."""
        raise NotImplementedError

    def validation_loss(self, batch: Batch) -> torch.Tensor:
        """The validation metric of ``batch`` (evaluation mode); by default the training loss."""
        return self.loss(batch).loss

    def validation_predictions(self, batch: Batch) -> torch.Tensor:
        """``(B, n_genes)`` predictions of ``batch`` scored against its targets when ``validation_metric == "pcc"``."""
        raise NotImplementedError


def correlation_moments(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(5, n_genes)`` sums over the spots of p, t, p², t² and p·t: what a gene-wise PCC needs, additive over batches."""
    p, t = predicted.detach().float(), targets.detach().float()
    return torch.stack([p.sum(0), t.sum(0), (p * p).sum(0), (t * t).sum(0), (p * t).sum(0)])


def mean_correlation(moments: torch.Tensor, n_spots: float) -> float:
    """The mean gene-wise PCC from summed ``correlation_moments`` of ``n_spots`` spots (constant genes left out; 0 when all are)."""
    p, t, pp, tt, pt = moments.double() / n_spots
    covariance, var_p, var_t = pt - p * t, pp - p * p, tt - t * t
    # a variance below float32's rounding of the raw moments is a constant gene
    varying = (var_p > 1e-6 * pp.clamp_min(1e-30)) & (var_t > 1e-6 * tt.clamp_min(1e-30))
    if not bool(varying.any()):
        return 0.0
    pcc = covariance[varying] / (var_p[varying] * var_t[varying]).sqrt()
    return float(pcc.clamp(-1, 1).mean())


class TrainingPlan(lightning.LightningModule):
    """The one training plan: AdamW on a :class:`SpotNetwork`, its loss and each term averaged per epoch.

    The training loss, each of its terms and the validation metric are summed per epoch (weighted
    by batch size) on the device and reduced over all processes once per epoch, so every process
    records the same means and takes the same early-stopping decision. The means go into
    :attr:`report`; the validation metric is also logged as ``validation_loss``, which early
    stopping and the best weights follow. A subclass with a validation step of its own adds each
    batch's metric with ``self.accumulate("validation_loss", value, n_spots)``.

    Parameters
    ----------
    network
        What is trained; its parameters with ``requires_grad`` are optimised.
    lr, weight_decay
        AdamW's.

    Attributes
    ----------
    report
        The :class:`~histo2expr.models.FitReport` the epochs are recorded in.
    """

    def __init__(self, network: SpotNetwork, *, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.network = network
        self.lr, self.weight_decay = lr, weight_decay
        self.report = FitReport()
        self._sums: dict[str, list] = {}

    def accumulate(self, name: str, value: torch.Tensor, n_spots: int) -> None:
        """Add the value of a batch of ``n_spots`` spots to the epoch mean of ``name``."""
        self.add_sum(name, value.detach().float() * n_spots, n_spots)

    def add_sum(self, name: str, total: torch.Tensor, n_spots: int) -> None:
        """Add ``total``, a sum over a batch of ``n_spots`` spots, to the epoch's sum of ``name``."""
        if name in self._sums:
            self._sums[name][0] = self._sums[name][0] + total
            self._sums[name][1] += n_spots
        else:
            self._sums[name] = [total, n_spots]

    def epoch_means(self, prefix: str) -> dict[str, float]:
        """The epoch means of the accumulated values whose name starts with ``prefix``, over all processes."""
        means = {}
        for name in sorted(key for key in self._sums if key.startswith(prefix)):  # one order on every process
            total, count = self.epoch_sum(name)
            means[name] = float(total / count)
        return means

    def epoch_sum(self, name: str) -> tuple[torch.Tensor, float]:
        """The epoch's sum of ``name`` and its number of spots over all processes, in one reduction; the sum restarts."""
        total, count = self._sums.pop(name)
        flat = torch.cat(
            [total.to(self.device).reshape(-1), torch.tensor([float(count)], device=self.device)]
        )
        flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
        return flat[:-1].reshape(total.shape), float(flat[-1])

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """The loss of one training batch; the loss and its terms join the epoch means."""
        output = self.network.loss(batch)
        size = len(batch["position"])
        self.accumulate("train_loss", output.loss, size)
        for name, term in output.terms.items():
            self.accumulate(f"train_{name}", term, size)
        return output.loss

    def on_train_epoch_end(self) -> None:
        """Record the epoch's means; a loss that is not finite stops training with a clear error."""
        means = self.epoch_means("train_")
        loss = means.pop("train_loss")
        if not math.isfinite(loss):
            msg = (
                f"The training loss became {loss} at epoch {self.current_epoch}; lower `lr` "
                f"(now {self.lr}) or check the input features for extreme values."
            )
            raise FloatingPointError(msg)
        self.report.train_loss.append(loss)
        for name, value in means.items():
            self.report.train_terms.setdefault(name.removeprefix("train_"), []).append(value)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """The network's validation metric of one batch (its correlation moments with ``validation_metric="pcc"``)."""
        n_spots = len(batch["position"])
        if self.network.validation_metric == "pcc":
            moments = correlation_moments(self.network.validation_predictions(batch), batch["targets"])
            self.add_sum(VALIDATION_METRIC, moments, n_spots)
        else:
            self.accumulate(VALIDATION_METRIC, self.network.validation_loss(batch), n_spots)

    def on_validation_epoch_end(self) -> None:
        """Log the validation metric of the pass, and record it when fitting."""
        if self.network.validation_metric == "pcc":
            value = 1 - mean_correlation(*self.epoch_sum(VALIDATION_METRIC))
        else:
            value = self.epoch_means(VALIDATION_METRIC)[VALIDATION_METRIC]
        self.log(VALIDATION_METRIC, value)
        if _fitting(self.trainer) and not self.trainer.sanity_checking:
            self.report.validation_loss.append(value)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW on the trainable parameters; those of a submodule with an ``lr_scale`` at ``lr * lr_scale``."""
        scaled: dict[int, float] = {}
        for module in self.network.modules():
            scale = getattr(module, "lr_scale", None)
            if scale is not None:
                scaled.update({id(p): float(scale) for p in module.parameters()})
        groups: dict[float, list[nn.Parameter]] = {}
        for parameter in self.network.parameters():
            if parameter.requires_grad:
                groups.setdefault(scaled.get(id(parameter), 1.0), []).append(parameter)
        return torch.optim.AdamW(
            [{"params": params, "lr": self.lr * scale} for scale, params in groups.items()],
            lr=self.lr,
            weight_decay=self.weight_decay,
            # one pass over the weights per step (a third of the CPU time of the per-op foreach step); the same
            # update up to float rounding (benchmarks/results/nh2st_training_speed.md)
            fused=True,
        )


def _fitting(trainer: lightning.Trainer) -> bool:
    """Whether ``trainer`` runs ``fit`` (not a ``validate`` run before it)."""
    return trainer.state.fn == TrainerFn.FITTING


class EpochEMA(WeightAveraging):
    """An exponential moving average of the weights whose time constant is counted in epochs.

    Lightning's ``WeightAveraging`` (a ``torch.optim.swa_utils.AveragedModel`` of the plan)
    updates the average after every optimiser step with ``decay = exp(-1 / (epochs * steps))``,
    ``steps`` the batches of an epoch, so a weight update counts half after ``0.69 * epochs``
    epochs whatever the number of spots; validation runs on the averaged weights, and they are
    the ones kept when training ends. Buffers are not averaged (they follow the model).

    Parameters
    ----------
    epochs
        Time constant of the average in epochs (positive).
    """

    def __init__(self, epochs: float) -> None:
        super().__init__(use_buffers=False, multi_avg_fn=self._average)
        self.epochs = float(epochs)
        self.decay = 0.0

    def _average(
        self, averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor
    ) -> None:
        """``averaged = lerp(current, averaged, decay)`` for all weights at once (one foreach call, not one per weight)."""
        torch._foreach_copy_(averaged, torch._foreach_lerp(current, averaged, self.decay))

    def setup(self, trainer: lightning.Trainer, plan: TrainingPlan, stage: str) -> None:
        """Keep the average on the training device (Lightning's default is where the plan is before it moves)."""
        if self._device is None:
            self._device = trainer.strategy.root_device
        super().setup(trainer, plan, stage)

    def on_train_epoch_start(self, trainer: lightning.Trainer, plan: TrainingPlan) -> None:
        """Set the decay per step from this process's batches of this epoch (the engine's data module)."""
        batches = trainer.datamodule.train_batches(epoch=trainer.current_epoch)
        steps = max(1, len(batches) // trainer.world_size)
        self.decay = math.exp(-1 / (self.epochs * steps))

    def averaged_network(self) -> nn.Module | None:
        """The network with the averaged weights (`None` before fitting starts)."""
        return None if self._average_model is None else self._average_model.module.network


class BestWeights(Callback):
    """Keep, in memory, the weights of the best validation epoch and put them back when fitting ends.

    A validation run before fitting (``trainer.validate``) counts too: its weights (the
    untrained ones) stay when no epoch beats them. Every process keeps its own copy, so no
    file is written and multi-node runs need no shared folder. (Lightning's ``ModelCheckpoint``
    writes checkpoint files, which the many small fits of a cross-validation do not need.)

    Parameters
    ----------
    averaging
        With an :class:`EpochEMA`, the averaged weights (those validated) are the ones kept.

    Attributes
    ----------
    best
        The best value of :data:`VALIDATION_METRIC` so far.
    best_epoch
        Its epoch; `None` for the run before fitting.
    """

    def __init__(self, averaging: EpochEMA | None = None) -> None:
        self.averaging = averaging
        self.best = math.inf
        self.best_epoch: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: lightning.Trainer, plan: TrainingPlan) -> None:
        """Copy the weights (the averaged ones when averaging) when the metric improved."""
        value = trainer.callback_metrics.get(VALIDATION_METRIC)
        if trainer.sanity_checking or value is None or not float(value) < self.best:
            return
        self.best = float(value)
        self.best_epoch = trainer.current_epoch if _fitting(trainer) else None
        network = self.averaging.averaged_network() if self.averaging is not None else None
        network = plan.network if network is None or not _fitting(trainer) else network
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}

    def on_fit_end(self, trainer: lightning.Trainer, plan: TrainingPlan) -> None:
        """Load the best weights."""
        if self.weights is not None:
            plan.network.load_state_dict(self.weights)


class EpochBar(ProgressBar):
    """One progress bar per fit, over the epochs, with the last losses (on the first process only)."""

    def __init__(self) -> None:
        super().__init__()
        self.bar = None
        self.enabled = True

    def disable(self) -> None:
        """Show nothing (Lightning calls it on every process but the first)."""
        self.enabled = False

    def enable(self) -> None:
        """Show the bar."""
        self.enabled = True

    def on_train_start(self, trainer: lightning.Trainer, plan: TrainingPlan) -> None:
        """Open the bar."""
        from .._progress import progress_bar

        self.bar = progress_bar(
            total=trainer.max_epochs, desc="epochs", leave=False, disable=not self.enabled
        )

    def _show(self, plan: TrainingPlan) -> None:
        """Count the epochs the plan has recorded and show their last losses."""
        report = plan.report
        shown = {"train": report.train_loss, "validation": report.validation_loss}
        self.bar.set_postfix({k: f"{v[-1]:.4f}" for k, v in shown.items() if v}, refresh=False)
        self.bar.update(len(report.train_loss) - self.bar.n)

    def on_train_epoch_start(self, trainer: lightning.Trainer, plan: TrainingPlan) -> None:
        """Show the epochs done so far."""
        self._show(plan)

    def on_train_end(self, trainer: lightning.Trainer, plan: TrainingPlan) -> None:
        """Show the last epoch and close the bar."""
        self._show(plan)
        self.bar.close()


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning without its banners, tips and hints that do not apply to these small, deliberate fits.

    Its info messages ("GPU available", "`Trainer.fit` stopped") are raised to warnings level,
    and its possible-user warnings (few DataLoader workers, a validation step without
    validation data, an unused GPU) are not shown; real warnings and errors pass.
    """
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=PossibleUserWarning)
            warnings.filterwarnings(
                "ignore", message=r".*(GPU available but not used|LeafSpec)", category=Warning
            )
            warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def seed_everything(seed: int) -> None:
    """Seed every generator (torch's on all devices, numpy's and Python's global ones) with Lightning."""
    lightning.seed_everything(seed, workers=False, verbose=False)


def check_engine_flags(config: TrainConfig) -> None:
    """Raise a ``ValueError`` naming the flag and its choices when Lightning refuses ``config``'s engine flags.

    Lightning checks ``accelerator``, ``devices``, ``strategy``, ``num_nodes`` and ``precision`` when
    it builds a Trainer; one is built here (quietly, never run) so that a command can refuse bad
    flags before any work.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        with quiet_lightning():
            make_trainer(config, validation=False, callbacks=[])
    except MisconfigurationException as error:  # its message names the flag and the choices
        raise ValueError(str(error)) from error


def make_trainer(config: TrainConfig, *, validation: bool, callbacks: list[Callback]) -> lightning.Trainer:
    """A light ``lightning.pytorch.Trainer`` with ``config``'s engine flags.

    No logger, no checkpoint files, no model summary; early stopping and the best weights when
    there are validation spots; one epoch bar when ``config.progress``. Lightning's distributed
    sampler is off: :class:`~histo2expr.models.batches.BatchOrder` shares the batches itself.
    """
    callbacks = list(callbacks)
    if validation:
        if config.patience is None:
            msg = "The config's `patience` is None (the method's own): resolve it with `config.for_method(method)` first."
            raise ValueError(msg)
        callbacks.append(EarlyStopping(monitor=VALIDATION_METRIC, mode="min", patience=config.patience))
    if config.progress:
        callbacks.append(EpochBar())
    trainer = lightning.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=config.strategy,
        num_nodes=config.num_nodes,
        precision=config.resolved_precision,
        max_epochs=config.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=config.progress,
        num_sanity_val_steps=0,
        limit_val_batches=None if validation else 0,
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        msg = (
            f"strategy={config.strategy!r} trains in processes spawned or forked from this one, which cannot hand "
            "back the fit report and a method's later phases; use strategy='ddp' from a script or the "
            "`histo2expr fit` command (every process runs it; see the docs page 'Scaling out')."
        )
        raise ValueError(msg)
    return trainer


def train_network(
    network: SpotNetwork,
    train_spots: SpotSet,
    validation: SpotSet | None,
    config: TrainConfig,
    *,
    plan: TrainingPlan | None = None,
    train_batches: Batches | None = None,
    validate_untrained: bool = False,
    average_epochs: float | None = None,
) -> tuple[FitReport, torch.device]:
    """Train ``network`` on ``train_spots`` with Lightning; keep the weights of the best validation epoch.

    Parameters
    ----------
    network
        What is trained.
    train_spots, validation
        The training spots and the inner validation spots (training slides only), ready for the
        network. Without validation spots the last epoch's weights are kept.
    config
        Epochs, batch size, learning rate, patience, seed, workers, progress and the engine flags.
    plan
        A plan of the method's own (e.g. with another validation step); by default a
        :class:`TrainingPlan` of ``network``.
    train_batches
        ``train_batches(epoch=e) -> list of row arrays`` for methods that need special batches (spatially
        coherent ones); by default shuffled batches of ``config.batch_size``.
    validate_untrained
        Score the untrained network on the validation spots first: when no epoch beats it, its
        weights are kept (``report.best_epoch`` is then `None`, and
        ``report.notes["untrained_validation_loss"]`` holds its score).
    average_epochs
        Train with an exponential moving average of the weights (``training.EpochEMA``) of
        this time constant in epochs: validation, early stopping and the weights kept use the
        average.
        `None` (default): the weights as trained.

    Returns
    -------
    Two values:

    report
        The :class:`~histo2expr.models.base.FitReport`.
    device
        The device this process trained on. The network ends in evaluation mode, on the CPU.
    """
    has_validation = validation is not None and len(validation) > 0
    plan = plan or TrainingPlan(network, lr=config.lr, weight_decay=config.weight_decay)
    data = SpotDataModule(
        train_spots,
        validation if has_validation else None,
        batch_size=config.batch_size,
        seed=config.seed,
        num_workers=config.num_workers,
        train_batches=train_batches,
    )
    averaging = None if average_epochs is None else EpochEMA(average_epochs)
    best = BestWeights(averaging)
    callbacks = ([] if averaging is None else [averaging]) + ([best] if has_validation else [])
    untrained = None
    with quiet_lightning():
        trainer = make_trainer(config, validation=has_validation, callbacks=callbacks)
        if validate_untrained and has_validation:
            untrained = trainer.validate(plan, datamodule=data, verbose=False)[0][VALIDATION_METRIC]
        trainer.fit(plan, datamodule=data)
    report = plan.report
    report.best_epoch = best.best_epoch if has_validation else len(report.train_loss) - 1
    if untrained is not None:
        report.notes["untrained_validation_loss"] = float(untrained)
    network.eval()
    return report, trainer.strategy.root_device
