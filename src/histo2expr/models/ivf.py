"""Approximate cosine top-k for galleries of millions of spots: a faiss IVF index, re-ranked exactly.

:class:`IVFIndex` clusters the L2-normalised gallery keys into ``n_lists`` inverted lists
(k-means on a seeded sample) and stores each key's residual to its list centre as 4-bit
product-quantisation codes scanned with SIMD lookup tables (faiss ``IVF{n_lists},PQ{m}x4fs``,
inner product, ``m = d / 2`` sub-quantisers of two features each: ``d / 4`` bytes per key, a
sixteenth of the float32 key). A query scans the ``n_probe`` lists nearest to it and keeps the
``RERANK_FACTOR * k`` best codes; these candidates are re-scored exactly in float32 against
the gallery's own keys, so the similarities returned are exact cosines and only the candidate
set is approximate (recall against :func:`~histo2expr.models.retrieval.cosine_topk`, measured
in benchmarks/results/retrieval.md). 8-bit scalar codes (``SQ8``) were measured as accurate
but about ten times slower to scan, hardly faster than the exact search.

Memory: the codes (``n * d / 4`` bytes), the list ids (``8 * n`` bytes) and the centroids
(``n_lists * d * 4`` bytes), beside the keys that the gallery holds anyway; a search block
of ``RERANK_QUERIES`` queries gathers ``RERANK_QUERIES * RERANK_FACTOR * k * d * 4`` bytes of
candidate keys. Building reads the keys ``BUILD_BLOCK`` rows at a time. faiss is optional:
``pip install faiss-cpu`` (the ``faiss`` extra).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .._validation import positive_int, seed_value
from .retrieval import NORM_FLOOR, _normalised_rows, _order, _shape_2d, cosine_topk

if TYPE_CHECKING:
    import torch

#: Candidates re-ranked exactly per query, as a multiple of ``k``.
RERANK_FACTOR = 8
#: Keys sampled per list to train the k-means clustering and the product quantiser.
TRAIN_PER_LIST = 64
#: Gallery rows normalised and added to the index at a time.
BUILD_BLOCK = 65536
#: Queries re-ranked at a time (their candidate keys: ``RERANK_QUERIES * RERANK_FACTOR * k * d * 4`` bytes).
RERANK_QUERIES = 256


def default_n_lists(n: int) -> int:
    """``round(sqrt(n))`` inverted lists (at least 1): 1,000 for a million keys, 3,162 for ten million."""
    return max(1, round(math.sqrt(n)))


def default_n_probe(n_lists: int) -> int:
    """Lists scanned per query by default: one in 8 (at least 16, at most all of them)."""
    return min(n_lists, max(16, math.ceil(n_lists / 8)))


def factory_string(n_lists: int, d: int) -> str:
    """The faiss index of ``d`` features: ``IVF{n_lists},PQ{m}x4fs`` with ``m = d / 2`` (``d`` if odd)."""
    return f"IVF{n_lists},PQ{d // 2 if d % 2 == 0 else d}x4fs"


def import_faiss() -> Any:
    """``faiss``, or an ImportError saying how to install it."""
    try:
        import faiss
    except ImportError:
        msg = (
            "index='ivf' needs the faiss package: `pip install faiss-cpu` (or `pip install "
            "'histo2expr[faiss]'`), or use index='exact'."
        )
        raise ImportError(msg) from None
    return faiss


class IVFIndex:
    """faiss IVF index with 4-bit PQ codes of L2-normalised keys, searched with an exact float32 re-rank.

    Parameters
    ----------
    keys
        ``(n, d)`` gallery keys: a float32 tensor, numpy array or memmap, read in blocks.
    n_lists
        Inverted lists (k-means clusters); default ``round(sqrt(n))``. More lists make
        queries faster and building slower.
    n_probe
        Lists scanned per query; default one list in 8 (at least 16). The recall knob: more
        lists scanned, higher recall, slower queries. Can be changed after building.
    seed
        Seed of the training sample and of the k-means initialisation: the same keys and seed
        build the same index.
    """

    def __init__(
        self, keys: Any, *, n_lists: int | None = None, n_probe: int | None = None, seed: int = 0
    ) -> None:
        faiss = import_faiss()
        n, d = keys.shape
        self.n_lists = default_n_lists(n) if n_lists is None else positive_int(n_lists, "n_lists")
        if self.n_lists > n:
            msg = f"`n_lists={self.n_lists}` exceeds the {n} gallery keys; lower it (default: sqrt of the keys)."
            raise ValueError(msg)
        self.n_probe = default_n_probe(self.n_lists) if n_probe is None else positive_int(n_probe, "n_probe")
        self.seed = seed_value(seed)
        rng = np.random.default_rng(self.seed)
        index = faiss.index_factory(d, factory_string(self.n_lists, d), faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(rng.integers(2**31))  # k-means initialisation
        sample = rng.choice(n, size=min(n, TRAIN_PER_LIST * self.n_lists), replace=False)
        index.train(
            _normalised_rows(np.asarray(keys[np.sort(sample)]), 0, len(sample), _cpu(), "gallery").numpy()
        )
        for start in range(0, n, BUILD_BLOCK):
            index.add(_normalised_rows(keys, start, min(start + BUILD_BLOCK, n), _cpu(), "gallery").numpy())
        self._index = index

    def search(self, queries: Any, keys: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, indices)`` of the ``k`` best of each query's candidates, re-ranked exactly.

        Equal similarities are ordered by gallery index. A query with fewer than ``k``
        candidates in the lists it scans (tiny lists, small ``n_probe``) is searched exactly.
        """
        import torch

        n_queries, d = _shape_2d(queries, "queries")
        if d != self._index.d:
            msg = (
                f"queries have {d} features but the gallery has {self._index.d}; both must be embedded by the "
                "same encoder / projection head."
            )
            raise ValueError(msg)
        self._index.nprobe = min(self.n_probe, self.n_lists)
        sims = np.empty((n_queries, k), dtype=np.float32)
        indices = np.empty((n_queries, k), dtype=np.int64)
        for start in range(0, n_queries, RERANK_QUERIES):
            stop = min(start + RERANK_QUERIES, n_queries)
            q_rows = _normalised_rows(queries, start, stop, _cpu(), "queries")
            _, candidates = self._index.search(q_rows.numpy(), min(RERANK_FACTOR * k, len(keys)))
            candidates = torch.from_numpy(candidates)
            found = candidates >= 0
            rows = keys[candidates.clamp_min(0).flatten()].float()
            rows = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(NORM_FLOOR)
            scores = torch.einsum("qd,qcd->qc", q_rows, rows.view(*candidates.shape, -1))
            scores = scores.masked_fill(~found, -torch.inf)
            block_sims, block_idx = _order(scores, candidates)
            sims[start:stop], indices[start:stop] = block_sims[:, :k].numpy(), block_idx[:, :k].numpy()
        short = np.flatnonzero(~np.isfinite(sims[:, -1]))
        if short.size:
            sims[short], indices[short] = cosine_topk(np.asarray(queries)[short], keys, k)
        return sims, indices

    def state_dict(self) -> dict[str, Any]:
        """Settings and the serialised faiss index (a uint8 tensor)."""
        import torch

        faiss = import_faiss()
        return {
            "n_lists": self.n_lists,
            "n_probe": self.n_probe,
            "seed": self.seed,
            "faiss_index": torch.from_numpy(faiss.serialize_index(self._index)),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> IVFIndex:
        """Rebuild from :meth:`state_dict` without training again."""
        faiss = import_faiss()
        index = cls.__new__(cls)
        index.n_lists, index.n_probe, index.seed = state["n_lists"], state["n_probe"], state["seed"]
        index._index = faiss.deserialize_index(state["faiss_index"].numpy())
        return index


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")
