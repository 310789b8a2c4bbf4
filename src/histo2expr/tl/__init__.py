"""Tools: embed patches, fit methods with leak-free cross-validation, predict new slides, run cohorts."""

from ._cohort import SlidesFailedError, embed_cohort, predict_cohort
from ._embed import embed_patches
from ._evaluate import evaluate_expression
from ._fit import _fold_fit_plan as _fold_fit_plan  # for the processes of histo2expr._benchmark
from ._fit import fit_histo2expr
from ._model import Histo2ExprModel
from ._predict import predict_expression

__all__ = [
    "Histo2ExprModel",
    "SlidesFailedError",
    "embed_cohort",
    "embed_patches",
    "evaluate_expression",
    "fit_histo2expr",
    "predict_cohort",
    "predict_expression",
]
