"""CMRCNet on her2st, epoch by epoch: how far the held-out PCC moves between epochs, with and without weight averaging.

A diagnostic, not a protocol: one leave-one-slide-out fold per held-out slide, trained for a fixed
number of epochs without early stopping; after every epoch the weights that would be validated (the
moving average with ``average_epochs``, else the current ones) are scored by the retrieval that
inference uses, on the inner validation slide (gallery: the fit spots) and on the held-out slide
(gallery: fit and validation spots). Nothing of the held-out slide chooses anything. Reads the
cached ``f1:4+nbr6`` features of ``her2st_features.py`` (run its ``embed --tokens`` step first):

    python benchmarks/her2st_cmrcnet_epochs.py [--slides B4,C4] [--seed 0] [--epochs 40] [--threads 1]

Writes benchmarks/results/her2st_cmrcnet_epochs.md.
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import pandas as pd
import torch
from _her2st import save_results
from her2st_features import build, cohort
from lightning.pytorch.callbacks import Callback

from histo2expr._validation import log_expression
from histo2expr.metrics import pcc_acg
from histo2expr.models import get_method, training
from histo2expr.models.base import SpotSet, TrainConfig, concat_spots
from histo2expr.models.gallery import Gallery
from histo2expr.models.inference import predict_batches
from histo2expr.models.scaling import Standardizer
from histo2expr.pp import select_genes
from histo2expr.splits import inner_validation_split, leave_one_slide_out

SETTING = "f1:4+nbr6"
VARIANTS = {"no averaging": None, "average_epochs=3": 3.0}


class EpochScores(Callback):
    """After every validation pass, the retrieval PCC(ACG) of the validated weights on two slides."""

    def __init__(self, fit: SpotSet, validation: SpotSet, test: SpotSet, truth: np.ndarray) -> None:
        self.fit, self.validation, self.test, self.truth = fit, validation, test, truth
        self.rows: list[dict] = []

    def _score(self, network, queries: SpotSet, gallery: SpotSet, truth: np.ndarray) -> float:
        keys = network.gene_head(torch.from_numpy(gallery.targets)).float()
        embedded = predict_batches(network, network.image_input.prepare(queries), batch_size=64, device="cpu")
        return pcc_acg(truth, Gallery(keys, gallery.targets, top_k=50).predict(embedded))

    def on_validation_end(self, trainer, plan) -> None:
        if trainer.sanity_checking:
            return
        network = plan.network
        for callback in trainer.callbacks:
            if isinstance(callback, training.EpochEMA):
                network = callback.averaged_network()
        mode = network.training
        network.eval()
        with torch.no_grad():
            everything = concat_spots([self.fit, self.validation])
            self.rows.append(
                {
                    "epoch": trainer.current_epoch,
                    "validation": self._score(network, self.validation, self.fit, self.validation.targets),
                    "held out": self._score(network, self.test, everything, self.truth),
                }
            )
        network.train(mode)


def trace(adata, tokens, slide: str, seed: int, epochs: int, average: float | None) -> pd.DataFrame:
    """The epoch scores of the fold that holds out ``slide``."""
    slides = adata.obs["slide"].astype(str).to_numpy()
    coords = np.asarray(adata.obsm["spatial"], dtype=float)
    fold = next(f for f in leave_one_slide_out(slides) if slides[f.test][0] == slide)
    train = fold.train
    genes = select_genes(adata, 250, slides=sorted(set(slides[train])), inplace=False)
    expression = log_expression(adata, genes)
    targets = Standardizer(floor_ratio=0.01, clip=None).fit(expression[train]).transform(expression)
    fit, validation, _ = inner_validation_split(slides[train], seed=seed)

    def spots(rows: np.ndarray) -> SpotSet:
        return SpotSet(coords=coords[rows], groups=slides[rows], features=tokens[rows], targets=targets[rows])

    test = SpotSet(coords=coords[fold.test], groups=slides[fold.test], features=tokens[fold.test])
    scores = EpochScores(spots(train[fit]), spots(train[validation]), test, targets[fold.test])
    make_trainer = training.make_trainer

    def with_scores(config, *, validation, callbacks):
        return make_trainer(config, validation=validation, callbacks=[*callbacks, scores])

    training.make_trainer = with_scores
    try:
        method = get_method("cmrcnet")(average_epochs=average)
        method.fit(
            scores.fit,
            scores.validation,
            TrainConfig(progress=False, seed=seed, epochs=epochs, patience=epochs),
        )
    finally:
        training.make_trainer = make_trainer
    return pd.DataFrame(scores.rows).set_index("epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", default="B4,C4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adata = cohort()
    tokens = build(SETTING, adata.obsm["spatial"], adata.obs["slide"].astype(str).to_numpy())[1]
    tables, summary = {}, []
    for slide in args.slides.split(","):
        for name, average in VARIANTS.items():
            table = trace(adata, tokens, slide, args.seed, args.epochs, average)
            tables[(slide, name)] = table
            steps = table["held out"].diff().abs()
            summary.append(
                {
                    "held-out slide": slide,
                    "weights": name,
                    "mean abs change per epoch": steps.mean(),
                    "largest abs change": steps.max(),
                    "sd over epochs 10+": table["held out"].iloc[10:].std(),
                    "epoch of the best validation PCC": int(table["validation"].idxmax()),
                }
            )
            print(slide, name, summary[-1], flush=True)
    wide = pd.concat({f"{slide}, {name}": t["held out"] for (slide, name), t in tables.items()}, axis=1)
    lines = [
        "# CMRCNet on her2st, epoch by epoch: held-out PCC(ACG) with and without weight averaging",
        "",
        f"Command: `OMP_NUM_THREADS={args.threads} python benchmarks/her2st_cmrcnet_epochs.py --slides {args.slides} "
        f"--seed {args.seed} --epochs {args.epochs} --threads {args.threads}`",
        "",
        f"Machine: {platform.machine()}, 2 cores shared with other jobs, no GPU, torch {torch.__version__} with "
        f"{args.threads} thread(s). Features `{SETTING}` (3 x 3 tokens, see her2st_features.py); CMRCNet's defaults "
        f"but `average_epochs`; fit_histo2expr's training defaults with {args.epochs} epochs and no early stopping. "
        "A diagnostic: the held-out slide chooses nothing.",
        "",
        "## How much the held-out PCC(ACG) moves between epochs",
        "",
        pd.DataFrame(summary).round(4).to_markdown(index=False),
        "",
        "## Held-out PCC(ACG) after every epoch",
        "",
        wide.round(4).to_markdown(),
        "",
    ]
    save_results("her2st_cmrcnet_epochs", lines)


if __name__ == "__main__":
    main()
