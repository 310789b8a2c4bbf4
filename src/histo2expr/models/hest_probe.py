"""HEST-Benchmark's linear probe: standardise, PCA to 256 components, ridge without intercept at a fixed penalty."""

from __future__ import annotations

import numpy as np

from .base import FitReport, Method, SpotSet, TrainConfig, concat_spots, register_method

#: Principal components HEST-Benchmark keeps (its ``latent_dim``).
HEST_COMPONENTS = 256


@register_method
class HESTProbeMethod(Method):
    """``method="hest_ridge"``: the ridge probe of HEST-Benchmark, as its code runs it.

    scikit-learn's ``StandardScaler`` then ``PCA(n_components=256, random_state=seed)`` fitted on
    the training spots, then ``Ridge(solver="lsqr", fit_intercept=False, alpha=100 / (256 * genes),
    max_iter=1000)`` (``hest.bench.trainer.train_test_reg``). The penalty is fixed, not tuned; with
    fewer than 256 spots or features the PCA keeps as many components as it can. Frozen regime only.
    Pearson correlations equal HEST's on the same targets (up to lsqr's stopping tolerance): the
    per-gene standardisation of :func:`~histo2expr.tl.fit_histo2expr` only shifts and scales each
    gene's exact ridge solution, since the principal components are centred on the training spots.

    Parameters
    ----------
    n_components
        Principal components (HEST: 256).
    """

    name = "hest_ridge"
    regimes = ("frozen",)

    def __init__(self, *, n_components: int = HEST_COMPONENTS) -> None:
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            msg = f"`n_components` must be a positive integer, got {n_components!r}."
            raise ValueError(msg)
        super().__init__(n_components=n_components)
        self.arrays: dict[str, np.ndarray] = {}

    def fit(self, train: SpotSet, validation: SpotSet | None, config: TrainConfig) -> FitReport:
        """Fit on the training and inner validation spots together (HEST has no validation split)."""
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.preprocessing import StandardScaler

        self.check_regime(train)
        spots = train if validation is None or len(validation) == 0 else concat_spots([train, validation])
        features = np.asarray(spots.features, dtype=np.float64)
        scaler = StandardScaler().fit(features)
        k = min(self.params["n_components"], *features.shape)
        pca = PCA(n_components=k, random_state=config.seed).fit(scaler.transform(features))
        projected = pca.transform(scaler.transform(features))
        alpha = 100.0 / (projected.shape[1] * spots.targets.shape[1])
        ridge = Ridge(
            solver="lsqr", alpha=alpha, fit_intercept=False, max_iter=1000, random_state=config.seed
        )
        ridge.fit(projected, spots.targets)
        self.arrays = {
            "mean": scaler.mean_,
            "scale": scaler.scale_,
            "pca_mean": pca.mean_,
            "components": pca.components_,
            "coef": np.atleast_2d(ridge.coef_),
        }
        self.report = FitReport(notes={"alpha": alpha, "n_components": k})
        return self.report

    def embed(self, data: SpotSet) -> np.ndarray:
        """The principal components of the standardised features."""
        self.check_regime(data)
        if not self.arrays:
            msg = "This hest_ridge probe is not fitted yet; call fit() first."
            raise RuntimeError(msg)
        a = self.arrays
        return (((np.asarray(data.features, dtype=np.float64) - a["mean"]) / a["scale"]) - a["pca_mean"]) @ a[
            "components"
        ].T

    def predict(self, data: SpotSet) -> np.ndarray:
        """Predicted standardised expression."""
        return (self.embed(data) @ self.arrays["coef"].T).astype(np.float32)

    def state_dict(self) -> dict:
        """Parameters and the fitted arrays (float64 tensors)."""
        import torch

        return {
            "params": dict(self.params),
            "arrays": {k: torch.as_tensor(v) for k, v in self.arrays.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> HESTProbeMethod:
        """Rebuild from :meth:`state_dict`."""
        method = cls(**state["params"])
        method.arrays = {k: np.asarray(v) for k, v in state["arrays"].items()}
        return method
