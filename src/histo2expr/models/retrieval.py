"""Exact cosine top-k retrieval against a gallery, in memory-bounded chunks.

Used by the BLEEP baseline and CMRCNet (prediction = plain mean of the top-k
gallery spots' expression) and by CHRep's Estimate module (softmax-weighted
mean, with a spot never retrieving itself and optionally never its own slide).

:func:`cosine_topk` streams the gallery in blocks of ``gallery_chunk`` rows and
the queries in blocks of ``query_chunk`` rows. Each block of cosine similarities
is reduced to its top k, which are merged into a running top k per query, so the
memory used is ``O(query_chunk * gallery_chunk + n_queries * k)`` whatever the
size of the gallery; a gallery stored in a :class:`numpy.memmap` (or any array
supporting row slicing) is read one block at a time. Equal similarities are
ordered by gallery index, on every device. :func:`aggregate` turns the
retrieved indices into predictions.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._validation import positive_int
from .inference import resolve_device

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

#: Default number of query rows per block of similarities.
DEFAULT_QUERY_CHUNK = 2048
#: Default number of gallery rows per block. With the query default a block of float32
#: similarities takes 2048 * 65536 * 4 bytes = 512 MiB and a gallery block of d = 256
#: features 64 MiB: 10,000 queries x 1,000,000 rows add about 0.8 GiB to the process
#: (benchmarks/results/retrieval.md); a 4096-row query block (1 GiB) was measured no faster.
DEFAULT_GALLERY_CHUNK = 65536
#: Rows are divided by their L2 norm but by at least this floor, so a zero vector stays zero (similarity 0).
NORM_FLOOR = 1e-12
#: Upper bound on the gathered ``(queries, k, genes)`` block in :func:`aggregate`.
_AGGREGATE_BLOCK_BYTES = 256 * 2**20


def faiss_available() -> bool:
    """Return whether faiss, needed by the approximate gallery index (``index="ivf"``), can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def cpu_block_product() -> Literal["torch", "numpy"]:
    """The library that multiplies blocks on the CPU: ``"torch"`` on Intel CPUs, else ``"numpy"``.

    torch's x86 wheels use Intel's MKL, numpy's use OpenBLAS. On the Intel Xeon (Sapphire
    Rapids) of the benchmark torch's product was 1.3 times faster; on an AMD EPYC numpy's
    was 1.5 times faster (benchmarks/results/retrieval.md). The vendor is read from
    ``/proc/cpuinfo``; where it cannot be read (not Linux), numpy's BLAS is used.
    """
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in cpuinfo)
    except OSError:
        intel = False
    return "torch" if intel else "numpy"


