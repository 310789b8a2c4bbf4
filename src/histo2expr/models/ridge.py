"""Ridge regression from image features to expression, its penalty chosen on held-out training slides."""

from __future__ import annotations

import numpy as np

from .base import FitReport, Method, SpotSet, TrainConfig, concat_spots, register_method
from .scaling import Standardizer

#: Default grid of ridge penalties (relative to the number of training spots).
DEFAULT_ALPHAS = tuple(np.logspace(-3, 3, 13))
#: Most inner folds the penalty is chosen on: the cost stays linear in the number of slides.
MAX_INNER_FOLDS = 5


def inner_splits(groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(fit, validation)`` positions of the inner folds that choose the penalty.

    Whole slides (groups) on each side: at most ``MAX_INNER_FOLDS`` folds of slides balanced by
    spot count (scikit-learn's ``GroupKFold``), i.e. leave-one-slide-out with five
    slides or fewer. With a single slide, a seeded 5-fold split of its spots.
    """
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    if n_groups >= 2:
        folds = GroupKFold(n_splits=min(MAX_INNER_FOLDS, n_groups))
        return list(folds.split(np.zeros(len(groups)), groups=groups))
    order = np.random.default_rng(0).permutation(len(groups))
    return [(np.setdiff1d(order, part), part) for part in np.array_split(order, MAX_INNER_FOLDS)]


def _spectrum(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``U, s, V`` of ``features`` (n x d) from the eigendecomposition of the smaller Gram matrix."""
    n, d = features.shape
    gram = features @ features.T if n <= d else features.T @ features
    eigenvalues, vectors = np.linalg.eigh(gram)
    keep = eigenvalues > eigenvalues.max(initial=0.0) * 1e-10
    s = np.sqrt(eigenvalues[keep])
    if n <= d:
        u = vectors[:, keep]
        return u, s, features.T @ u / s
    v = vectors[:, keep]
    return features @ v / s, s, v


def ridge_predictions(
    train: np.ndarray, targets: np.ndarray, query: np.ndarray, alphas: np.ndarray
) -> np.ndarray:
    """Ridge predictions ``(n_alphas, n_query, n_targets)`` for every penalty, from one decomposition."""
    u, s, v = _spectrum(train)
    projected, uty = query @ v, u.T @ targets
    return np.stack([(projected * (s / (s**2 + alpha))) @ uty for alpha in alphas])


def ridge_coefficients(features: np.ndarray, targets: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge coefficients ``(n_features, n_targets)`` for one penalty."""
    u, s, v = _spectrum(features)
    return v @ ((s / (s**2 + alpha))[:, None] * (u.T @ targets))


class RidgeRegressor:
    """Standardise features, optionally reduce them with PCA, and fit a ridge regression.

    The penalty is chosen by grouped cross-validation over the *training* slides
    (``inner_splits``: at most five folds of whole slides, or a 5-fold split of spots
    when there is only one), scoring the mean squared error of the standardised targets —
    the held-out slide of the outer fold plays no part.

    Parameters
    ----------
    alphas
        Candidate penalties, multiplied by the number of fitting spots (so one grid
        suits any cohort size).
    n_components
        Keep this many principal components of the standardised features; None keeps all.
    """

    def __init__(
        self, *, alphas: tuple[float, ...] = DEFAULT_ALPHAS, n_components: int | None = None
    ) -> None:
        if len(alphas) == 0 or min(alphas) <= 0:
            msg = "`alphas` must be a non-empty sequence of positive penalties."
            raise ValueError(msg)
        self.alphas = np.asarray(alphas, dtype=np.float64)
        self.n_components = n_components
        self.alpha_: float | None = None
        self.validation_mse_: np.ndarray | None = None

    def _project(self, z: np.ndarray) -> np.ndarray:
        """Apply the PCA projection, when there is one."""
        if self.components_ is None:
            return z
        return z @ self.components_.T

    def fit(self, features: np.ndarray, targets: np.ndarray, groups: np.ndarray) -> RidgeRegressor:
        """Fit on training spots.

        Parameters
        ----------
        features
            ``(n_spots, n_features)`` image features.
        targets
            ``(n_spots, n_genes)`` standardised expression.
        groups
            Slide of every training spot, for choosing the penalty.
        """
        features = np.asarray(features, dtype=np.float64)
        targets = np.asarray(targets, dtype=np.float64)
        self.scaler_ = Standardizer().fit(features)
        z = self.scaler_.transform(features).astype(np.float64)
        self.components_ = None
        if self.n_components is not None:
            if not 1 <= self.n_components <= min(z.shape):
                msg = f"`n_components={self.n_components}` must be between 1 and {min(z.shape)}."
                raise ValueError(msg)
            self.components_ = np.linalg.svd(z - z.mean(0), full_matrices=False)[2][: self.n_components]
        z = self._project(z)
        splits = inner_splits(np.asarray(groups).astype(str))
        errors = np.zeros(len(self.alphas))
        for train, valid in splits:
            offset, target_offset = z[train].mean(0), targets[train].mean(0)
            predictions = ridge_predictions(
                z[train] - offset, targets[train] - target_offset, z[valid] - offset, self.alphas * len(train)
            )
            errors += ((predictions + target_offset - targets[valid]) ** 2).mean(axis=(1, 2)) * len(valid)
        self.validation_mse_ = errors / sum(len(v) for _, v in splits)
        self.alpha_ = float(self.alphas[int(np.argmin(self.validation_mse_))])
        self.offset_, self.target_offset_ = z.mean(0), targets.mean(0)
        self.coef_ = ridge_coefficients(z - self.offset_, targets - self.target_offset_, self.alpha_ * len(z))
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted standardised expression ``(n_spots, n_genes)``."""
        if self.alpha_ is None:
            msg = "This RidgeRegressor is not fitted yet; call fit() first."
            raise RuntimeError(msg)
        z = self._project(self.scaler_.transform(features).astype(np.float64))
        return ((z - self.offset_) @ self.coef_ + self.target_offset_).astype(np.float32)

    def state_dict(self) -> dict:
        """The fitted regression as plain values and float64 tensors."""
        import torch

        if self.alpha_ is None:
            msg = "This RidgeRegressor is not fitted yet; call fit() first."
            raise RuntimeError(msg)
        tensors = {
            name: torch.as_tensor(getattr(self, name))
            for name in ("offset_", "target_offset_", "coef_", "validation_mse_")
        }
        return {
            "alphas": self.alphas.tolist(),
            "n_components": self.n_components,
            "alpha": self.alpha_,
            "scaler": self.scaler_.state_dict(),
            "components": None if self.components_ is None else torch.as_tensor(self.components_),
            **tensors,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> RidgeRegressor:
        """Rebuild a fitted regression from :meth:`state_dict`."""
        model = cls(alphas=tuple(state["alphas"]), n_components=state["n_components"])
        model.alpha_ = float(state["alpha"])
        model.scaler_ = Standardizer.from_state_dict(state["scaler"])
        components = state["components"]
        model.components_ = None if components is None else np.asarray(components)
        for name in ("offset_", "target_offset_", "coef_", "validation_mse_"):
            setattr(model, name, np.asarray(state[name]))
        return model


@register_method
class RidgeMethod(Method):
    """``method="ridge"``: ridge regression on frozen embeddings (the HEST-benchmark recipe).

    Features are standardised with statistics of the spots fitted on (scale floored at a tenth of
    the median feature scale, values clipped to ±10), optionally reduced with PCA, and regressed
    on the standardised expression; the penalty is chosen by grouped cross-validation over the
    training slides (at most five folds of whole slides: leave-one-slide-out with five or fewer).
    Frozen regime only: with an encoder trained end to end it would be ST-Net
    (``method="stnet"``).

    Parameters
    ----------
    alphas
        Candidate penalties (relative to the number of spots).
    n_components
        Principal components kept; None keeps all features.
    """

    name = "ridge"
    regimes = ("frozen",)

    def __init__(
        self, *, alphas: tuple[float, ...] = DEFAULT_ALPHAS, n_components: int | None = None
    ) -> None:
        super().__init__(alphas=tuple(float(a) for a in alphas), n_components=n_components)
        self.regressor = RidgeRegressor(alphas=alphas, n_components=n_components)

    def fit(self, train: SpotSet, validation: SpotSet | None, config: TrainConfig) -> FitReport:
        """Fit on the training and inner validation spots together (the penalty has its own inner CV)."""
        self.check_regime(train)
        spots = train if validation is None or len(validation) == 0 else concat_spots([train, validation])
        self.regressor.fit(spots.features, spots.targets, spots.groups)
        self.report = FitReport(
            notes={"alpha": self.regressor.alpha_, "validation_mse": self.regressor.validation_mse_.tolist()}
        )
        return self.report

    def predict(self, data: SpotSet) -> np.ndarray:
        """Predicted standardised expression."""
        self.check_regime(data)
        return self.regressor.predict(data.features)

    def embed(self, data: SpotSet) -> np.ndarray:
        """The standardised (and PCA-projected) features the regression sees."""
        self.check_regime(data)
        return self.regressor._project(self.regressor.scaler_.transform(data.features)).astype(np.float32)

    def state_dict(self) -> dict:
        """Parameters and the fitted regression."""
        return {"params": dict(self.params), "regressor": self.regressor.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict) -> RidgeMethod:
        """Rebuild from :meth:`state_dict`."""
        method = cls(**state["params"])
        method.regressor = RidgeRegressor.from_state_dict(state["regressor"])
        return method
