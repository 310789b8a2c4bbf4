"""An ensemble of one method's members, each fitted with its own seed and inner validation split, averaged.

Training a network on a few slides is noisy: the initialisation, the batches and the slide that
early stopping validates on decide which epoch is kept, and that can move a held-out slide's score
more than the differences between methods. Averaging K independently fitted members (a deep
ensemble, or the bagging of cross-validation's inner folds) reduces that variance. The ``tl``
layer chooses the members' inner validation splits (:func:`histo2expr.splits.inner_validation_splits`,
rotating through the training slides) and fits them with :func:`fit_members`; this module sees
arrays only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import FitReport, Method, MethodSettings, SpotSet, TrainConfig, get_method

if TYPE_CHECKING:
    import torch

    from .training import SpotNetwork


def member_seed(seed: int, member: int) -> int:
    """The seed of ensemble member ``member`` of a fit seeded ``seed``: ``seed`` itself for the first.

    The others are drawn from :class:`numpy.random.SeedSequence` ``([seed, member])``, so that the
    members of fits with neighbouring seeds (0, 1, 2, ...) share no seed.
    """
    if member == 0:
        return seed
    return int(np.random.SeedSequence([seed, member]).generate_state(1)[0])


def fit_members(
    method_class: type[Method],
    settings: MethodSettings,
    parts: Sequence[tuple[SpotSet, SpotSet | None]],
    config: TrainConfig,
) -> Method:
    """Fit one member of ``method_class`` per ``(train, validation)`` part; the method itself for one part.

    Member ``i`` is fitted with ``settings`` (``ensemble=1`` for several members) and ``config``
    seeded :func:`member_seed` ``(config.seed, i)``.

    Returns
    -------
    The fitted method for a single part, else an :class:`Ensemble` of the members.
    """
    single = settings if len(parts) == 1 else dataclasses.replace(settings, ensemble=1)
    members = []
    for i, (train, validation) in enumerate(parts):
        member = method_class(single)
        member.fit(train, validation, dataclasses.replace(config, seed=member_seed(config.seed, i)))
        members.append(member)
    return members[0] if len(members) == 1 else Ensemble(members)


class Ensemble(Method):
    """K fitted members of one method whose predictions are averaged (``ensemble=K`` of a trained method).

    Built by :func:`~histo2expr.tl.fit_histo2expr` for a method whose ``ensemble`` setting is above 1:
    every member is fitted on the same training spots with its own seed (``member_seed``)
    and its own inner validation slide(s) for early stopping, rotating through the training slides
    (:func:`~histo2expr.splits.inner_validation_splits`; with a single training slide, disjoint sets
    of its spots). Held-out spots never reach a member.

    - :meth:`predict`: the mean of the members' predictions.
    - :meth:`embed`: the members' embeddings side by side, each divided by ``sqrt(K)``, so that a
      squared Euclidean distance is the mean of the members' squared distances.
    - :meth:`confidence`: the mean of the members' confidences (None when the method has none).
    - :meth:`state_dict`: the method's name, the settings and the members' states (``"members"``);
      ``method_from_state`` loads it, or the state of a single fitted method.

    Parameters
    ----------
    members
        Fitted methods of one class with the same settings, predicting the same genes.

    Attributes
    ----------
    members
        The fitted members.
    settings
        The members' settings with ``ensemble`` set to their number.
    report
        A :class:`FitReport` whose ``notes["members"]`` lists the members' reports (as dicts); the
        reports themselves are the members' ``report``.
    """

    def __init__(self, members: Sequence[Method]) -> None:
        members = list(members)
        if not members or not all(isinstance(m, Method) for m in members):
            msg = f"An Ensemble needs a non-empty list of fitted methods, got {members!r}."
            raise TypeError(msg)
        first = members[0]
        if any(type(m) is not type(first) or m.settings != first.settings for m in members):
            msg = "The members of an Ensemble must be one method with the same settings; got several."
            raise ValueError(msg)
        super().__init__(dataclasses.replace(first.settings, ensemble=len(members)))
        self.members = members
        self.name = first.name
        self.regimes = first.regimes
        self.token_input = first.token_input
        self.settings_class = first.settings_class
        self.device = first.device
        reports = [None if m.report is None else dataclasses.asdict(m.report) for m in members]
        self.report = FitReport(notes={"members": reports})

    @property
    def uses_coordinates(self) -> bool:
        """Whether the members learn from the spot centres."""
        return self.members[0].uses_coordinates

    @property
    def network(self) -> SpotNetwork | None:
        """The network of the first member, whose image input's frozen parts (an adapted encoder's lower blocks) every member shares."""
        return getattr(self.members[0], "network", None)

    def fit(self, train: SpotSet, validation: SpotSet | None, config: TrainConfig) -> FitReport:
        """Not available: every member validates on its own split; see ``fit_members`` of this module."""
        msg = (
            "An Ensemble is fitted member by member, each on its own inner validation split: use "
            "`hx.tl.fit_histo2expr(..., ensemble=K)` or `histo2expr.models.ensemble.fit_members`."
        )
        raise TypeError(msg)

    def predict(self, data: SpotSet) -> np.ndarray:
        """``(n, g)`` float32: the mean of the members' predictions."""
        return np.mean([m.predict(data) for m in self.members], axis=0).astype(np.float32)

    def embed(self, data: SpotSet) -> np.ndarray:
        """``(n, K * d)`` float32: the members' embeddings side by side, each divided by ``sqrt(K)``."""
        blocks = [m.embed(data) for m in self.members]
        return (np.concatenate(blocks, axis=1) / np.sqrt(len(blocks))).astype(np.float32)

    def confidence(self, data: SpotSet, *, embedding: np.ndarray | None = None) -> np.ndarray | None:
        """``(n,)`` the mean of the members' confidences, or None when the method has none.

        ``embedding`` (from :meth:`embed`) is split back into the members' embeddings.
        """
        k = len(self.members)
        blocks = [None] * k if embedding is None else np.split(embedding * np.sqrt(k), k, axis=1)
        values = [m.confidence(data, embedding=b) for m, b in zip(self.members, blocks, strict=True)]
        if values[0] is None:
            return None
        return np.mean(values, axis=0)

    def to(self, device: str | torch.device) -> Ensemble:
        """Run every member's inference on ``device``; returns the ensemble."""
        for member in self.members:
            member.to(device)
        self.device = self.members[0].device
        return self

    def state_dict(self) -> dict[str, Any]:
        """The method's name, the settings (as plain values) and every member's state (``"members"``)."""
        return {
            "method": self.name,
            "settings": self.settings.plain(),
            "members": [m.state_dict() for m in self.members],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Ensemble:
        """Rebuild on the CPU from :meth:`state_dict` (each member with its method's ``from_state_dict``)."""
        method_class = get_method(state["method"])
        return cls([method_class.from_state_dict(member) for member in state["members"]])


def method_from_state(name: str, state: dict[str, Any]) -> Method:
    """The fitted method ``name`` from its state: an :class:`Ensemble` for an ensemble's state (``"members"``)."""
    if "members" in state:
        return Ensemble.from_state_dict(state)
    return get_method(name).from_state_dict(state)
