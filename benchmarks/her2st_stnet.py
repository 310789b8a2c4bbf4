"""Why the frozen ST-Net head lost to ridge on the same features, and the fix (her2st, leave-one-slide-out).

The frozen ST-Net head is a linear least-squares model on the standardised features, like ridge.
Rows, on identical folds and genes (single-view frozen EfficientNet-Lite0 features):

- ``AdamW, random start`` — the head as it was: random initialisation, AdamW, early stopping on the
  inner validation slide (validation MSE);
- ``AdamW, zero start`` — ``stnet(closed_form=False)``: the same from a zero last layer;
- ``AdamW, zero start, L2 grid`` — plus an L2 penalty on the weights (ridge's relative scale, 5
  values), each trained for all epochs; the penalty with the best validation MSE is refitted on the
  training and validation slides;
- ``closed form, penalty by validation MSE`` — the exact penalised solution, its penalty (ridge's
  grid) chosen by the MSE on the validation slide, refitted on training and validation slides;
- ``closed form (penalty 10) + AdamW fine-tuning`` — the exact solution on the training spots
  (penalty 10, ridge's choice in every fold) as the start of AdamW with early stopping; the
  fine-tuned weights are kept only if they lower the validation MSE;
- ``stnet`` — the default now: the same, its penalty chosen by the mean gene-wise PCC on the
  validation slide;
- ``ridge`` — its penalty chosen by leave-one-slide-out over all training slides.

Run on demand (needs her2st):

    python benchmarks/her2st_stnet.py [--genes 250] [--seed 0] [--threads 1]
    python benchmarks/her2st_stnet.py --genes 20 --epochs 2 --out her2st_stnet_quick   # a quick check

Writes benchmarks/results/her2st_stnet.md (``--out NAME``: NAME.md).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from _her2st import ablation_parser, embedded_her2st, parse_ablation_args, run_rows, write_report
from torch import nn

from histo2expr.models import register_method
from histo2expr.models.base import concat_spots
from histo2expr.models.ridge import ridge_predictions
from histo2expr.models.stnet import STNetMethod, _STNetNetwork
from histo2expr.models.training import LossOutput

PENALTIES = (0.1, 1.0, 10.0, 100.0, 1000.0)
#: Without validation spots the closed form takes the middle penalty: ridge's usual choice on her2st.
PENALTIES_FROM_SOLVE = (10.0,)


@register_method
class RandomStartSTNet(STNetMethod):
    """The head as it was before: random start, AdamW, early stopping."""

    name = "stnet_random_start"

    def fit(self, train, validation, config):
        network = self.start_fit(train, validation, config)  # the head as built: a random start
        self.report = self.fit_network(network, train, validation, config)
        return self.report


class _PenalisedNetwork(_STNetNetwork):
    """ST-Net's network whose training loss adds ``penalty / n_genes * |W|^2`` of the last layer."""

    penalty = 0.0

    def loss(self, batch):
        mse = nn.functional.mse_loss(self(batch).float(), batch["targets"])
        if not self.training:
            return LossOutput(mse)
        last = self.head.layers[-1]
        return LossOutput(mse + self.penalty / last.weight.shape[0] * last.weight.pow(2).sum())


