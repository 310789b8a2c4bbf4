"""The one training loop every torch method uses: mini-batches in both regimes, early stopping, AMP.

Methods supply a module and a function computing the loss of a batch; this module
serves the batches (frozen features from memory, or image patches through the patch
DataLoader), steps AdamW, evaluates the inner validation set after every epoch, keeps
the best weights and stops when the validation loss has not improved for
``patience`` epochs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from ._device import resolve_device
from .base import FitReport, SpotSet, TrainConfig

Batch = dict[str, torch.Tensor]


def seed_everything(seed: int) -> None:
    """Seed torch's global generators (CPU and CUDA) so initialisation is reproducible."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def autocast(device: torch.device) -> Any:
    """bfloat16 autocast on CUDA, nothing elsewhere (CPU runs stay bit-reproducible)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def check_training_spots(train: SpotSet, validation: SpotSet | None) -> int:
    """Check that training (and validation) spots carry finite targets of one width; return the width.

    Raises a clear error when ``train`` is empty or has no ``targets``, when targets are
    not finite, or when the validation spots differ from the training spots in regime
    or number of genes.
    """
    if len(train) == 0 or train.targets is None:
        msg = "Fitting needs training spots with `targets` (standardised expression); got none."
        raise ValueError(msg)
    targets = np.asarray(train.targets)
    if targets.ndim != 2 or targets.shape[1] == 0:
        msg = (
            f"`targets` must be a 2-D (spots, genes) array with at least one gene, got shape {targets.shape}."
        )
        raise ValueError(msg)
    for name, spots in (("training", train), ("validation", validation)):
        if spots is None or len(spots) == 0:
            continue
        if spots.targets is None or np.shape(spots.targets)[1:] != targets.shape[1:]:
            got = None if spots.targets is None else np.shape(spots.targets)
            msg = f"The {name} spots need `targets` with {targets.shape[1]} genes, like the training spots; got {got}."
            raise ValueError(msg)
        if spots.regime != train.regime:
            msg = f"The validation spots are {spots.regime!r} but the training spots are {train.regime!r}; use one regime."
            raise ValueError(msg)
        if not np.isfinite(spots.targets).all():
            msg = f"The {name} `targets` contain NaN or infinite values; impute or drop those spots first."
            raise ValueError(msg)
    return int(targets.shape[1])


def _batch_tensors(data: SpotSet, positions: np.ndarray, device: torch.device) -> Batch:
    batch: Batch = {
        "position": torch.as_tensor(positions, dtype=torch.long, device=device),
        "coords": torch.as_tensor(data.coords[positions], dtype=torch.float32, device=device),
    }
    if data.features is not None:
        batch["features"] = torch.as_tensor(data.features[positions], dtype=torch.float32, device=device)
    if data.targets is not None:
        batch["targets"] = torch.as_tensor(data.targets[positions], dtype=torch.float32, device=device)
    return batch


def iterate_batches(
    data: SpotSet,
    *,
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    order: list[np.ndarray] | None = None,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """Mini-batches of ``data`` as tensors on ``device``.

    Every batch has ``position`` (rows of ``data``), ``coords`` and, when present,
    ``targets``; the frozen regime adds ``features`` and the end-to-end regime
    ``image`` (uint8, ``(B, 3, H, W)``, augmented when ``augment``).

    Parameters
    ----------
    data
        The spots.
    batch_size
        Spots per batch.
    device
        Where the tensors go.
    shuffle
        Random order drawn from ``(seed, epoch)``; otherwise the rows in order.
    augment
        Training augmentations of the patches (end-to-end regime only).
    seed, epoch
        Seeds of the order and the augmentations.
    num_workers
        DataLoader workers reading patches (end-to-end regime).
    order
        Explicit batches (arrays of rows), e.g. spatially coherent ones; overrides
        ``batch_size`` and ``shuffle``.
    drop_last
        Drop a last batch smaller than ``batch_size`` (useful for batch-statistics losses).
    """
    if order is None:
        rows = (
            np.random.default_rng([seed, epoch]).permutation(len(data)) if shuffle else np.arange(len(data))
        )
        order = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        if drop_last and len(order) > 1 and len(order[-1]) < batch_size:
            order = order[:-1]
    if data.patches is None:
        for rows in order:
            yield _batch_tensors(data, rows, device)
        return
    yield from _image_batches(
        data, order, device, augment=augment, seed=seed, epoch=epoch, num_workers=num_workers
    )


def _image_batches(
    data: SpotSet,
    order: list[np.ndarray],
    device: torch.device,
    *,
    augment: bool,
    seed: int,
    epoch: int,
    num_workers: int,
) -> Iterator[Batch]:
    from torch.utils.data import DataLoader

    from ..patches import PatchDataset

    dataset = PatchDataset(data.patches, indices=data.indices, augment=augment, seed=seed)
    loader = DataLoader(
        dataset,
        batch_sampler=[[(int(row), epoch) for row in rows] for rows in order],
        num_workers=num_workers,
    )
    for rows, images in zip(order, loader, strict=True):
        batch = _batch_tensors(data, rows, device)
        batch["image"] = images["image"].to(device, non_blocking=True)
        yield batch


def evaluate_loss(
    module: nn.Module,
    loss_fn: Callable[[Batch], torch.Tensor],
    data: SpotSet,
    *,
    config: TrainConfig,
    device: torch.device,
) -> float:
    """Mean loss of ``data`` in evaluation mode, batches weighted by their size."""
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(device):
        for batch in iterate_batches(
            data, batch_size=config.batch_size, device=device, num_workers=config.num_workers
        ):
            size = len(batch["position"])
            total += float(loss_fn(batch)) * size
            count += size
    return total / max(count, 1)


def train_module(
    module: nn.Module,
    loss_fn: Callable[[Batch], torch.Tensor],
    train: SpotSet,
    validation: SpotSet | None,
    config: TrainConfig,
    *,
    batch_order: Callable[[int], list[np.ndarray]] | None = None,
    drop_last: bool = True,
) -> FitReport:
    """Train ``module`` with AdamW on ``loss_fn``; keep the weights of the best validation epoch.

    Parameters
    ----------
    module
        Everything trainable (its parameters are optimised).
    loss_fn
        Loss of one batch (see :func:`iterate_batches` for its keys); must be a scalar.
    train, validation
        Training spots and the inner validation spots (training slides only). Without
        validation the last epoch's weights are kept.
    config
        Epochs, batch size, learning rate, patience, seed, device, workers, progress.
    batch_order
        ``epoch -> list of row arrays`` for methods that need special batches
        (spatially coherent ones); default: shuffled batches of ``config.batch_size``.
    drop_last
        Drop a last, smaller training batch (losses computed over the batch need
        a few spots).

    Returns
    -------
    The :class:`~histo2expr.models.base.FitReport` with losses per epoch and the best epoch.
    """
    from .._progress import progress_bar

    device = resolve_device(config.device)
    module.to(device)
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    report = FitReport()
    best_loss, best_state, stale = math.inf, None, 0
    epochs = progress_bar(range(config.epochs), desc="epochs", disable=not config.progress, leave=False)
    for epoch in epochs:
        module.train()
        total, count = 0.0, 0
        order = batch_order(epoch) if batch_order is not None else None
        for batch in iterate_batches(
            train,
            batch_size=config.batch_size,
            device=device,
            shuffle=True,
            augment=train.regime == "end2end",
            seed=config.seed,
            epoch=epoch,
            num_workers=config.num_workers,
            order=order,
            drop_last=drop_last,
        ):
            with autocast(device):
                loss = loss_fn(batch)
            if not torch.isfinite(loss):
                msg = (
                    f"The training loss became {float(loss)} at epoch {epoch}; lower `lr` "
                    f"(now {config.lr}) or check the input features for extreme values."
                )
                raise FloatingPointError(msg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            size = len(batch["position"])
            total += float(loss.detach()) * size
            count += size
        report.train_loss.append(total / max(count, 1))
        if validation is None or len(validation) == 0:
            report.best_epoch = epoch
            epochs.set_postfix(train=f"{report.train_loss[-1]:.4f}")
            continue
        val_loss = evaluate_loss(module, loss_fn, validation, config=config, device=device)
        report.validation_loss.append(val_loss)
        epochs.set_postfix(train=f"{report.train_loss[-1]:.4f}", validation=f"{val_loss:.4f}")
        if val_loss < best_loss:
            best_loss, stale, report.best_epoch = val_loss, 0, epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in module.state_dict().items()})
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return report


def predict_batches(
    forward: Callable[[Batch], torch.Tensor],
    data: SpotSet,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
) -> np.ndarray:
    """Apply ``forward`` to every batch of ``data`` in order; one output row per spot (float32).

    Each spot's output depends on that spot alone (evaluation mode, no batch statistics).
    """
    outputs = []
    with torch.no_grad(), autocast(device):
        for batch in iterate_batches(data, batch_size=batch_size, device=device, num_workers=num_workers):
            outputs.append(forward(batch).float().cpu().numpy())
    return np.concatenate(outputs, axis=0) if outputs else np.zeros((0, 0), dtype=np.float32)
