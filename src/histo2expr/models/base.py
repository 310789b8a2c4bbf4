"""The method protocol every histo2expr method implements, and the registry of methods by name.

A method sees arrays and tensors only. It is fitted on the training spots of one fold
(with an inner validation set of training slides for early stopping), predicts the
standardised expression of any spots, embeds them, and round-trips through a plain
state dict. The ``tl`` layer turns AnnData into :class:`SpotSet` objects and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .._validation import non_negative_number, seed_value

if TYPE_CHECKING:
    from ..patches import PatchSource

#: The two training regimes (docs/methods/index.md): cached frozen features, or the backbone trained too.
REGIMES = ("frozen", "end2end")


@dataclass
class SpotSet:
    """The spots a method is fitted on or predicts, in one of the two regimes.

    Attributes
    ----------
    coords
        ``(n, 2)`` spot centres (x, y) in full-resolution pixels of their slide.
    groups
        ``(n,)`` slide label of every spot.
    features
        ``(n, d)`` frozen image features (frozen regime), else None; ``(n, t, d)`` for methods
        that take image tokens (``Method.token_input``): ``t`` tokens of ``d`` features per spot.
    patches
        Where image patches are cut (end-to-end regime), else None.
    indices
        ``(n,)`` positions of these spots in ``patches`` (end-to-end regime).
    targets
        ``(n, g)`` standardised expression (training and validation), else None.
    """

    coords: np.ndarray
    groups: np.ndarray
    features: np.ndarray | None = None
    patches: PatchSource | None = None
    indices: np.ndarray | None = None
    targets: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.coords)
        if (self.features is None) == (self.patches is None):
            msg = "A SpotSet needs either frozen `features` or a `patches` source (end-to-end), not both or neither."
            raise ValueError(msg)
        if self.patches is not None and (self.indices is None or len(self.indices) != n):
            msg = "An end-to-end SpotSet needs `indices` into its patch source, one per spot."
            raise ValueError(msg)
        if self.features is not None and np.ndim(self.features) not in (2, 3):
            msg = (
                f"`features` must be (spots, features) or (spots, tokens, features), got shape "
                f"{np.shape(self.features)}."
            )
            raise ValueError(msg)
        for name in ("groups", "features", "targets"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                msg = f"`{name}` has {len(value)} rows but there are {n} spots."
                raise ValueError(msg)

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def regime(self) -> str:
        """``"frozen"`` or ``"end2end"``."""
        return "frozen" if self.features is not None else "end2end"

    def subset(self, positions: np.ndarray) -> SpotSet:
        """The spots at ``positions``."""
        take = None if self.features is None else self.features[positions]
        return SpotSet(
            coords=self.coords[positions],
            groups=self.groups[positions],
            features=take,
            patches=self.patches,
            indices=None if self.indices is None else self.indices[positions],
            targets=None if self.targets is None else self.targets[positions],
        )


def concat_spots(parts: list[SpotSet]) -> SpotSet:
    """One SpotSet of several of the same regime (and the same patch source)."""
    first = parts[0]

    def stack(name: str) -> np.ndarray | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else np.concatenate(values, axis=0)

    return SpotSet(
        coords=stack("coords"),
        groups=stack("groups"),
        features=stack("features"),
        patches=first.patches,
        indices=stack("indices"),
        targets=stack("targets"),
    )


@dataclass
class TrainConfig:
    """How a method is trained; shared by every method.

    Attributes
    ----------
    epochs
        Maximum number of passes over the training spots.
    batch_size
        Spots per mini-batch.
    lr
        Learning rate of AdamW.
    weight_decay
        AdamW weight decay.
    patience
        Epochs without improvement of the validation loss before stopping early.
    seed
        Seed of initialisation, batch order and augmentation; the same seed gives
        bit-identical results on the CPU.
    device
        ``"auto"`` (cuda > mps > cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    num_workers
        DataLoader workers reading patches (end-to-end regime).
    progress
        Show a progress bar over epochs.
    """

    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        checks = {
            "epochs": (self.epochs, 1, 100_000),
            "batch_size": (self.batch_size, 2, 1_000_000),
            "patience": (self.patience, 1, 100_000),
            "num_workers": (self.num_workers, 0, 1024),
        }
        for name, (value, low, high) in checks.items():
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
                msg = f"`{name}` must be an integer between {low} and {high}, got {value!r}."
                raise ValueError(msg)
        if non_negative_number(self.lr, "lr", positive=True) > 1:
            msg = f"`lr` must be in (0, 1], got {self.lr!r}."
            raise ValueError(msg)
        non_negative_number(self.weight_decay, "weight_decay")
        seed_value(self.seed)


@dataclass
class FitReport:
    """What happened while fitting: losses per epoch and where early stopping settled."""

    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class of every method; subclasses register themselves with :func:`register_method`.

    Parameters
    ----------
    **params
        The method's own parameters (documented by each method).
    """

    #: Registry name, e.g. ``"ridge"``.
    name: ClassVar[str] = ""
    #: Regimes the method supports.
    regimes: ClassVar[tuple[str, ...]] = REGIMES
    #: Whether the method takes frozen image *tokens*, ``(n, t, d)`` features (see :class:`SpotSet`).
    token_input: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.report: FitReport | None = None

    @property
    def uses_coordinates(self) -> bool:
        """Whether fitting, as configured, learns from the spot centres (``SpotSet.coords``).

        False by default; the ``tl`` layer refuses data without spot centres for a method that says True.
        """
        return False

    def check_regime(self, data: SpotSet) -> None:
        """Raise when the method does not support ``data``'s regime, or its token features."""
        if data.regime not in self.regimes:
            msg = f"Method {self.name!r} supports the {self.regimes} regime(s), not {data.regime!r}."
            raise ValueError(msg)
        if data.features is not None and data.features.ndim == 3 and not self.token_input:
            msg = (
                f"Method {self.name!r} takes one feature vector per spot, got image tokens of shape "
                f"{data.features.shape}; pass the pooled features (obsm[use_rep], not obsm[f'{{use_rep}}_tokens']) "
                "or average the tokens (`features.mean(axis=1)`)."
            )
            raise ValueError(msg)

    def fit(self, train: SpotSet, validation: SpotSet | None, config: TrainConfig) -> FitReport:
        """Fit on ``train`` (with ``targets``); ``validation`` drives early stopping."""
        raise NotImplementedError

    def predict(self, data: SpotSet) -> np.ndarray:
        """``(n, g)`` predicted standardised expression."""
        raise NotImplementedError

    def embed(self, data: SpotSet) -> np.ndarray:
        """``(n, d)`` the method's image representation of the spots."""
        raise NotImplementedError

    def confidence(self, data: SpotSet, *, embedding: np.ndarray | None = None) -> np.ndarray | None:
        """``(n,)`` per-spot confidence of the predictions, or None when the method has none (the default).

        Retrieval methods return the mean cosine similarity of each spot to the gallery spots it
        retrieves: low values flag spots unlike anything seen in training.

        Parameters
        ----------
        data
            The spots.
        embedding
            ``embed(data)`` when the caller already has it (saves a second pass over the images).
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the fitted method (arrays, tensors and plain values)."""
        raise NotImplementedError

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Method:
        """Rebuild a fitted method from :meth:`state_dict`."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        msg = f"{cls.__name__} needs a non-empty `name` to be registered."
        raise ValueError(msg)
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the registered methods."""
    _load_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``, or a clear error listing the names."""
    _load_builtin_methods()
    if name not in _REGISTRY:
        msg = f"Unknown method {name!r}; available methods are {sorted(_REGISTRY)}."
        raise ValueError(msg)
    return _REGISTRY[name]


#: Modules holding the built-in methods, imported on first use (they import torch).
_BUILTIN_METHOD_MODULES: tuple[str, ...] = (
    ".ridge",
    ".hest_probe",
    ".stnet",
    ".bleep",
    ".chrep",
    ".nh2st",
    ".cmrcnet",
)


def _load_builtin_methods() -> None:
    from importlib import import_module

    for module in _BUILTIN_METHOD_MODULES:
        import_module(module, __package__)
