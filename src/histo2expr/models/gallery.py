"""The retrieval gallery of the retrieval methods (BLEEP, CMRCNet, CHRep's Estimate module)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from .._validation import non_negative_number, positive_int
from .retrieval import aggregate, cosine_topk


class Gallery:
    """Spots fitted on, by their key embedding and standardised expression; queries retrieve the nearest.

    A query retrieves the ``top_k`` gallery keys most cosine-similar to it
    (:func:`~histo2expr.models.retrieval.cosine_topk`); its prediction averages their
    expression (:func:`~histo2expr.models.retrieval.aggregate`), its confidence is the mean
    similarity of the keys it retrieved.

    Parameters
    ----------
    keys
        ``(n, d)`` embeddings of the gallery spots (kept on the CPU, float32).
    values
        ``(n, g)`` their standardised expression.
    top_k
        Gallery spots retrieved per query; at most ``n``.
    weighting
        ``"mean"`` (plain mean) or ``"softmax"`` (weights ``softmax(similarity / temperature)``).
    temperature
        Softmax temperature (``weighting="softmax"``).
    """

    def __init__(
        self,
        keys: Any,
        values: Any,
        *,
        top_k: int,
        weighting: Literal["mean", "softmax"] = "mean",
        temperature: float | None = None,
    ) -> None:
        self.keys = torch.as_tensor(np.asarray(keys, dtype=np.float32))
        self.values = torch.as_tensor(np.asarray(values, dtype=np.float32))
        self.top_k = positive_int(top_k, "top_k")
        if self.top_k > len(self.keys):
            msg = (
                f"`top_k={self.top_k}` exceeds the {len(self.keys)} spots of the retrieval gallery (the training "
                f"and validation spots); lower `top_k` to at most {len(self.keys)}."
            )
            raise ValueError(msg)
        self.weighting = weighting
        self.temperature = (
            None if temperature is None else non_negative_number(temperature, "temperature", positive=True)
        )

    def __len__(self) -> int:
        return len(self.keys)

    def search(
        self, queries: Any, *, device: str | torch.device = "cpu", **exclude: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, indices)`` of the ``top_k`` keys nearest each query (``exclude``: see ``cosine_topk``)."""
        return cosine_topk(queries, self.keys, self.top_k, device=device, **exclude)

    def predict(self, queries: Any, *, device: str | torch.device = "cpu", **exclude: Any) -> np.ndarray:
        """``(n_queries, g)`` float32: the (weighted) mean expression of each query's nearest keys."""
        similarities, indices = self.search(queries, device=device, **exclude)
        return aggregate(
            self.values.numpy(), indices, similarities, weighting=self.weighting, temperature=self.temperature
        ).astype(np.float32)

    def confidence(self, queries: Any, *, device: str | torch.device = "cpu") -> np.ndarray:
        """``(n_queries,)`` mean cosine similarity of each query to the keys it retrieves."""
        similarities, _ = self.search(queries, device=device)
        return similarities.mean(axis=1)

    def state_dict(self) -> dict[str, Any]:
        """Keys and values (CPU tensors) and the retrieval settings."""
        return {
            "keys": self.keys.clone(),
            "values": self.values.clone(),
            "top_k": self.top_k,
            "weighting": self.weighting,
            "temperature": self.temperature,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Gallery:
        """Rebuild from :meth:`state_dict`."""
        return cls(
            state["keys"].float().cpu(),
            state["values"].float().cpu(),
            top_k=state["top_k"],
            weighting=state["weighting"],
            temperature=state["temperature"],
        )