@register_method
class PenalisedSTNet(STNetMethod):
    """Zero start, an L2 penalty per candidate trained for all epochs; the best on validation MSE refitted."""

    name = "stnet_l2_grid"

    def build(self, image_input, n_genes):
        base = super().build(image_input, n_genes)
        return _PenalisedNetwork(base.image_input, base.head)

    def _train(self, spots, penalty, config):
        network = self.start_fit(spots, None, config)
        network.penalty = penalty
        last = network.head.layers[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.report = self.fit_network(network, spots, None, config)  # no validation: all epochs

    def fit(self, train, validation, config):
        errors = []
        for penalty in PENALTIES:
            self._train(train, penalty, config)
            errors.append(float(np.mean((self.predict(validation) - validation.targets) ** 2)))
        best = PENALTIES[int(np.argmin(errors))]
        self._train(concat_spots([train, validation]), best, config)
        self.report.notes = {"penalty": best, "validation_mse": errors}
        return self.report


@register_method
class MSESelectedSTNet(STNetMethod):
    """The closed-form head with its penalty chosen by the validation MSE instead of the validation PCC."""

    name = "stnet_closed_form_mse"

    def fit(self, train, validation, config):
        network = self.start_fit(train, validation, config)
        prepare = network.image_input.prepare
        ready, checked = prepare(train), prepare(validation)
        x, y = ready.features.astype(np.float64), ready.targets.astype(np.float64)
        alphas = np.asarray(self.settings.alphas)
        predicted = ridge_predictions(
            x - x.mean(0), y - y.mean(0), checked.features - x.mean(0), alphas * len(x)
        )
        errors = ((predicted + y.mean(0) - checked.targets) ** 2).mean(axis=(1, 2))
        self.settings = dataclasses.replace(self.settings, alphas=(float(alphas[int(np.argmin(errors))]),))
        # one candidate left: the head is solved on the training and validation spots with it
        self.report = self._solve_head(network.head.layers[-1], ready, checked)
        return self.report


@register_method
class FineTunedSTNet(STNetMethod):
    """The closed-form head solved on the training spots, then AdamW with early stopping, kept if better."""

    name = "stnet_fine_tuned"

    def fit(self, train, validation, config):
        network = self.start_fit(train, validation, config)
        prepare = network.image_input.prepare
        self.settings = dataclasses.replace(self.settings, alphas=PENALTIES_FROM_SOLVE)
        self._solve_head(network.head.layers[-1], prepare(train), None)  # on the training spots only
        start = {key: value.clone() for key, value in network.state_dict().items()}
        start_mse = float(np.mean((self.predict(validation) - validation.targets) ** 2))
        self.report = self.fit_network(network, train, validation, config)
        kept = min(self.report.validation_loss) < start_mse
        if not kept:
            network.load_state_dict(start)
        self.report.notes = {"fine_tuning_kept": kept}
        return self.report


ROWS = {
    "AdamW, random start": {"method": "stnet_random_start"},
    "AdamW, zero start": {"method": "stnet", "closed_form": False},
    "AdamW, zero start, L2 grid": {"method": "stnet_l2_grid"},
    "closed form, penalty by validation MSE": {"method": "stnet_closed_form_mse"},
    "closed form (penalty 10) + AdamW fine-tuning": {"method": "stnet_fine_tuned"},
    "stnet (closed form, penalty by validation PCC)": {"method": "stnet"},
    "ridge": {"method": "ridge"},
}


def main() -> None:
    parser = ablation_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every fit (default: the fit's)")
    parser.add_argument("--out", default="her2st_stnet", help="name of the report in benchmarks/results")
    args = parse_ablation_args(parser)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    adata, embed_s = embedded_her2st()
    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    rows = {name: {**params, **epochs} for name, params in ROWS.items()}
    means, per_slide = run_rows(adata, rows, genes=args.genes, seed=args.seed)
    write_report(
        args.out,
        title="her2st: the frozen ST-Net head against ridge on the same features",
        command=f"python benchmarks/her2st_stnet.py --genes {args.genes} --seed {args.seed} --threads {args.threads}"
        + ("" if args.epochs is None else f" --epochs {args.epochs}")
        + ("" if args.out == "her2st_stnet" else f" --out {args.out}"),
        setting=(
            f"Data: {adata.n_obs} spots, 6 slides; frozen EfficientNet-Lite0 features of the spot's patch "
            f"(one view); {args.genes} highly expressed genes per fold; embedding took {embed_s:.0f} s."
        ),
        means=means,
        per_slide=per_slide,
        start=start,
    )


if __name__ == "__main__":
    main()
