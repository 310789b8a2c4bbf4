"""Spots served to torch in whole batches, in every regime, in the orders methods ask for.

- :class:`SpotBatches`: a dataset whose items are whole batches, ``(rows, epoch)`` ->
  ``{"position", "coords", "features" and / or "image" or "activations", "targets"}``: frozen
  features from memory, image patches through :class:`~histo2expr.patches.PatchDataset`
  (augmented for training), or cached lower-block activations (one view per spot for training).
- :class:`BatchOrder`: the sampler of those items. It draws the batches of an epoch from a
  function of the epoch (shuffled batches by default, spatially coherent ones for methods that
  need them), takes this process's share of them under data-parallel training, and follows
  :meth:`BatchOrder.set_epoch`, which Lightning calls before every epoch.
- :class:`SpotDataModule`: the training and validation loaders of one fit.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import lightning.pytorch as lightning
import numpy as np
import torch
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .base import SpotSet

Batch = dict[str, torch.Tensor]
#: Batches of one epoch, as arrays of rows: ``batches(epoch=e) -> [rows, rows, ...]``.
Batches = Callable[[int], list[np.ndarray]]


def shuffled_batches(epoch: int, *, n: int, batch_size: int, seed: int, drop_last: bool) -> list[np.ndarray]:
    """Rows ``0..n-1`` in a random order drawn from ``(seed, epoch)``, cut into batches of ``batch_size``.

    With ``drop_last`` a last, smaller batch is dropped (unless it is the only one): losses
    computed across the batch need a few spots.
    """
    rows = np.random.default_rng([seed, epoch]).permutation(n)
    batches = [rows[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches = batches[:-1]
    return batches


def ordered_batches(epoch: int, *, n: int, batch_size: int) -> list[np.ndarray]:
    """Rows ``0..n-1`` in order, cut into batches of ``batch_size`` (the same every epoch)."""
    return [np.arange(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


class SpotBatches:
    """Map-style dataset whose items are whole batches of spots.

    Item ``(rows, epoch)`` is ``{"position": rows, "coords", "slide", "targets"}`` (``slide``: integer
    codes of the spots' groups; targets when the spots have them) plus ``"features"`` (frozen regime) or ``"image"`` (end-to-end regime: uint8
    ``(B, 3, H, W)`` patches, augmented from ``(seed, epoch, spot)`` when ``augment``) or
    ``"activations"`` (adapted regime: ``(B, C, h, w)``, one cached view per spot drawn from
    ``(seed, epoch, spot)`` when ``augment``, else ``(B, tta, C, h, w)``, the views inference
    averages; with the optional frozen ``"features"``).

    Parameters
    ----------
    spots
        The spots.
    augment
        Training augmentations of the patches, or a random cached view (end-to-end and adapted regimes).
    seed
        Seed of the augmentations.
    """

    def __init__(self, spots: SpotSet, *, augment: bool = False, seed: int = 0) -> None:
        from ..patches import PatchDataset

        self.spots = spots
        self.augment, self.seed = augment, seed
        self.slides = np.unique(np.asarray(spots.groups), return_inverse=True)[1].reshape(-1)
        self.patches = None
        if spots.patches is not None:
            self.patches = PatchDataset(spots.patches, indices=spots.indices, augment=augment, seed=seed)

    def __getitem__(self, item: tuple[np.ndarray, int]) -> Batch:
        rows, epoch = item
        spots = self.spots
        batch = {
            "position": torch.as_tensor(rows, dtype=torch.long),
            "coords": torch.as_tensor(spots.coords[rows], dtype=torch.float32),
            "slide": torch.as_tensor(self.slides[rows], dtype=torch.long),
        }
        if spots.features is not None:
            batch["features"] = torch.as_tensor(spots.features[rows], dtype=torch.float32)
        if spots.targets is not None:
            batch["targets"] = torch.as_tensor(spots.targets[rows], dtype=torch.float32)
        if self.patches is not None:
            batch["image"] = torch.stack([self.patches[(int(row), epoch)]["image"] for row in rows])
        if spots.activations is not None:
            indices = spots.indices[rows]
            batch["activations"] = (
                spots.activations.training_views(indices, epoch=epoch, seed=self.seed)
                if self.augment
                else spots.activations.inference_views(indices)
            )
        return batch


class BatchOrder:
    """Sampler of whole batches, ``(rows, epoch)``, for :class:`SpotBatches`.

    Parameters
    ----------
    batches
        ``batches(epoch=e) -> list of row arrays``: the batches of every epoch, the same in every
        process.
    rank, world_size
        This process and the number of processes training together: each takes every
        ``world_size``-th batch, starting at its rank.
    equal_shares
        Give every process the same number of batches (training: the processes step together);
        batches beyond a multiple of ``world_size`` are left out. Otherwise (evaluation) the shares
        may differ by one, and with fewer batches than processes every process takes them all.
    """

    def __init__(
        self, batches: Batches, *, rank: int = 0, world_size: int = 1, equal_shares: bool = True
    ) -> None:
        self.batches = batches
        self.rank, self.world_size = rank, world_size
        self.equal_shares = equal_shares
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Serve the batches of ``epoch`` (Lightning calls it before every epoch)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        batches = self.batches(epoch=self.epoch)
        if self.world_size > 1:
            if self.equal_shares:
                if len(batches) < self.world_size:
                    msg = (
                        f"An epoch has {len(batches)} batch(es), too few for {self.world_size} processes training "
                        "together; lower `batch_size` or train on fewer devices."
                    )
                    raise ValueError(msg)
                batches = batches[: len(batches) - len(batches) % self.world_size]
            if self.equal_shares or len(batches) >= self.world_size:
                batches = batches[self.rank :: self.world_size]
        return iter([(rows, self.epoch) for rows in batches])


def batch_loader(
    spots: SpotSet, order: BatchOrder, *, augment: bool, seed: int, num_workers: int, persistent: bool = False
) -> DataLoader:
    """A DataLoader of whole batches of ``spots`` in ``order``.

    Its random state is its own generator, so iterating it never draws from torch's global
    generator (which drives initialisation and dropout).
    """
    if num_workers > 0 and spots.patches is not None:
        spots.patches.prepare(spots.indices)  # decode compressed images once, before the workers start
    return DataLoader(
        SpotBatches(spots, augment=augment, seed=seed),
        sampler=order,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


class SpotDataModule(lightning.LightningDataModule):
    """The training and validation spots of one fit, served in whole batches.

    Training batches are shuffled every epoch (``(seed, epoch)``; a smaller last batch is
    dropped) unless ``train_batches`` gives a method's own order; end-to-end patches are
    augmented, and adapted spots serve a random cached view. Validation batches are the validation spots in order, never augmented. Under
    data-parallel training every process takes its share of the batches (:class:`BatchOrder`).

    Parameters
    ----------
    train, validation
        The spots, ready for the network (see :meth:`~histo2expr.models.layers.ImageInput.prepare`).
    batch_size
        Spots per batch.
    seed
        Seed of the order and the augmentations.
    num_workers
        DataLoader workers (end-to-end regime).
    train_batches
        ``train_batches(epoch=e) -> list of row arrays`` of ``train``, e.g. spatially coherent batches.
    """

    def __init__(
        self,
        train: SpotSet,
        validation: SpotSet | None,
        *,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        train_batches: Batches | None = None,
    ) -> None:
        super().__init__()
        self.train, self.validation = train, validation
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.train_batches = train_batches or partial(
            shuffled_batches, n=len(train), batch_size=batch_size, seed=seed, drop_last=True
        )

    def _shard(self) -> dict[str, Any]:
        trainer = self.trainer
        return {"rank": trainer.global_rank, "world_size": trainer.world_size} if trainer else {}

    def train_dataloader(self) -> DataLoader:
        """Shuffled (or the method's) batches of the training spots, this process's share."""
        return batch_loader(
            self.train,
            BatchOrder(self.train_batches, **self._shard()),
            augment=self.train.regime != "frozen",
            seed=self.seed,
            num_workers=self.num_workers,
            persistent=True,
        )

    def val_dataloader(self) -> DataLoader | list:
        """The validation spots in order, this process's share (none without validation spots)."""
        if self.validation is None:
            return []
        order = partial(ordered_batches, n=len(self.validation), batch_size=self.batch_size)
        return batch_loader(
            self.validation,
            BatchOrder(order, equal_shares=False, **self._shard()),
            augment=False,
            seed=self.seed,
            num_workers=self.num_workers,
            persistent=True,
        )
