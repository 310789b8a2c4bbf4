"""The retrieval gallery of the retrieval methods (BLEEP, CMRCNet, CHRep's Estimate module)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from .._validation import non_negative_number, one_of, positive_int
from .ivf import IVFIndex
from .retrieval import aggregate, cosine_topk

#: The gallery indexes: ``index`` of :class:`Gallery`.
GALLERY_INDEXES = ("exact", "ivf")


class Gallery:
    """Spots fitted on, by their key embedding and standardised expression; queries retrieve the nearest.

    A query retrieves the ``top_k`` gallery keys most cosine-similar to it, exactly
    (:func:`~histo2expr.models.retrieval.cosine_topk`) or approximately for galleries of
    millions of spots (:class:`~histo2expr.models.ivf.IVFIndex`); its prediction averages
    their expression (:func:`~histo2expr.models.retrieval.aggregate`), its confidence is the
    mean similarity of the keys it retrieved.

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
    index
        ``"exact"`` (default): every key is scored. ``"ivf"``: a faiss inverted-file index
        with 4-bit product-quantisation codes, built here, whose candidates are re-ranked exactly (needs
        ``pip install faiss-cpu``): for galleries of millions of spots; at 10 million keys
        recall@50 was 0.98 against exact for a twentieth of its CPU time
        (benchmarks/results/retrieval.md). It searches on the CPU whatever ``device``.
    n_lists, n_probe, seed
        Inverted lists, lists scanned per query, and seed of the ``"ivf"`` index (see
        :class:`~histo2expr.models.ivf.IVFIndex`); ``n_probe`` can be changed later through
        ``gallery.ivf.n_probe``.
    """

    def __init__(
        self,
        keys: Any,
        values: Any,
        *,
        top_k: int,
        weighting: Literal["mean", "softmax"] = "mean",
        temperature: float | None = None,
        index: Literal["exact", "ivf"] = "exact",
        n_lists: int | None = None,
        n_probe: int | None = None,
        seed: int = 0,
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
        index = one_of(index, GALLERY_INDEXES, "index")
        #: The approximate index (``index="ivf"``), else None.
        self.ivf = (
            IVFIndex(self.keys, n_lists=n_lists, n_probe=n_probe, seed=seed) if index == "ivf" else None
        )

    @property
    def index(self) -> str:
        """``"exact"`` or ``"ivf"``."""
        return "exact" if self.ivf is None else "ivf"

    def __len__(self) -> int:
        return len(self.keys)

    def search(
        self, queries: Any, *, device: str | torch.device = "cpu", **exclude: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, indices)`` of the ``top_k`` keys nearest each query (``exclude``: see ``cosine_topk``).

        Exclusions need the exact index: they serve fitting, on galleries of fitted spots.
        """
        if self.ivf is None:
            return cosine_topk(queries, self.keys, self.top_k, device=device, **exclude)
        if any(value is not None and value is not False for value in exclude.values()):
            msg = f"exclusions ({', '.join(sorted(exclude))}) need an exact gallery; build it with index='exact'."
            raise ValueError(msg)
        return self.ivf.search(queries, self.keys, self.top_k)

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
        """Keys and values (CPU tensors), the retrieval settings and the ``"ivf"`` index (serialised), if any."""
        return {
            "keys": self.keys.clone(),
            "values": self.values.clone(),
            "top_k": self.top_k,
            "weighting": self.weighting,
            "temperature": self.temperature,
            "ivf": None if self.ivf is None else self.ivf.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Gallery:
        """Rebuild from :meth:`state_dict` (an ``"ivf"`` index is restored, not trained again)."""
        gallery = cls(
            state["keys"].float().cpu(),
            state["values"].float().cpu(),
            top_k=state["top_k"],
            weighting=state["weighting"],
            temperature=state["temperature"],
        )
        if state.get("ivf") is not None:  # states saved before the index option have no "ivf"
            gallery.ivf = IVFIndex.from_state_dict(state["ivf"])
        return gallery