def cosine_topk(
    queries: Any,
    gallery: Any,
    k: int,
    *,
    exclude_self: bool = False,
    query_ids: Any = None,
    gallery_ids: Any = None,
    query_groups: Any = None,
    gallery_groups: Any = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    gallery_chunk: int = DEFAULT_GALLERY_CHUNK,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Find the ``k`` gallery rows most cosine-similar to each query row, exactly.

    Rows are divided by their L2 norm (at least ``1e-12``, so a zero vector stays zero and
    has similarity 0 to everything). Similarities are
    computed in float32 on ``device`` block by block and merged into a running top
    k, so memory stays ``O(query_chunk * gallery_chunk + n_queries * k)``
    regardless of the gallery size.

    Parameters
    ----------
    queries
        ``(n_queries, d)`` numpy array, torch tensor, or array-like with row slicing.
    gallery
        ``(n_gallery, d)`` numpy array, torch tensor, or any array-like with ``shape``
        and row slicing (e.g. :class:`numpy.memmap`, an HDF5 or zarr array); it is
        read ``gallery_chunk`` rows at a time, so it may be larger than memory.
    k
        Number of neighbours per query.
    exclude_self
        Queries are the gallery itself (same rows, same order): query ``i`` never
        retrieves gallery row ``i``. Shorthand for ``query_ids = gallery_ids =
        arange(n)``.
    query_ids, gallery_ids
        ``(n_queries,)`` and ``(n_gallery,)`` labels (int or str, e.g. spot names): a
        query never retrieves a gallery row carrying its own id ("no
        self-retrieval" when queries are a subset of the gallery). Pass both.
    query_groups, gallery_groups
        ``(n_queries,)`` and ``(n_gallery,)`` group labels, e.g. slides: a query never
        retrieves a gallery row of its own group. Pass both.
    query_chunk, gallery_chunk
        Rows per block. Memory: one normalised float32 copy of a gallery block
        (``gallery_chunk * d * 4`` bytes) and of a query block, the block of
        ``query_chunk * gallery_chunk`` float32 similarities (512 MiB with the defaults),
        with exclusions a boolean mask of the same shape (a quarter of that), and the
        running top k (``n_queries * k * 12`` bytes). Nothing grows with the gallery.
    device
        Torch device on which the similarities are computed (``"auto"``, ``"cpu"``,
        ``"cuda"``, ``"mps"`` or a :class:`torch.device`); blocks are moved there,
        results come back to the CPU. On the CPU the block products run in the BLAS
        measured faster for the CPU's vendor (``cpu_block_product`` in this module), with
        ``torch.get_num_threads()`` threads. It was measured as fast as faiss's exact
        ``IndexFlatIP`` on the same data and threads (1.00 to 1.11 times faster;
        benchmarks/results/retrieval.md), so there is no faiss backend for exact search;
        faiss serves the approximate index of :class:`~histo2expr.models.gallery.Gallery`.

    Returns
    -------
    Two arrays:

    similarities
        ``(n_queries, k)`` float32 cosine similarities, descending in each row.
        Equal similarities are ordered by gallery index. (Equal as computed: BLAS
        kernels may round mathematically equal similarities, such as those of
        duplicated gallery rows in different blocks, one float32 unit apart.)
    indices
        ``(n_queries, k)`` int64 row indices into ``gallery``.
    """
    import torch
    from threadpoolctl import threadpool_limits

    nq, d = _shape_2d(queries, "queries")
    ng, dg = _shape_2d(gallery, "gallery")
    if dg != d:
        msg = (
            f"queries have {d} features but the gallery has {dg}; both must be embedded by the same "
            "encoder / projection head."
        )
        raise ValueError(msg)
    k = positive_int(k, "k")
    query_chunk = positive_int(query_chunk, "query_chunk")
    gallery_chunk = positive_int(gallery_chunk, "gallery_chunk")
    device = resolve_device(device)
    exclusions = _exclusions(nq, ng, exclude_self, query_ids, gallery_ids, query_groups, gallery_groups)
    _check_enough_eligible(k, ng, exclusions)

    # numpy's BLAS (when it does the block products) gets as many threads as torch uses.
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        vals, idx = _chunked_topk(
            queries, gallery, (nq, ng, k), exclusions, (query_chunk, gallery_chunk), device
        )
    return vals.cpu().numpy(), idx.cpu().numpy()


def _chunked_topk(
    queries: Any,
    gallery: Any,
    sizes: tuple[int, int, int],
    exclusions: list[_Exclusion],
    chunks: tuple[int, int],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top k over gallery blocks (outer loop: each is read once) and query blocks."""
    import torch

    (nq, ng, k), (query_chunk, gallery_chunk) = sizes, chunks
    run_vals = torch.full((nq, k), -torch.inf, dtype=torch.float32, device=device)
    run_idx = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    buffer = torch.empty(min(query_chunk, nq) * min(gallery_chunk, ng), dtype=torch.float32, device=device)
    for g_start in range(0, ng, gallery_chunk):
        g_stop = min(g_start + gallery_chunk, ng)
        g_rows = _normalised_rows(gallery, g_start, g_stop, device, "gallery")
        for q_start in range(0, nq, query_chunk):
            q_stop = min(q_start + query_chunk, nq)
            q_rows = _normalised_rows(queries, q_start, q_stop, device, "queries")
            block = _Block(q_rows, g_rows, (q_start, q_stop), (g_start, g_stop), exclusions)
            vals, idx = block.topk(k, buffer)
            merged_vals = torch.cat([run_vals[q_start:q_stop], vals], dim=1)
            merged_idx = torch.cat([run_idx[q_start:q_stop], idx + g_start], dim=1)
            merged_vals, order = torch.sort(merged_vals, dim=1, descending=True, stable=True)
            run_vals[q_start:q_stop] = merged_vals[:, :k]
            run_idx[q_start:q_stop] = merged_idx.gather(1, order[:, :k])
    return run_vals, run_idx


def aggregate(
    values: Any,
    indices: Any,
    similarities: Any = None,
    *,
    weighting: Literal["mean", "softmax"] = "mean",
    temperature: float | None = None,
    query_chunk: int | None = None,
) -> np.ndarray:
    """Average the gallery rows retrieved for each query.

    Parameters
    ----------
    values
        ``(n_gallery, n_genes)`` values of the gallery spots: numpy array, torch tensor,
        scipy sparse matrix, or array-like supporting integer-array row indexing such as
        a memmap. Only the retrieved rows are read, one block of queries at a time.
    indices
        ``(n_queries, k)`` gallery row indices, as returned by :func:`cosine_topk`.
    similarities
        ``(n_queries, k)`` similarities of those rows; needed for ``weighting="softmax"``.
    weighting
        ``"mean"``: plain mean of the k rows (BLEEP, CMRCNet). ``"softmax"``: weights
        ``softmax(similarity / temperature)`` over the k rows (CHRep's Estimate
        module), computed stably (the row maximum is subtracted first).
    temperature
        Softmax temperature, required for ``weighting="softmax"``; towards 0 the
        prediction becomes the top-1 row, for large values the plain mean.
    query_chunk
        Queries gathered at a time; by default as many as keep the gathered
        ``(queries, k, n_genes)`` block under 256 MiB.

    Returns
    -------
    ``(n_queries, n_genes)`` predictions, float64 when ``values`` is float64, else float32.
    """
    values = _as_numpy_like(values)
    if len(getattr(values, "shape", ())) != 2:
        msg = (
            f"`values` must be a 2-D (n_gallery, n_genes) array, got shape {getattr(values, 'shape', None)}; "
            "reshape a single gene with values.reshape(-1, 1)."
        )
        raise ValueError(msg)
    ng, n_genes = values.shape
    indices = np.asarray(_as_numpy_like(indices))
    if indices.ndim != 2 or not np.issubdtype(indices.dtype, np.integer):
        msg = f"`indices` must be a 2-D integer array (n_queries, k), got {indices.dtype} with shape {indices.shape}."
        raise ValueError(msg)
    nq, k = indices.shape
    if indices.size and (indices.min() < 0 or indices.max() >= ng):
        msg = (
            f"`indices` must lie in [0, {ng}) (the rows of `values`), got values in "
            f"[{indices.min()}, {indices.max()}]; pass the gallery that was searched."
        )
        raise ValueError(msg)
    weights = _neighbour_weights(indices.shape, similarities, weighting, temperature)
    dtype = np.float64 if values.dtype == np.float64 else np.float32
    if query_chunk is None:
        query_chunk = max(1, _AGGREGATE_BLOCK_BYTES // max(1, k * n_genes * np.dtype(dtype).itemsize))
    query_chunk = positive_int(query_chunk, "query_chunk")

    out = np.empty((nq, n_genes), dtype=dtype)
    for start in range(0, nq, query_chunk):
        block = indices[start : start + query_chunk]
        needed, inverse = np.unique(block, return_inverse=True)
        rows = values[needed]
        rows = np.asarray(rows.toarray() if hasattr(rows, "toarray") else rows, dtype=dtype)
        if not np.isfinite(rows).all():
            bad = int(needed[~np.isfinite(rows).all(axis=1)][0])
            msg = f"`values` row {bad} contains NaN or infinite values; fix or drop that gallery spot."
            raise ValueError(msg)
        gathered = rows[inverse.reshape(block.shape)]
        if weights is None:
            out[start : start + len(block)] = gathered.mean(axis=1)
        else:
            out[start : start + len(block)] = np.einsum(
                "qk,qkg->qg", weights[start : start + len(block)].astype(dtype), gathered
            )
    return out


class _Exclusion:
    """Labels of queries and gallery rows; a query never retrieves a row with its own label."""

    def __init__(self, query_labels: Any, gallery_labels: Any, nq: int, ng: int, what: str) -> None:
        query_labels = np.asarray(_as_numpy_like(query_labels))
        gallery_labels = np.asarray(_as_numpy_like(gallery_labels))
        for labels, n, side in ((query_labels, nq, "query"), (gallery_labels, ng, "gallery")):
            if labels.shape != (n,):
                msg = f"`{side}_{what}` must have one label per {side} row, shape ({n},); got shape {labels.shape}."
                raise ValueError(msg)
        _, codes = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
        self.what = what
        self.query_codes = codes[:nq].astype(np.int64)
        self.gallery_codes = codes[nq:].astype(np.int64)
        self.n_codes = int(codes.max(initial=-1)) + 1

    def gallery_counts(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Number of gallery rows in ``[start, stop)`` carrying each label code."""
        return np.bincount(self.gallery_codes[start:stop], minlength=self.n_codes)

    def mask(
        self, q_start: int, q_stop: int, g_start: int, g_stop: int, device: torch.device
    ) -> torch.Tensor:
        """Boolean ``(queries, gallery rows)`` block, True where the labels are equal."""
        import torch

        q = torch.from_numpy(self.query_codes[q_start:q_stop]).to(device)
        g = torch.from_numpy(self.gallery_codes[g_start:g_stop]).to(device)
        return q[:, None] == g[None, :]


class _Block:
    """One block of queries against one block of gallery rows, reduced to an exact top k."""

    def __init__(
        self,
        q_rows: torch.Tensor,
        g_rows: torch.Tensor,
        q_range: tuple[int, int],
        g_range: tuple[int, int],
        exclusions: list[_Exclusion],
    ) -> None:
        self.q_rows, self.g_rows = q_rows, g_rows
        self.q_range, self.g_range = q_range, g_range
        self.exclusions = exclusions

    def similarities(self, buffer: torch.Tensor) -> torch.Tensor:
        """Cosine similarities of the block, excluded pairs at -inf."""
        import torch

        shape = (len(self.q_rows), len(self.g_rows))
        sims = buffer[: shape[0] * shape[1]].view(shape)
        if sims.device.type == "cpu" and cpu_block_product() == "numpy":
            np.matmul(self.q_rows.numpy(), self.g_rows.numpy().T, out=sims.numpy())
        else:
            torch.mm(self.q_rows, self.g_rows.T, out=sims)
        for exclusion in self.exclusions:
            sims.masked_fill_(exclusion.mask(*self.q_range, *self.g_range, sims.device), -torch.inf)
        return sims

    def topk(self, k: int, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top k of the block by matrix product and :func:`torch.topk`."""
        import torch

        sims = self.similarities(buffer)
        if sims.shape[1] <= k:
            return torch.sort(sims, dim=1, descending=True, stable=True)
        vals, idx = _order(*torch.topk(sims, k + 1, dim=1, sorted=False))
        return _resolve_boundary_ties(
            vals, idx, k, lambda rows: torch.sort(sims[rows], dim=1, descending=True, stable=True)
        )


def _resolve_boundary_ties(
    vals: torch.Tensor,
    idx: torch.Tensor,
    k: int,
    sort_rows: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first k of k + 1 ordered candidates; redo the rows whose k-th and (k+1)-th tie.

    When the k-th and (k+1)-th values differ, the top-k set of the block is unique.
    When they tie, more gallery rows of the block may share that value and the top k
    must take the lowest indices among them: ``sort_rows`` returns those query rows
    sorted over the whole block, by value and then by index.
    """
    import torch

    tied = (vals[:, k] == vals[:, k - 1]) & torch.isfinite(vals[:, k - 1])
    vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        full_vals, full_idx = sort_rows(rows)
        vals[rows], idx[rows] = full_vals[:, :k], full_idx[:, :k]
    return vals, idx


def _order(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row of candidates by value (descending), then gallery index (ascending)."""
    import torch

    idx, by_index = torch.sort(idx, dim=1)
    vals, by_value = torch.sort(vals.gather(1, by_index), dim=1, descending=True, stable=True)
    return vals, idx.gather(1, by_value)


def _exclusions(
    nq: int,
    ng: int,
    exclude_self: bool,
    query_ids: Any,
    gallery_ids: Any,
    query_groups: Any,
    gallery_groups: Any,
) -> list[_Exclusion]:
    exclusions = []
    if exclude_self:
        if query_ids is not None or gallery_ids is not None:
            msg = "Pass either `exclude_self=True` or `query_ids`/`gallery_ids`, not both."
            raise ValueError(msg)
        if nq != ng:
            msg = (
                f"`exclude_self=True` means the queries are the gallery, but there are {nq} queries and {ng} "
                "gallery rows; pass `query_ids` and `gallery_ids` to say which gallery row is each query."
            )
            raise ValueError(msg)
        query_ids = gallery_ids = np.arange(nq)
    for q_labels, g_labels, what in (
        (query_ids, gallery_ids, "ids"),
        (query_groups, gallery_groups, "groups"),
    ):
        if (q_labels is None) != (g_labels is None):
            msg = f"Pass both `query_{what}` and `gallery_{what}`, or neither."
            raise ValueError(msg)
        if q_labels is not None:
            exclusions.append(_Exclusion(q_labels, g_labels, nq, ng, what))
    return exclusions


def _check_enough_eligible(k: int, ng: int, exclusions: list[_Exclusion]) -> None:
    if not exclusions:
        if k > ng:
            msg = f"k={k} exceeds the gallery size ({ng} rows); lower k to at most {ng}."
            raise ValueError(msg)
        return
    excluded = sum(ex.gallery_counts()[ex.query_codes] for ex in exclusions)
    if len(exclusions) == 2:  # rows with both the query's id and its group were counted twice
        ids, groups = exclusions
        pairs, counts = np.unique(
            ids.gallery_codes * groups.n_codes + groups.gallery_codes, return_counts=True
        )
        query_pairs = ids.query_codes * groups.n_codes + groups.query_codes
        pos = np.minimum(np.searchsorted(pairs, query_pairs), len(pairs) - 1)
        excluded = excluded - np.where(pairs[pos] == query_pairs, counts[pos], 0)
    eligible = ng - excluded
    if eligible.size and eligible.min() < k:
        worst = int(np.argmin(eligible))
        what = " and ".join("its own id" if ex.what == "ids" else "its own group" for ex in exclusions)
        msg = (
            f"k={k} exceeds the gallery rows a query may retrieve: query {worst} has only {int(eligible[worst])} "
            f"eligible of {ng} after excluding rows with {what}. Lower k to at most {int(eligible.min())}, "
            "or enlarge the gallery."
        )
        raise ValueError(msg)


def _normalised_rows(array: Any, start: int, stop: int, device: torch.device, name: str) -> torch.Tensor:
    """Rows ``[start, stop)`` as float32 on ``device``, L2-normalised with a floor, checked finite."""
    import torch

    rows = array[start:stop]
    if isinstance(rows, torch.Tensor):  # a copy: the caller's tensor is never normalised in place
        rows = rows.detach().to(device=device, dtype=torch.float32, copy=True)
    else:
        rows = torch.from_numpy(np.array(rows, dtype=np.float32)).to(device)
    finite = torch.isfinite(rows).all(dim=1)
    if not bool(finite.all()):
        bad = start + int((~finite).nonzero()[0, 0])
        msg = f"{name} row {bad} contains NaN or infinite values; drop or impute such rows before retrieval."
        raise ValueError(msg)
    return rows.div_(torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min_(NORM_FLOOR))


def _shape_2d(array: Any, name: str) -> tuple[int, int]:
    shape = tuple(getattr(array, "shape", np.shape(array)))
    if len(shape) != 2:
        msg = f"`{name}` must be a 2-D (rows, features) array, got shape {shape}."
        raise ValueError(msg)
    return int(shape[0]), int(shape[1])


def _as_numpy_like(array: Any) -> Any:
    """Torch tensors become numpy arrays; numpy arrays and other array-likes are returned as they are."""
    torch = sys.modules.get("torch")  # an array cannot be a tensor unless torch was imported
    if torch is not None and isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return array if hasattr(array, "shape") else np.asarray(array)


def _neighbour_weights(
    shape: tuple[int, int], similarities: Any, weighting: str, temperature: float | None
) -> np.ndarray | None:
    """``None`` for the plain mean, else the ``(n_queries, k)`` softmax weights."""
    if weighting == "mean":
        return None
    if weighting != "softmax":
        msg = f"`weighting` must be 'mean' or 'softmax', got {weighting!r}."
        raise ValueError(msg)
    if similarities is None:
        msg = "weighting='softmax' needs the `similarities` returned by cosine_topk."
        raise ValueError(msg)
    if temperature is None or not np.isfinite(temperature) or temperature <= 0:
        msg = f"weighting='softmax' needs a positive, finite `temperature`, got {temperature!r}."
        raise ValueError(msg)
    sims = np.asarray(_as_numpy_like(similarities), dtype=np.float64)
    if sims.shape != shape:
        msg = f"`similarities` must have the shape of `indices` {shape}, got {sims.shape}."
        raise ValueError(msg)
    if not np.isfinite(sims).all():
        msg = "`similarities` contains NaN or infinite values; pass the similarities returned by cosine_topk."
        raise ValueError(msg)
    logits = sims / temperature
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)
