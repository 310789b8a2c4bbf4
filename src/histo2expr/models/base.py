"""The contract every histo2expr method follows, its typed settings, and the registry of methods by name.

A method sees arrays and tensors only (never AnnData). It is fitted on the training spots of
one fold (with an inner validation set of training slides for early stopping), predicts the
standardised expression of any spots, embeds them, and round-trips through a plain state dict.
The ``tl`` layer turns AnnData into :class:`SpotSet` objects and back. Methods register by
name with :func:`register_method`; methods of other packages register through the entry point
group ``histo2expr.methods`` and are found without an import (see the docs page "Adding a
method").
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .._validation import non_negative_number, positive_int, seed_value

if TYPE_CHECKING:
    import torch

    from ..patches import PatchSource
    from .adapted import ActivationCache

#: The training regimes (docs/methods/index.md): cached frozen features, the backbone trained too, or
#: its top blocks trained on cached activations of its lower blocks.
REGIMES = ("frozen", "end2end", "adapted")


@dataclass
class SpotSet:
    """The spots a method is fitted on or predicts, in one of the three regimes.

    Attributes
    ----------
    coords
        ``(n, 2)`` spot centres (x, y) in full-resolution pixels of their slide.
    groups
        ``(n,)`` slide label of every spot.
    features
        ``(n, d)`` frozen image features (frozen regime), else None; ``(n, t, d)`` for methods
        that take image tokens (``Method.token_input``): ``t`` tokens of ``d`` features per spot.
        Adapted regime: optional ``(n, d)`` frozen features appended to the adapted ones (e.g. the
        context and neighbour blocks of :func:`~histo2expr.tl.embed_patches`).
    patches
        Where image patches are cut (end-to-end regime), else None.
    activations
        The cached lower-block activations of the encoder (adapted regime,
        :class:`~histo2expr.models.ActivationCache`), else None.
    indices
        ``(n,)`` positions of these spots in ``patches`` or ``activations``.
    targets
        ``(n, g)`` standardised expression (training and validation), else None.
    """

    coords: np.ndarray
    groups: np.ndarray
    features: np.ndarray | None = None
    patches: PatchSource | None = None
    indices: np.ndarray | None = None
    targets: np.ndarray | None = None
    activations: ActivationCache | None = None

    def __post_init__(self) -> None:
        n = len(self.coords)
        if self.activations is not None:
            if self.patches is not None or (self.features is not None and np.ndim(self.features) != 2):
                msg = "An adapted SpotSet has `activations` and optional 2-D `features`, not `patches`."
                raise ValueError(msg)
        elif (self.features is None) == (self.patches is None):
            msg = "A SpotSet needs either frozen `features` or a `patches` source (end-to-end), not both or neither."
            raise ValueError(msg)
        if (self.patches is not None or self.activations is not None) and (
            self.indices is None or len(self.indices) != n
        ):
            msg = "An end-to-end or adapted SpotSet needs `indices` into its patch source or activations, one per spot."
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
        """``"frozen"``, ``"end2end"`` or ``"adapted"``."""
        if self.activations is not None:
            return "adapted"
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
            activations=self.activations,
        )


def concat_spots(parts: list[SpotSet]) -> SpotSet:
    """One SpotSet of several of the same regime (and the same patch source or activations)."""
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
        activations=first.activations,
    )


def check_training_spots(train: SpotSet, validation: SpotSet | None) -> int:
    """Check that training (and validation) spots carry finite targets of one width; return the width.

    Raises a clear error when ``train`` is empty or has no ``targets``, when targets are
    not finite, or when the validation spots differ from the training spots in regime
    or number of genes.
    """
    if len(train) == 0 or train.targets is None:
        msg = "Fitting needs training spots with `targets` (standardised expression); got none."
        raise ValueError(msg)
    targets = np.asarray(train.targets)
    if targets.ndim != 2 or targets.shape[1] == 0:
        msg = (
            f"`targets` must be a 2-D (spots, genes) array with at least one gene, got shape {targets.shape}."
        )
        raise ValueError(msg)
    for name, spots in (("training", train), ("validation", validation)):
        if spots is None or len(spots) == 0:
            continue
        if spots.targets is None or np.shape(spots.targets)[1:] != targets.shape[1:]:
            got = None if spots.targets is None else np.shape(spots.targets)
            msg = f"The {name} spots need `targets` with {targets.shape[1]} genes, like the training spots; got {got}."
            raise ValueError(msg)
        if spots.regime != train.regime:
            msg = f"The validation spots are {spots.regime!r} but the training spots are {train.regime!r}; use one regime."
            raise ValueError(msg)
        if not np.isfinite(spots.targets).all():
            msg = f"The {name} `targets` contain NaN or infinite values; impute or drop those spots first."
            raise ValueError(msg)
    return int(targets.shape[1])


#: Devices the engine accepts: Lightning's ``devices`` (a number, a list of indices, ``"auto"``, ``-1``).
_DEVICES_HELP = "a number of devices, a list of device indices, 'auto' or -1 (all)"


@dataclass(frozen=True)
class TrainConfig:
    """How a method is trained; shared by every method, handed to the Lightning engine.

    Attributes
    ----------
    epochs
        Maximum number of passes over the training spots.
    batch_size
        Spots per mini-batch, per process (with ``devices=2`` a step sees twice as many spots).
    lr
        Learning rate of AdamW.
    weight_decay
        AdamW weight decay.
    patience
        Epochs without improvement of the validation metric before stopping early; `None` (default):
        the method's own, its :attr:`Method.default_patience` (see :meth:`for_method`).
    seed
        Seed of initialisation, batch order and augmentation; the same seed gives
        bit-identical results on the CPU.
    num_workers
        DataLoader workers reading patches (end-to-end regime).
    progress
        Show one progress bar over the epochs of a fit.
    accelerator, devices, strategy, num_nodes, precision
        Handed to ``lightning.pytorch.Trainer``: ``accelerator="auto"`` (a GPU when there is
        one, else the CPU), ``"cpu"``, ``"gpu"``, ``"cuda"``, ``"mps"``; ``devices=1`` (one device;
        ``2`` or ``[0, 1]`` for data-parallel training on two); ``strategy="auto"`` (``"ddp"`` for
        several devices or nodes); ``num_nodes`` machines; ``precision=None`` is ``"bf16-mixed"``
        on CUDA and ``"32-true"`` elsewhere (any Lightning precision, e.g. ``"16-mixed"``).
    """

    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int | None = None
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str | int | None = None

    def __post_init__(self) -> None:
        checks = {
            "epochs": (self.epochs, 1, 100_000),
            "batch_size": (self.batch_size, 2, 1_000_000),
            "num_workers": (self.num_workers, 0, 1024),
        }
        if self.patience is not None:  # None: the method's own (for_method)
            checks["patience"] = (self.patience, 1, 100_000)
        for name, (value, low, high) in checks.items():
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
                own = " (or None: the method's own)" if name == "patience" else ""
                msg = f"`{name}` must be an integer between {low} and {high}{own}, got {value!r}."
                raise ValueError(msg)
        if non_negative_number(self.lr, "lr", positive=True) > 1:
            msg = f"`lr` must be in (0, 1], got {self.lr!r}."
            raise ValueError(msg)
        non_negative_number(self.weight_decay, "weight_decay")
        seed_value(self.seed)
        for name in ("accelerator", "strategy"):
            if not isinstance(getattr(self, name), str):
                msg = f"`{name}` must be a string (e.g. 'auto'), got {getattr(self, name)!r}."
                raise TypeError(msg)
        devices = self.devices
        listed = isinstance(devices, list | tuple) and all(
            isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= 0 for d in devices
        )
        if not (
            listed or isinstance(devices, str) or (isinstance(devices, int) and not isinstance(devices, bool))
        ):
            msg = f"`devices` must be {_DEVICES_HELP}, got {devices!r}."
            raise TypeError(msg)
        positive_int(self.num_nodes, "num_nodes")
        if self.precision is not None and not isinstance(self.precision, str | int):
            msg = f"`precision` must be None or a Lightning precision such as '32-true' or 'bf16-mixed', got {self.precision!r}."
            raise TypeError(msg)

    @property
    def resolved_precision(self) -> str | int:
        """The Lightning precision a fit runs at, ``precision`` or else the device's default.

        The default is ``"bf16-mixed"`` on CUDA and ``"32-true"`` elsewhere
        (``histo2expr.models.inference.default_precision``).
        """
        from .inference import default_precision

        return self.precision if self.precision is not None else default_precision(self.accelerator)

    def for_method(self, method: Method | type[Method]) -> TrainConfig:
        """The config with ``patience=None`` resolved to ``method``'s :attr:`Method.default_patience`.

        An integer ``patience`` is kept, for any method. The ``tl`` layer resolves it before fitting
        (and records the value); the engine refuses a config it was not resolved in.
        """
        if self.patience is not None:
            return self
        return replace(self, patience=method.default_patience)


@dataclass
class FitReport:
    """What happened while fitting: losses per epoch and where early stopping settled.

    Attributes
    ----------
    train_loss
        Mean training loss of every epoch (weighted by batch size, over all processes).
    validation_loss
        The method's validation metric after every epoch (empty without validation spots).
    train_terms
        Mean of every term of the training loss per epoch, by term name (e.g. ``"contrastive"``).
    best_epoch
        The epoch whose weights were kept (the last one without validation spots); `None` when
        a method keeps its untrained weights because no epoch beat them.
    notes
        Method-specific facts (chosen penalties, what was kept, ...).
    """

    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    train_terms: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def plain_value(value: Any) -> Any:
    """``value`` as plain Python values (recursively): dicts with string keys, lists, numbers, strings.

    Tuples and numpy arrays become lists and numpy scalars Python numbers, so the value can be written
    to h5ad ``uns`` and saved in a weights-only torch file, and a record read back from h5ad (where
    lists became numpy arrays) turns plain again.
    """
    if isinstance(value, Mapping):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return plain_value(value.tolist())
    if isinstance(value, list | tuple):
        return [plain_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass(frozen=True)
class MethodSettings:
    """A method's settings: a typed, frozen dataclass checked once, when it is made.

    Each method declares its own subclass (its :attr:`Method.settings_class`) with a field per
    setting, its default and its check in ``__post_init__``, which also brings values to one form
    (e.g. a list to a tuple) with ``object.__setattr__``. Change a setting with
    :func:`dataclasses.replace`, which checks again.
    """

    def plain(self) -> dict[str, Any]:
        """The settings as plain values (str, numbers, bools, lists, None) for a state dict."""
        return {f.name: plain_value(getattr(self, f.name)) for f in fields(self)}


class Method(ABC):
    """The contract of a histo2expr method; every method subclasses it and registers with :func:`register_method`.

    A method is a thin class that declares what it needs and how it fits, predicts, embeds and
    saves itself. The rules every method keeps, checked for every registered method by the
    contract tests (``tests/test_method_contract.py``):

    - **Fitting** (:meth:`fit`) sees only the training spots and an inner validation set of
      training slides, both with standardised ``targets``; the validation spots may only choose
      (early stopping, a penalty, whether a part is kept) and may join a retrieval gallery.
      Nothing else is read: held-out spots never reach a method before it is fitted. The inputs
      are never modified.
    - **Coordinates**: a method reads ``SpotSet.coords`` only when :attr:`uses_coordinates` says
      so (from its settings); the ``tl`` layer then refuses data without spot centres, and a method
      that says False fits and predicts the same when they are unknown (NaN).
    - **Determinism**: everything random is drawn from ``config.seed``; the same seed gives
      bit-identical predictions on the CPU, with any number of threads.
    - **Inference** (:meth:`predict`, :meth:`embed`, :meth:`confidence`) reads the spots' image
      input (features or patches) and coordinates only, never their ``targets``; each spot's result
      depends on that spot alone (not on the other spots passed with it, nor on their number), and
      inference changes nothing of the fitted method.
    - **State** (:meth:`state_dict`) is plain values and tensors, loadable with
      ``torch.load(..., weights_only=True)``; :meth:`from_state_dict` rebuilds a method (on the CPU)
      that predicts bit-identically.

    Parameters
    ----------
    settings
        The method's :attr:`settings_class` instance; or pass the settings as keywords.
    **params
        The settings by name (documented by each method); unknown names are an error.

    Attributes
    ----------
    settings
        The method's settings (frozen; see :class:`MethodSettings`).
    report
        The :class:`FitReport` of the last :meth:`fit` (`None` before).
    device
        The :class:`torch.device` inference runs on (see :meth:`to`).
    """

    #: Registry name, e.g. ``"ridge"``.
    name: ClassVar[str] = ""
    #: The regimes the method supports, of ``"frozen"`` (cached features), ``"end2end"`` (patches) and ``"adapted"``.
    regimes: ClassVar[tuple[str, ...]] = REGIMES
    #: Whether the method takes frozen image *tokens*, ``(n, t, d)`` features (see :class:`SpotSet`).
    token_input: ClassVar[bool] = False
    #: The dataclass of the method's settings.
    settings_class: ClassVar[type[MethodSettings]] = MethodSettings
    #: Early-stopping patience (epochs) of a fit whose ``TrainConfig.patience`` is `None` (the default of
    #: :func:`~histo2expr.tl.fit_histo2expr`): for the built-in methods the smallest of those measured on
    #: her2st that kept the method's accuracy (``benchmarks/results/her2st_patience.md``).
    default_patience: ClassVar[int] = 10

    def __init__(self, settings: MethodSettings | None = None, /, **params: Any) -> None:
        import torch

        if settings is None:
            known = [f.name for f in fields(self.settings_class)]
            unknown = sorted(set(params) - set(known))
            if unknown:
                msg = f"Method {self.name!r} has no setting(s) {unknown}; its settings are {known}."
                raise TypeError(msg)
            settings = self.settings_class(**params)
        elif params or not isinstance(settings, self.settings_class):
            msg = f"Pass either a {self.settings_class.__name__} or the settings as keywords, not {settings!r} and {sorted(params)}."
            raise TypeError(msg)
        self.settings = settings
        self.report: FitReport | None = None
        self.device = torch.device("cpu")

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

    @abstractmethod
    def fit(self, train: SpotSet, validation: SpotSet | None, config: TrainConfig) -> FitReport:
        """Fit on ``train`` (with ``targets``); ``validation`` (training slides, may be empty) may only choose.

        Returns the :class:`FitReport`, also kept as :attr:`report`.
        """

    @abstractmethod
    def predict(self, data: SpotSet) -> np.ndarray:
        """``(n, g)`` float32 predicted standardised expression, each spot from its own image input."""

    @abstractmethod
    def embed(self, data: SpotSet) -> np.ndarray:
        """``(n, d)`` float32: the method's image representation of the spots."""

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

    def to(self, device: str | torch.device) -> Method:
        """Run inference on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"auto"``); returns the method.

        Methods computed in numpy (``ridge``) accept any usable device and stay on the CPU.
        """
        from .inference import resolve_device

        self.device = resolve_device(device)
        return self

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the fitted method (plain values, arrays as tensors)."""

    @classmethod
    @abstractmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Method:
        """Rebuild a fitted method, on the CPU, from :meth:`state_dict`."""


def check_state_format(state: dict[str, Any], name: str) -> None:
    """Raise a clear error for a state saved before methods had typed settings (histo2expr < 0.1)."""
    if "settings" not in state:
        msg = (
            f"This {name!r} state was saved by an earlier development version of histo2expr (method parameters "
            "as `params`, before the Lightning engine); it cannot be loaded. Refit the model and save it again."
        )
        raise ValueError(msg)


#: Entry point group through which other packages register methods.
ENTRY_POINT_GROUP = "histo2expr.methods"

_REGISTRY: dict[str, type[Method]] = {}
#: Entry points already loaded (or failed), by ``(name, value)``.
_SEEN_ENTRY_POINTS: set[tuple[str, str]] = set()
#: Whether this process has read the installed packages' entry points (once: reading them takes time).
_ENTRY_POINTS_READ = False


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``.

    A name already registered for another class is an error (a package cannot replace a
    method of another by accident).
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        msg = f"Only subclasses of histo2expr.models.Method can be registered, got {cls!r}."
        raise TypeError(msg)
    if not cls.name:
        msg = f"{cls.__name__} needs a non-empty `name` to be registered."
        raise ValueError(msg)
    taken = _REGISTRY.get(cls.name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        msg = (
            f"The method name {cls.name!r} is taken by {taken.__module__}.{taken.__qualname__}; "
            f"give {cls.__module__}.{cls.__qualname__} another `name`."
        )
        raise ValueError(msg)
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the registered methods: the built-in ones and those of installed packages."""
    _load_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``, or a clear error listing the names."""
    _load_methods()
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


def _load_methods() -> None:
    """Import the built-in methods and, once per process, load the entry points of group :data:`ENTRY_POINT_GROUP`.

    An entry point names a :class:`Method` subclass (registered here) or a module that
    registers its methods when imported. One that fails to load is skipped with a warning.
    """
    from importlib import import_module
    from importlib.metadata import entry_points

    global _ENTRY_POINTS_READ

    for module in _BUILTIN_METHOD_MODULES:
        import_module(module, __package__)
    if _ENTRY_POINTS_READ:
        return
    _ENTRY_POINTS_READ = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if (entry_point.name, entry_point.value) in _SEEN_ENTRY_POINTS:
            continue
        _SEEN_ENTRY_POINTS.add((entry_point.name, entry_point.value))
        try:
            loaded = entry_point.load()
            if isinstance(loaded, type):
                register_method(loaded)
        except Exception as error:
            msg = (
                f"The histo2expr method plug-in {entry_point.name!r} ({entry_point.value}) could not be "
                f"loaded and is skipped: {error}"
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
