"""Serve the patches of a :class:`PatchSource` to torch, in batches, with DataLoader workers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._validation import positive_int, seed_value
from ._augment import Augment, augment_rng
from ._source import check_indices

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import torch

    from ._source import PatchSource


class PatchDataset:
    """Map-style torch dataset of the patches of some spots.

    Works with :class:`torch.utils.data.DataLoader` (also with ``num_workers > 0``: it pickles
    without pixels). Item ``i`` is ``{"image": uint8 tensor (3, H, W), "index": int}`` where
    ``index`` is the spot's position in ``source`` (and in the AnnData it was built from).
    Normalising the pixels is the encoder's job.

    Parameters
    ----------
    source
        Where the patches are cut.
    indices
        Spot positions served, in this order; all spots when ``None``.
    augment
        ``False``: the patches exactly as ``source`` cuts them (deterministic, for evaluation).
        ``True``: random flips, 90° rotations and light colour jitter (:class:`Augment` defaults),
        or an :class:`Augment` with other strengths. The augmentation of a spot depends only on
        ``(seed, epoch, index)``, never on the worker that reads it.
    seed
        Seed of the augmentations.

    Notes
    -----
    An item may also be requested as ``dataset[(i, epoch)]``, which is how the sampler of
    :func:`patch_loader` passes the epoch to workers that outlive one epoch
    (``persistent_workers=True``), where :meth:`set_epoch` on the parent's copy would not be seen.
    """

    def __init__(
        self,
        source: PatchSource,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        augment: bool | Augment = False,
        seed: int = 0,
    ) -> None:
        self.source = source
        self.indices = np.arange(len(source)) if indices is None else check_indices(indices, len(source))
        if augment is True:
            augment = Augment()
        if augment is not False and not isinstance(augment, Augment):
            msg = f"`augment` must be True, False or an `Augment(...)`, got {augment!r}."
            raise TypeError(msg)
        self.augment: Augment | None = augment or None
        self.seed = seed_value(seed, "seed")
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentations of ``epoch`` for items requested without an epoch."""
        self.epoch = seed_value(epoch, "epoch")

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        import torch

        position, epoch = item if isinstance(item, tuple) else (item, self.epoch)
        index = int(self.indices[position])
        patch = self.source[index]
        if self.augment is not None:
            patch = self.augment(patch, augment_rng(self.seed, epoch, index))
        image = torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1)))
        return {"image": image, "index": index}


class EpochSampler:
    """Yield ``(position, epoch)`` for every item of a dataset, one epoch per iteration.

    Parameters
    ----------
    order
        Dataset positions in the order served when not shuffling.
    shuffle
        Serve a new permutation of ``order`` every epoch, drawn from ``(seed, epoch)``.
    seed
        Seed of the permutations.

    Notes
    -----
    Each ``iter()`` serves the current epoch and then advances it, so successive passes over a
    DataLoader get new orders and new augmentations; :meth:`set_epoch` sets the next one (e.g. to
    resume a run).
    """

    def __init__(self, order: np.ndarray, *, shuffle: bool, seed: int) -> None:
        self.order = np.asarray(order, dtype=np.int64)
        self.shuffle = shuffle
        self.seed = seed_value(seed, "seed")
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        """Serve ``epoch`` at the next iteration."""
        self.epoch = seed_value(epoch, "epoch")

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(self.order) if self.shuffle else self.order
        )
        return iter([(int(position), epoch) for position in order])


def patch_loader(
    source: PatchSource,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    augment: bool | Augment = False,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    persistent_workers: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader of patch batches ``{"image": uint8 (B, 3, H, W), "index": int64 (B,)}``.

    Without shuffling the spots come slide after slide (:meth:`PatchSource.slide_order`), so each
    worker maps one slide image at a time; that is also the order of a deterministic evaluation
    pass. Use ``batch["index"]`` to place the results: it is the spot position in ``source``.

    Parameters
    ----------
    source
        Where the patches are cut.
    indices
        Spot positions to serve; all spots when ``None``.
    batch_size
        Patches per batch.
    num_workers
        DataLoader worker processes (0: read in this process).
    augment
        Training augmentations (see :class:`PatchDataset`).
    shuffle
        Serve the spots in a new random order every epoch, drawn from ``(seed, epoch)``.
    seed
        Seed of the order and of the augmentations.
    drop_last
        Drop the last, incomplete batch.
    persistent_workers
        Keep the workers alive between epochs (see :class:`torch.utils.data.DataLoader`).

    Returns
    -------
    A :class:`torch.utils.data.DataLoader` whose ``sampler`` is an :class:`EpochSampler`: each pass
    advances the epoch, which changes the order (when shuffling) and the augmentations.
    """
    from torch.utils.data import DataLoader

    positive_int(batch_size, "batch_size")
    dataset = PatchDataset(source, indices=indices, augment=augment, seed=seed)
    if num_workers > 0:
        source.prepare(dataset.indices)  # decode compressed images once, before the workers start
    # Positions into the dataset, grouped by slide; within a slide the given order is kept.
    order = np.argsort(source.slide_codes[dataset.indices], kind="stable")
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        sampler=EpochSampler(order, shuffle=shuffle, seed=seed),
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=persistent_workers and num_workers > 0,
    )
