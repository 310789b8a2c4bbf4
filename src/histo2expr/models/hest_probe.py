"""HEST-Benchmark's linear probe: standardise, PCA to 256 components, ridge without intercept at a fixed penalty."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validation import positive_int
from .base import (
    FitReport,
    Method,
    MethodSettings,
    SpotSet,
    TrainConfig,
    check_state_format,
    concat_spots,
    register_method,
)

#: Principal components HEST-Benchmark keeps (its ``latent_dim``).
HEST_COMPONENTS = 256


@dataclass(frozen=True, kw_only=True)
class HESTProbeSettings(MethodSettings):
    """Settings of :class:`HESTProbeMethod` (see its parameters)."""

    n_components: int = HEST_COMPONENTS

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_components", positive_int(self.n_components, "n_components"))


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
    settings_class = HESTProbeSettings
    settings: HESTProbeSettings

    def __init__(self, settings: HESTProbeSettings | None = None, /, **params: Any) -> None:
        super().__init__(settings, **params)
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
        k = min(self.settings.n_components, *features.shape)
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

    def _components(self, data: SpotSet) -> np.ndarray:
        """The principal components of the standardised features (float64), or a clear error before fitting."""
        self.check_regime(data)
        if not self.arrays:
            msg = "This hest_ridge probe is not fitted yet; call fit() first."
            raise RuntimeError(msg)
        a = self.arrays
        standardised = (np.asarray(data.features, dtype=np.float64) - a["mean"]) / a["scale"]
        return (standardised - a["pca_mean"]) @ a["components"].T

    def embed(self, data: SpotSet) -> np.ndarray:
        """The principal components of the standardised features (float32)."""
        return self._components(data).astype(np.float32)

    def predict(self, data: SpotSet) -> np.ndarray:
        """Predicted standardised expression."""
        return (self._components(data) @ self.arrays["coef"].T).astype(np.float32)

    def state_dict(self) -> dict:
        """Settings, the fitted arrays (float64 tensors) and the fit report."""
        import torch

        if not self.arrays:
            msg = "This hest_ridge probe is not fitted yet; there is no state to save. Call fit() first."
            raise RuntimeError(msg)
        return {
            "settings": self.settings.plain(),
            "arrays": {k: torch.as_tensor(v) for k, v in self.arrays.items()},
            "report": None if self.report is None else dataclasses.asdict(self.report),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> HESTProbeMethod:
        """Rebuild from :meth:`state_dict`."""
        check_state_format(state, cls.name)
        method = cls(cls.settings_class(**state["settings"]))
        method.arrays = {k: np.asarray(v) for k, v in state["arrays"].items()}
        method.report = None if state["report"] is None else FitReport(**state["report"])
        return method
