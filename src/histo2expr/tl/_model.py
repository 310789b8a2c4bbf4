"""The fitted model users keep: method, genes, standardisation, encoder and patch records, save / load."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..models.base import Method, SpotSet, plain_value
from ..models.ensemble import method_from_state
from ..models.scaling import Standardizer

if TYPE_CHECKING:
    import torch

_FORMAT = "histo2expr.Histo2ExprModel"
_VERSION = 1


class Histo2ExprModel:
    """A method fitted on all training slides, ready to predict expression on new slides.

    Made by :func:`histo2expr.tl.fit_histo2expr`; use it with
    :func:`histo2expr.tl.predict_expression`, :meth:`save` and :meth:`load`.

    Attributes
    ----------
    method
        The fitted method (see :mod:`histo2expr.models`).
    genes
        The genes it predicts, in order.
    scaler
        Per-gene mean and scale of the training slides' log-normalised expression.
    use_rep
        Key of ``obsm`` with the frozen features it was trained on (frozen regime; adapted regime: their
        context and neighbour blocks), or None (end-to-end regime: it reads patches itself).
    encoder
        Description of the frozen encoder (from ``uns[use_rep]``; adapted regime: of the encoder whose
        lower blocks it reads), incl. its weights hash.
    patches
        Patch geometry: ``patch_size`` and ``mpp`` (micrometres per pixel), and the training
        spots' median ``spot_diameter_um`` and ``spot_spacing_um`` when the slides record them
        (:func:`histo2expr.pp.tile_slide` lays pseudo-spots out with them).
    params
        The training parameters.
    cv_gene_pcc
        Mean cross-validated PCC of each gene over held-out slides (None without CV).
    trust
        What the model knows of its own reliability (see ``docs/trust.md``), plain values and arrays:
        ``"reference"``, its training spots in its embedding with their leave-slide-out neighbour
        distances (out-of-distribution scores of new spots); ``"calibration"``, the per-gene conformal
        half-widths of its intervals (None when fitted without ``intervals``); ``"predictability"``, the
        bounds ``cv_pcc_low`` / ``cv_pcc_high`` of each gene's held-out PCC (None without CV). None for
        a model saved before these existed.
    """

    def __init__(
        self,
        *,
        method: Method,
        genes: list[str],
        scaler: Standardizer,
        use_rep: str | None,
        encoder: dict | None,
        patches: dict | None,
        params: dict,
        cv_gene_pcc: dict[str, float] | None = None,
        trust: dict[str, Any] | None = None,
    ) -> None:
        self.method = method
        self.genes = list(genes)
        self.scaler = scaler
        self.use_rep = use_rep
        self.encoder = encoder
        self.patches = patches
        self.params = params
        self.cv_gene_pcc = cv_gene_pcc
        self.trust = trust

    @property
    def token_rep(self) -> str | None:
        """Key of ``obsm`` with the frozen image tokens the method was trained on, or None (pooled features)."""
        return self.params.get("token_rep") or None

    @property
    def regime(self) -> str:
        """``"frozen"``, ``"end2end"`` or ``"adapted"`` (models saved before the adapted regime: by ``use_rep``)."""
        return self.params.get("regime") or ("frozen" if self.use_rep is not None else "end2end")

    def __repr__(self) -> str:
        return (
            f"Histo2ExprModel(method={self.method.name!r}, regime={self.regime!r}, "
            f"n_genes={len(self.genes)}, use_rep={self.use_rep!r})"
        )

    @property
    def device(self) -> torch.device:
        """The device the model predicts on (the CPU after :meth:`load`)."""
        return self.method.device

    def to(self, device: str | torch.device) -> Histo2ExprModel:
        """Predict on ``device`` from now on: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"auto"``.

        The method's network (and encoder, end to end) moves there; a device this machine does
        not have is an error. Returns the model, as :meth:`torch.nn.Module.to` does.
        """
        self.method.to(device)
        return self

    def predict_log(self, data: SpotSet) -> np.ndarray:
        """``(n, n_genes)`` predicted log-normalised expression of the spots in ``data``."""
        return self.scaler.inverse_transform(self.method.predict(data))

    def describe(self) -> dict[str, Any]:
        """An h5ad-serialisable summary: method, regime, genes, encoder, patches, parameters."""
        return plain_value(
            {
                "method": self.method.name,
                "regime": self.regime,
                "genes": self.genes,
                "use_rep": self.use_rep or "",
                "encoder": self.encoder or {},
                "patches": self.patches or {},
                "params": self.params,
            }
        )

    def save(self, path: str | Path) -> None:
        """Write the model to ``path`` (a torch file; plain values and tensors only).

        It records the method and its weights, the genes, the standardisation statistics,
        the encoder description (with a hash of its weights), the patch geometry and the
        training parameters.
        """
        import torch

        records = {"encoder": self.encoder, "patches": self.patches, "params": self.params}
        state = {
            "format": _FORMAT,
            "version": _VERSION,
            "method": self.method.name,
            "method_state": _weights_only(self.method.state_dict(), "method_state"),
            "genes": [str(g) for g in self.genes],
            "scaler": _weights_only(self.scaler.state_dict(), "scaler"),
            "use_rep": self.use_rep,
            **{name: plain_value(value) for name, value in records.items()},
            "cv_gene_pcc": plain_value(self.cv_gene_pcc),
            "trust": _weights_only(self.trust, "trust"),
        }
        torch.save(state, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> Histo2ExprModel:
        """Read a model written by :meth:`save` (safely: no code is unpickled)."""
        import torch

        path = Path(path)
        if not path.is_file():
            msg = f"No model file at {path}."
            raise FileNotFoundError(msg)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            msg = (
                f"{path} is not a histo2expr model file: it cannot be read as one ({reason}); the file may be "
                "truncated or not written by `Histo2ExprModel.save`. Save the model again."
            )
            raise ValueError(msg) from error
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            msg = f"{path} is not a histo2expr model file (saved with `Histo2ExprModel.save`); save the model again."
            raise ValueError(msg)
        if not isinstance(state.get("version"), int) or state["version"] > _VERSION:
            msg = f"{path} was written by a newer histo2expr (format {state.get('version')!r}); upgrade histo2expr."
            raise ValueError(msg)
        try:
            method = method_from_state(state["method"], state["method_state"])
            return cls(
                method=method,
                genes=list(state["genes"]),
                scaler=Standardizer.from_state_dict(state["scaler"]),
                use_rep=state["use_rep"],
                encoder=state["encoder"],
                patches=state["patches"],
                params=dict(state["params"]),
                cv_gene_pcc=state["cv_gene_pcc"],
                trust=state.get("trust"),
            )
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
            msg = (
                f"{path} is a damaged histo2expr model file: rebuilding the model failed "
                f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}). "
                "Save the model again from the fitted model, or fit it again."
            )
            raise ValueError(msg) from error


def _weights_only(value: Any, where: str) -> Any:
    """``value`` with numpy arrays as tensors and numpy scalars as numbers, loadable with ``weights_only``.

    Raises a TypeError naming the entry when something else (an object torch would have to unpickle) is in it.
    """
    import torch

    if isinstance(value, dict):
        return {key: _weights_only(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_weights_only(item, f"{where}[{i}]") for i, item in enumerate(value))
    if isinstance(value, np.ndarray):
        numeric = value.dtype.kind in "biufc"
        return torch.from_numpy(value.copy()) if numeric else _weights_only(value.tolist(), where)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, str | int | float | bool | torch.Tensor | torch.dtype):
        return value
    msg = (
        f"The model cannot be saved: {where} is a {type(value).__name__}, which a weights-only model file cannot "
        "hold (plain values, arrays and tensors only). Give the method plain parameters (e.g. a timm encoder name "
        "instead of an object)."
    )
    raise TypeError(msg)
